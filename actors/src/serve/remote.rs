//! Serving across processes, after text-generation-inference's router ⇄ shard split over a transport:
//! every process builds the same channels ([`super::messages`]), runs the workers its rank hosts, and
//! for every other rank one forwarder thread (draining the channels that rank owns here and sending
//! them over c10d) and one receiver thread (putting what arrives into this process's channels). Rank 0
//! owns the scheduler's inbox, so results come home; the scheduler and the workers never know a peer
//! is remote. Idle links carry heartbeats, so a dead or hung rank is noticed within the peer timeout:
//! on rank 0 its loss fails every request in flight with an error event and turns `/ready` 503.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flume::{Receiver, Selector, Sender};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::messages::{DiffusionJob, Inbox, ShardIn, VisionJob};
use super::slot;
use crate::dist::wire::{self, Header};
use crate::dist::{DistError, Group, World};
use crate::runtime::{Failure, OnReport, Report};

/// Everything that crosses between two processes of a service.
#[derive(Serialize, Deserialize)]
pub enum Msg {
    Vision(VisionJob),
    /// Input of LLM shard `i` (pipeline order).
    Shard(usize, ShardIn),
    Diffusion(DiffusionJob),
    Inbox(Inbox),
    /// An idle link's sign of life.
    Heartbeat,
    /// The sender is shutting down cleanly.
    Stop,
}

/// The most bytes a message body (without its tensors) may claim: a length inside a garbage body fails
/// to decode instead of allocating more (drawn PNGs, the largest bodies, are far smaller).
pub const MAX_BODY_BYTES: usize = 64 << 20;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_BODY_BYTES>()
}

fn bad(problem: String) -> DistError {
    DistError::Header { problem }
}

/// The message's bytes and the tensors it carries.
pub fn encode<T: Serialize>(msg: &T) -> Result<(Vec<u8>, Vec<Tensor>), DistError> {
    slot::OUT.with(|o| o.borrow_mut().clear());
    let body = bincode::serde::encode_to_vec(msg, codec()).map_err(|e| bad(e.to_string()));
    let tensors = slot::OUT.with(|o| std::mem::take(&mut *o.borrow_mut()));
    Ok((body?, tensors))
}

/// The message of `body`, its tensor slots filled from `tensors`.
pub fn decode<T: DeserializeOwned>(body: &[u8], tensors: Vec<Tensor>) -> Result<T, DistError> {
    slot::IN.with(|v| *v.borrow_mut() = tensors.into_iter().map(Some).collect());
    let decoded = bincode::serde::decode_from_slice::<T, _>(body, codec()).map_err(|e| {
        bad(match e {
            bincode::error::DecodeError::OtherString(m) => m,
            other => other.to_string(),
        })
    });
    let left = slot::untaken();
    let (msg, used) = decoded?;
    if left > 0 {
        return Err(bad(format!(
            "{left} tensor(s) carried but not named by the message"
        )));
    }
    if used != body.len() {
        return Err(bad(format!(
            "{} trailing bytes after the message",
            body.len() - used
        )));
    }
    Ok(msg)
}

/// Which rank hosts each worker (rank 0 hosts the scheduler and owns its inbox).
#[derive(Debug, Clone, PartialEq)]
pub struct Owners {
    pub vision: u32,
    /// LLM shards in pipeline order.
    pub shards: Vec<u32>,
    pub diffusion: u32,
}

/// This process's place in a multi-process service.
#[derive(Clone)]
pub struct ServeWorld {
    /// The joined world (its store stays open while the service runs).
    pub world: Arc<World>,
    pub owners: Owners,
    /// How often an idle link says it is alive (well below the group's timeout).
    pub heartbeat: Duration,
}

impl ServeWorld {
    pub fn rank(&self) -> u32 {
        self.world.rank() as u32
    }

    fn group(&self) -> &Group {
        &self.world.group
    }

    /// Processes on this node (they share its cores).
    pub fn local_procs(&self) -> usize {
        self.world.env.local_world_size.max(1) as usize
    }
}

/// One process's ends of every channel of the service (every process builds the same set).
pub struct Ends {
    pub inbox: (Sender<Inbox>, Receiver<Inbox>),
    pub shards: Vec<(Sender<ShardIn>, Receiver<ShardIn>)>,
    pub vision: (Sender<VisionJob>, Receiver<VisionJob>),
    pub diffusion: (Sender<DiffusionJob>, Receiver<DiffusionJob>),
}

fn tag(src: u32, dst: u32) -> i32 {
    50_000 + (src as i32) * 1024 + dst as i32
}

fn send_msg(g: &Group, dst: u32, msg: &Msg) -> Result<(), DistError> {
    let (body, mut tensors) = encode(msg)?;
    tensors.insert(0, Tensor::from_slice(&body));
    let header = Header {
        edge: "serve".into(),
        seq: 0,
        id: [0; 16],
        tensors: None,
        index: vec![],
        trace: String::new(),
    };
    for p in wire::send(
        g,
        dst as i64,
        tag(g.rank as u32, dst),
        header,
        Some(&tensors),
    )? {
        p.wait()?;
    }
    Ok(())
}

fn recv_msg(g: &Group, src: u32) -> Result<Msg, DistError> {
    let (_, tensors) = wire::recv(g, src as i64, tag(src, g.rank as u32), "serve", Device::Cpu)?;
    let mut tensors = tensors.unwrap_or_default();
    if tensors.is_empty() || tensors[0].kind() != Kind::Uint8 {
        return Err(bad("a serve message without its body".into()));
    }
    let body = Vec::<u8>::try_from(&tensors.remove(0)).map_err(|e| bad(e.to_string()))?;
    decode(&body, tensors)
}

/// The forwarders and receivers of one process.
pub struct Bridge {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// A receiver's end: `Ok` when its peer stopped cleanly, the failure otherwise.
    ended: Receiver<Result<(), Failure>>,
}

/// The next message for `dst`: one of the channels it owns here, or a heartbeat after `wait`.
fn next_for(dst: u32, w: &ServeWorld, ends: &Ends, wait: Duration) -> Msg {
    let o = &w.owners;
    let mut sel = Selector::new();
    if o.vision == dst {
        sel = sel.recv(&ends.vision.1, |r| r.ok().map(Msg::Vision));
    }
    for (i, (_, rx)) in ends.shards.iter().enumerate() {
        if o.shards[i] == dst {
            sel = sel.recv(rx, move |r| r.ok().map(|m| Msg::Shard(i, m)));
        }
    }
    if o.diffusion == dst {
        sel = sel.recv(&ends.diffusion.1, |r| r.ok().map(Msg::Diffusion));
    }
    if dst == 0 {
        sel = sel.recv(&ends.inbox.1, |r| r.ok().map(Msg::Inbox));
    }
    sel.wait_timeout(wait)
        .ok()
        .flatten()
        .unwrap_or(Msg::Heartbeat)
}

fn forward(dst: u32, w: ServeWorld, ends: Arc<Ends>, stop: Arc<AtomicBool>, on_lost: OnReport) {
    loop {
        if stop.load(Ordering::SeqCst) {
            let _ = send_msg(w.group(), dst, &Msg::Stop);
            return;
        }
        let msg = next_for(dst, &w, &ends, w.heartbeat);
        if let Err(e) = send_msg(w.group(), dst, &msg) {
            if !stop.load(Ordering::SeqCst) {
                on_lost(&Report::Failed(Failure {
                    actor: format!("rank {dst}"),
                    error: e.to_string(),
                    restarting: false,
                }));
            }
            return;
        }
    }
}

fn receive(
    src: u32,
    w: ServeWorld,
    ends: Arc<Ends>,
    stop: Arc<AtomicBool>,
    on_lost: OnReport,
    ended: Sender<Result<(), Failure>>,
) {
    loop {
        let delivered = match recv_msg(w.group(), src) {
            Ok(Msg::Stop) => {
                let _ = ended.send(Ok(()));
                return;
            }
            Ok(Msg::Heartbeat) => true,
            Ok(Msg::Vision(j)) => ends.vision.0.send(j).is_ok(),
            Ok(Msg::Shard(i, m)) => ends.shards.get(i).is_some_and(|(tx, _)| tx.send(m).is_ok()),
            Ok(Msg::Diffusion(j)) => ends.diffusion.0.send(j).is_ok(),
            Ok(Msg::Inbox(Inbox::WorkerFailed(f))) => {
                on_lost(&Report::Failed(f));
                true
            }
            Ok(Msg::Inbox(Inbox::WorkerRestarted(r))) => {
                on_lost(&Report::Restarted(r));
                true
            }
            Ok(Msg::Inbox(m)) => ends.inbox.0.send(m).is_ok(),
            Err(e) => {
                let f = Failure {
                    actor: format!("rank {src}"),
                    error: e.to_string(),
                    restarting: false,
                };
                if !stop.load(Ordering::SeqCst) {
                    tracing::error!(rank = src, error = %f.error, "lost a peer of the service");
                    on_lost(&Report::Failed(f.clone()));
                }
                let _ = ended.send(Err(f));
                return;
            }
        };
        if !delivered {
            tracing::warn!(
                rank = src,
                "a message arrived for a channel that is closed here"
            );
        }
    }
}

impl Bridge {
    /// Starts a forwarder to and a receiver from every other rank; `on_lost` hears a peer lost, and a peer's own workers failed or rebuilt.
    pub fn start(w: &ServeWorld, ends: Ends, on_lost: OnReport) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let ends = Arc::new(ends);
        let (tx, ended) = flume::unbounded();
        let mut threads = Vec::new();
        for peer in (0..w.group().size as u32).filter(|&r| r != w.rank()) {
            let (w1, e1, s1, l1) = (w.clone(), ends.clone(), stop.clone(), on_lost.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("deem-serve-to-{peer}"))
                    .spawn(move || forward(peer, w1, e1, s1, l1))?,
            );
            let (w2, e2, s2, l2, t2) = (
                w.clone(),
                ends.clone(),
                stop.clone(),
                on_lost.clone(),
                tx.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("deem-serve-from-{peer}"))
                    .spawn(move || receive(peer, w2, e2, s2, l2, t2))?,
            );
        }
        Ok(Bridge {
            stop,
            threads,
            ended,
        })
    }

    /// Blocks until a peer stops (`Ok`) or is lost.
    pub fn wait_end(&self) -> Result<(), Failure> {
        self.ended.recv().unwrap_or(Ok(()))
    }

    /// Tells every peer this process stops, and waits for its threads (each receiver ends when its
    /// peer stops too, or is lost).
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
