//! The generation actors: one ractor actor per topology entry (vision, each LLM shard, diffusion), each
//! in front of a compute thread that owns the modules, the device and — for the shards — the KV caches of
//! every sequence it serves. The actor answers control messages (status); work and results flow through
//! flume channels between the compute threads: scheduler → shard 0 → … → last shard → scheduler, and
//! scheduler ⇄ vision, scheduler ⇄ diffusion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use deem::llama::{KvPool, LlamaShard};
use deem::model::{embed_for_generation, DiffusionStage, SpecialIds, VisionStage};
use deem::sampling::{sample_slice, SamplingParams};
use flume::{Receiver, Sender};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tch::{Kind, Tensor};
use uuid::Uuid;

use crate::metrics::{ServeMetrics, ShardLabels};

/// How the next token of a row is drawn (last shard).
pub struct SampleSpec {
    pub params: Arc<SamplingParams>,
    /// Ids in the context, for the repetition penalty.
    pub seen: Vec<i64>,
    /// Ids that may not be sampled.
    pub banned: Vec<i64>,
    /// Index of the token in the response (keys the random draw).
    pub index: u64,
}

/// One sequence's part of a decode tick.
pub struct RowMeta {
    pub seq: Uuid,
    /// Position of the row's first input (the sequence's cached length).
    pub start: i64,
    pub sample: Option<SampleSpec>,
    /// Return the NIP context: the last shard's hidden states from this position to the row's last,
    /// nearest first (the row feeds `<|startofimage|>`).
    pub context_from: Option<i64>,
}

/// What the first shard embeds for a row.
pub enum RowInput {
    /// Token ids, with the visual tokens [N, K, L] of the images whose placeholders they hold.
    Ids {
        ids: Vec<i64>,
        visual: Option<Tensor>,
    },
    /// Ready embeddings [T, L]: the visual tokens of an image the model just drew.
    Embeds(Tensor),
}

pub enum ShardIn {
    Tick {
        group: usize,
        rows: Vec<RowMeta>,
        /// First shard only.
        inputs: Vec<RowInput>,
        /// Later shards: each row's hidden states [1, T, L].
        hidden: Vec<Tensor>,
        /// An earlier shard failed this tick; pass it on.
        error: Option<String>,
    },
    /// Drop these sequences' caches (passed down the pipeline, after any tick that used them).
    Free(Vec<Uuid>),
}

pub struct RowOut {
    pub seq: Uuid,
    pub token: Option<i64>,
    pub context: Option<Tensor>,
}

/// Results coming back to the scheduler.
pub enum Inbox {
    Tick {
        group: usize,
        out: Result<Vec<RowOut>, String>,
    },
    Encoded {
        seq: Uuid,
        generated: bool,
        /// Visual tokens [N, K, L] and CSR conditions [N, Q, C].
        out: Result<(Tensor, Tensor), String>,
    },
    Drawn {
        seq: Uuid,
        /// Pixels [3, H, W] in [0, 1] and their PNG.
        out: Result<(Tensor, Vec<u8>), String>,
    },
    Scored {
        seq: Uuid,
        out: Result<Vec<f64>, String>,
    },
}

pub struct VisionJob {
    pub seq: Uuid,
    /// [N, 3, H, W] in [0, 1].
    pub pixels: Tensor,
    pub generated: bool,
}

pub enum DiffusionJob {
    Draw {
        seq: Uuid,
        /// NIP context [N, L], nearest position first.
        context: Tensor,
        steps: i64,
        guidance: f64,
        seed: u64,
        /// The image's index in its response (keys the initial noise).
        image: u64,
    },
    Score {
        seq: Uuid,
        cond: Tensor,
        pixels: Tensor,
        timesteps: Vec<i64>,
    },
}

/// What an actor reports about its compute thread.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkerStatus {
    pub name: String,
    pub device: String,
    /// Sequences whose state it holds (shards).
    pub sequences: usize,
    pub kv_cache_bytes: u64,
    pub jobs: u64,
}

pub type SharedStatus = Arc<Mutex<WorkerStatus>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut WorkerStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s)
    }
}

pub enum ShardNext {
    Shard(Sender<ShardIn>),
    Scheduler(Sender<Inbox>),
}

/// An LLM shard's compute loop.
pub struct ShardWorker {
    pub name: String,
    pub shard: LlamaShard,
    pub ids: SpecialIds,
    pub device: tch::Device,
    pub input: Receiver<ShardIn>,
    pub next: ShardNext,
    pub metrics: ServeMetrics,
    pub status: SharedStatus,
    /// Sequences the shard holds at once (its KV pool's slots).
    pub slots: i64,
}

struct ShardState {
    pool: KvPool,
    /// Each sequence's pool slot and cached length.
    seqs: HashMap<Uuid, (i64, i64)>,
    free: Vec<i64>,
    /// Last shard: each sequence's normed hidden states, in chunks of [T, L], for NIP contexts.
    hidden: HashMap<Uuid, Vec<Tensor>>,
}

impl ShardState {
    fn bytes(&self) -> u64 {
        let h: u64 = self
            .hidden
            .values()
            .flatten()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        h + self.seqs.values().map(|&(_, len)| len as u64).sum::<u64>()
            * self.pool.bytes_per_position
    }
}

impl ShardWorker {
    pub fn run(self) {
        let mut st = ShardState {
            pool: self.shard.new_pool(self.slots),
            seqs: HashMap::new(),
            free: (0..self.slots).rev().collect(),
            hidden: HashMap::new(),
        };
        // A clone of the gauge (it shares the value): holding the family's guard would block the
        // other shards from creating theirs.
        let gauge = self
            .metrics
            .kv_cache_bytes
            .get_or_create(&ShardLabels {
                shard: self.name.clone(),
            })
            .clone();
        while let Ok(msg) = self.input.recv() {
            match msg {
                ShardIn::Free(seqs) => {
                    for s in &seqs {
                        if let Some((slot, _)) = st.seqs.remove(s) {
                            st.free.push(slot);
                        }
                        st.hidden.remove(s);
                    }
                    if let ShardNext::Shard(tx) = &self.next {
                        let _ = tx.send(ShardIn::Free(seqs));
                    }
                }
                ShardIn::Tick {
                    group,
                    rows,
                    inputs,
                    hidden,
                    error,
                } => {
                    let result = match error {
                        Some(e) => Err(e),
                        None => tch::no_grad(|| self.layers(&mut st, &rows, inputs, hidden)),
                    };
                    match &self.next {
                        ShardNext::Shard(tx) => {
                            let (hidden, error) = match result {
                                Ok(h) => (h, None),
                                Err(e) => (vec![], Some(e)),
                            };
                            let _ = tx.send(ShardIn::Tick {
                                group,
                                rows,
                                inputs: vec![],
                                hidden,
                                error,
                            });
                        }
                        ShardNext::Scheduler(tx) => {
                            let out = result
                                .and_then(|h| tch::no_grad(|| self.finish(&mut st, &rows, h)));
                            let _ = tx.send(Inbox::Tick { group, out });
                        }
                    }
                }
            }
            let bytes = st.bytes();
            gauge.set(bytes as i64);
            update(&self.status, |s| {
                s.sequences = st.seqs.len();
                s.kv_cache_bytes = bytes;
                s.jobs += 1;
            });
        }
    }

    /// This shard's layers over every row; single-token rows run as one batch.
    fn layers(
        &self,
        st: &mut ShardState,
        rows: &[RowMeta],
        inputs: Vec<RowInput>,
        hidden: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, String> {
        let dev = self.device;
        let xs: Vec<Tensor> = if self.shard.is_first() {
            // Single-token rows are embedded in one lookup.
            let singles: Vec<(usize, i64)> = inputs
                .iter()
                .enumerate()
                .filter_map(|(i, inp)| match inp {
                    RowInput::Ids { ids, visual: None } if ids.len() == 1 => Some((i, ids[0])),
                    _ => None,
                })
                .collect();
            let mut xs: Vec<Option<Tensor>> = (0..inputs.len()).map(|_| None).collect();
            if !singles.is_empty() {
                let ids: Vec<i64> = singles.iter().map(|&(_, id)| id).collect();
                let ids = Tensor::from_slice(&ids).to_device(dev).unsqueeze(1);
                let e = embed_for_generation(&self.shard, &ids, None, self.ids)
                    .map_err(|e| format!("{}: {e}", self.name))?;
                for (k, &(i, _)) in singles.iter().enumerate() {
                    xs[i] = Some(e.narrow(0, k as i64, 1));
                }
            }
            for (i, inp) in inputs.into_iter().enumerate() {
                if xs[i].is_some() {
                    continue;
                }
                xs[i] = Some(match inp {
                    RowInput::Ids { ids, visual } => {
                        let ids = Tensor::from_slice(&ids).to_device(dev).unsqueeze(0);
                        let visual = visual.map(|v| v.to_device(dev));
                        embed_for_generation(&self.shard, &ids, visual.as_ref(), self.ids)
                            .map_err(|e| format!("{}: {e}", self.name))?
                    }
                    RowInput::Embeds(e) => e.to_device(dev).unsqueeze(0),
                });
            }
            xs.into_iter()
                .map(|x| x.expect("every row embedded"))
                .collect()
        } else {
            hidden.into_iter().map(|h| h.to_device(dev)).collect()
        };
        if xs.len() != rows.len() {
            return Err(format!(
                "{}: a tick of {} rows came with {} inputs",
                self.name,
                rows.len(),
                xs.len()
            ));
        }
        // Each row's slot, checking that it continues where its cache ends.
        let mut slots = Vec::with_capacity(rows.len());
        for (r, x) in rows.iter().zip(&xs) {
            let (slot, len) = match st.seqs.get(&r.seq) {
                Some(&e) => e,
                None => {
                    let slot = st.free.pop().ok_or_else(|| {
                        format!(
                            "{}: all {} KV slots are taken (serve.max_running)",
                            self.name, self.slots
                        )
                    })?;
                    st.seqs.insert(r.seq, (slot, 0));
                    (slot, 0)
                }
            };
            let t = x.size()[1];
            let room = self.shard.cfg.max_position_embeddings;
            if len != r.start || r.start + t > room {
                return Err(format!(
                    "{}: sequence {} continues at position {} with {t} positions, but its cache holds {len} (of at most {room})",
                    self.name, r.seq, r.start
                ));
            }
            slots.push(slot);
        }
        let mut out: Vec<Option<Tensor>> = (0..rows.len()).map(|_| None).collect();
        let singles: Vec<usize> = (0..rows.len()).filter(|&i| xs[i].size()[1] == 1).collect();
        if !singles.is_empty() {
            let x = Tensor::cat(&singles.iter().map(|&i| &xs[i]).collect::<Vec<_>>(), 0);
            let sl: Vec<i64> = singles.iter().map(|&i| slots[i]).collect();
            let pos: Vec<i64> = singles.iter().map(|&i| rows[i].start).collect();
            let h = self.shard.forward_slots(&x, &sl, &pos, &mut st.pool);
            for (k, &i) in singles.iter().enumerate() {
                out[i] = Some(h.narrow(0, k as i64, 1));
            }
        }
        for i in 0..rows.len() {
            if out[i].is_none() {
                out[i] =
                    Some(
                        self.shard
                            .forward_slot(&xs[i], slots[i], rows[i].start, &mut st.pool),
                    );
            }
        }
        for (r, x) in rows.iter().zip(&xs) {
            if let Some(e) = st.seqs.get_mut(&r.seq) {
                e.1 = r.start + x.size()[1];
            }
        }
        Ok(out
            .into_iter()
            .map(|h| h.expect("every row computed"))
            .collect())
    }

    /// Last shard: norm, keep the hidden states, sample, and cut NIP contexts.
    fn finish(
        &self,
        st: &mut ShardState,
        rows: &[RowMeta],
        hidden: Vec<Tensor>,
    ) -> Result<Vec<RowOut>, String> {
        let normed: Vec<Tensor> = hidden.iter().map(|h| self.shard.norm(h)).collect();
        let last: Vec<Tensor> = normed
            .iter()
            .map(|n| n.narrow(1, n.size()[1] - 1, 1).squeeze_dim(1))
            .collect();
        // Read back once for the whole tick; each row samples from its slice.
        let logits = self.shard.logits(&Tensor::cat(&last, 0));
        let vocab = logits.size()[1] as usize;
        let flat: Vec<f64> = Vec::try_from(
            logits
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Double)
                .reshape([-1]),
        )
        .map_err(|e| format!("{}: reading the logits: {e}", self.name))?;
        let mut out = Vec::with_capacity(rows.len());
        for (i, (r, n)) in rows.iter().zip(&normed).enumerate() {
            let log = st.hidden.entry(r.seq).or_default();
            log.push(n.get(0));
            let context = match r.context_from {
                Some(from) => {
                    let all = Tensor::cat(log, 0);
                    let end = all.size()[0];
                    if from < 0 || from >= end {
                        return Err(format!(
                            "{}: NIP context from position {from}, but sequence {} has {end}",
                            self.name, r.seq
                        ));
                    }
                    let ctx = all.narrow(0, from, end - from).flip([0]);
                    *log = vec![all];
                    Some(ctx)
                }
                None => None,
            };
            let token = r.sample.as_ref().map(|s| {
                let row = flat[i * vocab..(i + 1) * vocab].to_vec();
                sample_slice(row, &s.params, &s.seen, &s.banned, s.index)
            });
            out.push(RowOut {
                seq: r.seq,
                token,
                context,
            });
        }
        Ok(out)
    }
}

/// The vision actor's compute loop: images → visual tokens and CSR conditions.
pub struct VisionWorker {
    pub stage: VisionStage,
    pub device: tch::Device,
    pub input: Receiver<VisionJob>,
    pub output: Sender<Inbox>,
    pub status: SharedStatus,
}

impl VisionWorker {
    pub fn run(self) {
        while let Ok(job) = self.input.recv() {
            let out = tch::no_grad(|| {
                let (v, c) = self.stage.forward(&job.pixels.to_device(self.device));
                Ok((v, c))
            });
            let _ = self.output.send(Inbox::Encoded {
                seq: job.seq,
                generated: job.generated,
                out,
            });
            update(&self.status, |s| s.jobs += 1);
        }
    }
}

/// The diffusion actor's compute loop: draws images (waiting draws with the same steps and guidance run
/// as one batch, guidance as one doubled batch) and scores input images by their CSR loss.
pub struct DiffusionWorker {
    pub stage: DiffusionStage,
    pub device: tch::Device,
    pub input: Receiver<DiffusionJob>,
    pub output: Sender<Inbox>,
    pub metrics: ServeMetrics,
    pub status: SharedStatus,
    pub max_batch: usize,
}

struct Draw {
    seq: Uuid,
    context: Tensor,
    seed: u64,
    image: u64,
}

impl DiffusionWorker {
    pub fn run(self) {
        while let Ok(first) = self.input.recv() {
            let mut jobs = vec![first];
            while jobs.len() < self.max_batch {
                match self.input.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let mut draws: Vec<((i64, u64), Draw)> = Vec::new();
            for job in jobs {
                match job {
                    DiffusionJob::Score {
                        seq,
                        cond,
                        pixels,
                        timesteps,
                    } => {
                        let scores = tch::no_grad(|| {
                            self.stage.csr_scores(
                                &cond.to_device(self.device),
                                &pixels.to_device(self.device),
                                &timesteps,
                                0,
                            )
                        });
                        let _ = self.output.send(Inbox::Scored {
                            seq,
                            out: Ok(scores),
                        });
                    }
                    DiffusionJob::Draw {
                        seq,
                        context,
                        steps,
                        guidance,
                        seed,
                        image,
                    } => draws.push((
                        (steps, guidance.to_bits()),
                        Draw {
                            seq,
                            context,
                            seed,
                            image,
                        },
                    )),
                }
            }
            while !draws.is_empty() {
                let key = draws[0].0;
                let (batch, rest): (Vec<_>, Vec<_>) =
                    draws.into_iter().partition(|(k, _)| *k == key);
                draws = rest;
                let batch: Vec<Draw> = batch.into_iter().map(|(_, d)| d).collect();
                self.draw(key.0, f64::from_bits(key.1), batch);
            }
            update(&self.status, |s| s.jobs += 1);
        }
    }

    fn draw(&self, steps: i64, guidance: f64, batch: Vec<Draw>) {
        let dev = self.device;
        let maxlen = batch.iter().map(|d| d.context.size()[0]).max().unwrap_or(1);
        let ctx: Vec<Tensor> = batch
            .iter()
            .map(|d| {
                let c = d.context.to_device(dev);
                c.constant_pad_nd([0, 0, 0, maxlen - c.size()[0]])
            })
            .collect();
        let mask: Vec<Tensor> = batch
            .iter()
            .map(|d| {
                let n = d.context.size()[0];
                Tensor::cat(
                    &[
                        Tensor::ones([n], (Kind::Bool, dev)),
                        Tensor::zeros([maxlen - n], (Kind::Bool, dev)),
                    ],
                    0,
                )
            })
            .collect();
        let noise: Vec<Tensor> = batch
            .iter()
            .map(|d| self.stage.initial_noise(d.seed, d.image).to_device(dev))
            .collect();
        let mut last = Instant::now();
        let hist = &self.metrics.diffusion_step_seconds;
        let pixels = self.stage.draw(
            &Tensor::stack(&ctx, 0),
            &Tensor::stack(&mask, 0),
            &Tensor::stack(&noise, 0),
            steps,
            guidance,
            || {
                hist.observe(last.elapsed().as_secs_f64());
                last = Instant::now();
            },
        );
        for (i, d) in batch.iter().enumerate() {
            let p = pixels.get(i as i64);
            let out = deem::vision::png_bytes(&p).map(|png| (p, png));
            let _ = self.output.send(Inbox::Drawn { seq: d.seq, out });
        }
    }
}

/// Control messages of a generation actor.
pub enum WorkerMsg {
    Status(RpcReplyPort<WorkerStatus>),
}

/// A generation actor: owns its compute thread (which builds the modules before the actor is up).
pub struct WorkerActor;

/// The loop a compute thread runs until its input closes.
pub type Loop = Box<dyn FnOnce() + Send>;
/// Builds an actor's modules on its compute thread and returns its loop.
pub type Build = Box<dyn FnOnce() -> Result<Loop, String> + Send>;

pub struct WorkerArgs {
    pub name: String,
    pub status: SharedStatus,
    pub body: Build,
}

pub struct WorkerState {
    status: SharedStatus,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Actor for WorkerActor {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerState, ActorProcessingErr> {
        let (ready_tx, ready_rx) = flume::bounded::<Result<(), String>>(1);
        let body = args.body;
        let thread = std::thread::Builder::new()
            .name(format!("deem-serve-{}", args.name))
            .spawn(move || match body() {
                Ok(run) => {
                    let _ = ready_tx.send(Ok(()));
                    run()
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        match ready_rx.recv_async().await {
            Ok(Ok(())) => Ok(WorkerState {
                status: args.status,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(format!("actor {}: {e}", args.name).into()),
            Err(_) => Err(format!(
                "actor {}: the compute thread died while building",
                args.name
            )
            .into()),
        }
    }

    async fn handle(
        &self,
        _me: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Status(reply) => {
                let s = state.status.lock().map(|s| s.clone()).unwrap_or_default();
                let _ = reply.send(s);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<WorkerMsg>,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        // The thread ends once its input channel closes (the scheduler stopped first).
        if let Some(t) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        Ok(())
    }
}
