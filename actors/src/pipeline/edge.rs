//! The ends of one DAG edge, after PyTorch pipelining's P2P stage communication: between two stages of
//! one process a bounded flume channel; between processes a c10d point-to-point stream on the edge's own
//! tag ([`crate::dist::wire`] frames). A remote send is started at once and waited for later, at most
//! `capacity` in flight — the same backpressure as the channel's bound — so two neighbours sending to
//! each other (1F1B) never deadlock on Gloo's rendezvous sends. [`Links`] holds a stage's ends.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flume::{Receiver, Sender};
use tch::Tensor;

use super::error::PipelineError;
use crate::dist::wire::{self, Header};
use crate::dist::{Group, Pending};

/// The far end of a cross-process edge.
#[derive(Clone)]
pub struct Remote {
    pub group: Arc<Group>,
    /// The peer's rank in `group`.
    pub peer: i64,
    /// The edge's tag (unique per ordered pair of stages).
    pub tag: i32,
    /// The edge's name, checked by the receiver.
    pub edge: String,
}

/// Bytes and seconds one remote end moved (p2p accounting).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub bytes: u64,
    pub seconds: f64,
}

pub struct RemoteTx {
    remote: Remote,
    capacity: usize,
    in_flight: Mutex<(VecDeque<Vec<Pending>>, Traffic)>,
}

/// The sending end of an edge.
pub enum EdgeTx {
    Local(Sender<Packet>),
    Remote(RemoteTx),
}

/// The receiving end of an edge.
pub enum EdgeRx {
    Local(Receiver<Packet>),
    Remote(Remote, Mutex<Traffic>),
}

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Bytes of the tensors a packet carries.
pub fn bytes_of(tensors: &Option<Vec<Tensor>>) -> u64 {
    tensors
        .iter()
        .flatten()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum()
}

fn wait_all(ps: Vec<Pending>) -> Result<()> {
    for p in ps {
        p.wait()?;
    }
    Ok(())
}

fn poisoned() -> PipelineError {
    PipelineError::Stage {
        stage: "edge".into(),
        message: "a sender panicked while holding the edge".into(),
    }
}

impl EdgeTx {
    /// A cross-process sender with at most `capacity` messages in flight.
    pub fn remote(remote: Remote, capacity: usize) -> Self {
        EdgeTx::Remote(RemoteTx {
            remote,
            capacity: capacity.max(1),
            in_flight: Mutex::new((VecDeque::new(), Traffic::default())),
        })
    }

    /// Sends `p`; a closed channel or a failed peer is an error message.
    pub fn send(&self, p: Packet) -> Result<()> {
        match self {
            EdgeTx::Local(tx) => tx.send(p).map_err(|_| PipelineError::ChannelClosed),
            EdgeTx::Remote(r) => {
                let started = Instant::now();
                let header = Header {
                    edge: r.remote.edge.clone(),
                    seq: p.mb as u64,
                    id: *p.id.as_bytes(),
                    tensors: None,
                    index: p.index.clone(),
                    trace: format!("mb {} id {}", p.mb, p.id),
                };
                let bytes = bytes_of(&p.tensors);
                let pending = wire::send(
                    &r.remote.group,
                    r.remote.peer,
                    r.remote.tag,
                    header,
                    p.tensors.as_deref(),
                )?;
                let mut guard = r.in_flight.lock().map_err(|_| poisoned())?;
                guard.0.push_back(pending);
                while guard.0.len() > r.capacity {
                    if let Some(oldest) = guard.0.pop_front() {
                        wait_all(oldest)?;
                    }
                }
                guard.1.bytes += bytes;
                guard.1.seconds += started.elapsed().as_secs_f64();
                Ok(())
            }
        }
    }

    /// Messages queued (channel) or in flight (remote).
    pub fn depth(&self) -> usize {
        match self {
            EdgeTx::Local(tx) => tx.len(),
            EdgeTx::Remote(r) => r.in_flight.lock().map_or(0, |g| g.0.len()),
        }
    }

    /// Waits for every remote send in flight (the end of a step); returns and resets the traffic.
    pub fn flush(&self) -> Result<Option<Traffic>> {
        let EdgeTx::Remote(r) = self else {
            return Ok(None);
        };
        let started = Instant::now();
        let mut guard = r.in_flight.lock().map_err(|_| poisoned())?;
        while let Some(ps) = guard.0.pop_front() {
            wait_all(ps)?;
        }
        guard.1.seconds += started.elapsed().as_secs_f64();
        Ok(Some(std::mem::take(&mut guard.1)))
    }
}

impl EdgeRx {
    pub fn remote(remote: Remote) -> Self {
        EdgeRx::Remote(remote, Mutex::new(Traffic::default()))
    }

    /// The next packet; the wait is bounded by the group's timeout for a remote edge.
    pub fn recv(&self, device: tch::Device) -> Result<Packet> {
        match self {
            EdgeRx::Local(rx) => rx.recv().map_err(|_| PipelineError::ChannelClosed),
            EdgeRx::Remote(r, traffic) => {
                let started = Instant::now();
                let (h, tensors) = wire::recv(&r.group, r.peer, r.tag, &r.edge, device)?;
                if let Ok(mut t) = traffic.lock() {
                    t.bytes += bytes_of(&tensors);
                    t.seconds += started.elapsed().as_secs_f64();
                }
                Ok(Packet {
                    mb: h.seq as u32,
                    id: uuid::Uuid::from_bytes(h.id),
                    tensors,
                    index: h.index,
                })
            }
        }
    }

    /// Returns and resets what a remote end received.
    pub fn take_traffic(&self) -> Option<Traffic> {
        match self {
            EdgeRx::Local(_) => None,
            EdgeRx::Remote(_, t) => t.lock().ok().map(|mut t| std::mem::take(&mut *t)),
        }
    }
}

/// An activation or gradient on an edge; `None` when the microbatch has nothing for this edge (no images,
/// no NIP context, a loss term the stage does not train).
pub struct Packet {
    pub mb: u32,
    /// The microbatch's id (unique per step and microbatch), checked by the receiver.
    pub id: uuid::Uuid,
    pub tensors: Option<Vec<Tensor>>,
    /// The images a NIP context draws (last shard → diffusion).
    pub index: Vec<i64>,
}

impl Packet {
    /// A packet of microbatch `mb` (`id`) carrying `tensors` (no NIP image index).
    pub fn new(mb: u32, id: uuid::Uuid, tensors: Option<Vec<Tensor>>) -> Self {
        Packet {
            mb,
            id,
            tensors,
            index: vec![],
        }
    }
}

/// The edge ends of one stage (unused ones are `None`).
#[derive(Default)]
pub struct Links {
    /// Vision: to the first shard. Shards: to the next shard, or from the last to diffusion (NIP).
    pub fwd_out: Option<EdgeTx>,
    /// Vision → diffusion: the CSR condition.
    pub csr_out: Option<EdgeTx>,
    /// Shards: from vision or the previous shard. Diffusion: from the last shard (NIP).
    pub fwd_in: Option<EdgeRx>,
    /// Diffusion: from vision.
    pub csr_in: Option<EdgeRx>,
    /// Gradient of what `fwd_out` sent, coming back.
    pub grad_in: Option<EdgeRx>,
    /// Vision: gradient of the CSR condition, from diffusion.
    pub csr_grad_in: Option<EdgeRx>,
    /// Gradient of what `fwd_in` delivered, going back.
    pub grad_out: Option<EdgeTx>,
    /// Diffusion: gradient of the CSR condition, to vision.
    pub csr_grad_out: Option<EdgeTx>,
}

impl Links {
    /// Waits for every cross-process send in flight; returns what each cross-process end moved, by
    /// edge (`"<stage>: <edge> out|in"`).
    pub(super) fn settle(&self, name: &str) -> Result<BTreeMap<String, Traffic>> {
        let mut out = BTreeMap::new();
        let txs = [
            ("forward", &self.fwd_out),
            ("vision→diffusion", &self.csr_out),
            ("gradient out", &self.grad_out),
            ("csr gradient out", &self.csr_grad_out),
        ];
        for (edge, tx) in txs {
            if let Some(t) = tx.as_ref() {
                if let Some(traffic) = t
                    .flush()
                    .map_err(|e| PipelineError::stage(name, format!("the {edge} edge: {e}")))?
                {
                    out.insert(format!("{name}: {edge} out"), traffic);
                }
            }
        }
        let rxs = [
            ("forward", &self.fwd_in),
            ("csr input", &self.csr_in),
            ("gradient in", &self.grad_in),
            ("csr gradient in", &self.csr_grad_in),
        ];
        for (edge, rx) in rxs {
            if let Some(traffic) = rx.as_ref().and_then(EdgeRx::take_traffic) {
                out.insert(format!("{name}: {edge} in"), traffic);
            }
        }
        Ok(out)
    }
}
