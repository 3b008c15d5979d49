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
use deem::sampling::{sample_slice, top_log_probs, SamplingParams};
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
    /// Beam search: instead of drawing, return this many most likely ids with their log-probabilities
    /// (0 = draw).
    pub beam: usize,
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
        /// Later shards: the rows' hidden states.
        hidden: Hidden,
        /// An earlier shard failed this tick; pass it on.
        error: Option<String>,
    },
    /// Drop these sequences' caches (passed down the pipeline, after any tick that used them).
    Free(Vec<Uuid>),
    /// Copy each `(from, to)`: `to` starts with `from`'s cache (a beam hypothesis forking; passed down
    /// the pipeline before the next tick).
    Fork(Vec<(Uuid, Uuid)>),
}

/// A tick's hidden states between shards: the single-token rows as one batch, the others one by one.
#[derive(Default)]
pub struct Hidden {
    /// Row indices of the batched rows, and their states [B, 1, L].
    pub batch: Option<(Vec<usize>, Tensor)>,
    /// The other rows' states [1, T, L], by row index.
    pub rows: Vec<(usize, Tensor)>,
}

pub struct RowOut {
    pub seq: Uuid,
    pub token: Option<i64>,
    /// Beam rows: the most likely next ids with their log-probabilities, best first.
    pub top: Vec<(i64, f64)>,
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
    /// Region input: [N, 1, H, W] in [0, 1] (see [`deem::model::Batch::masks`]).
    pub masks: Option<Tensor>,
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
        masks: Option<Tensor>,
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
    /// Last shard: each sequence's normed hidden states, for NIP contexts.
    hidden: HashMap<Uuid, Vec<Chunk>>,
}

impl ShardState {
    fn bytes(&self) -> u64 {
        let h: u64 = self.hidden.values().flatten().map(Chunk::bytes).sum();
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
                ShardIn::Fork(pairs) => {
                    for &(from, to) in &pairs {
                        self.fork(&mut st, from, to);
                    }
                    if let ShardNext::Shard(tx) = &self.next {
                        let _ = tx.send(ShardIn::Fork(pairs));
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
                                Err(e) => (Hidden::default(), Some(e)),
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

    /// Gives `to` a slot holding a copy of `from`'s cache (and, on the last shard, its hidden-state log).
    /// Without a free slot `to` stays unknown, and its next tick fails naming the missing cache.
    fn fork(&self, st: &mut ShardState, from: Uuid, to: Uuid) {
        let Some(&(src, len)) = st.seqs.get(&from) else {
            tracing::error!(shard = %self.name, %from, "fork from a sequence this shard does not hold");
            return;
        };
        let Some(slot) = st.free.pop() else {
            tracing::error!(shard = %self.name, "no free KV slot to fork a beam into (serve.max_running)");
            return;
        };
        tch::no_grad(|| st.pool.copy_slot(src, slot, len));
        st.seqs.insert(to, (slot, len));
        if let Some(log) = st.hidden.get(&from) {
            let copy = log.iter().map(Chunk::share).collect();
            st.hidden.insert(to, copy);
        }
    }

    /// This shard's layers over every row; single-token rows run as one batch.
    fn layers(
        &self,
        st: &mut ShardState,
        rows: &[RowMeta],
        inputs: Vec<RowInput>,
        hidden: Hidden,
    ) -> Result<Hidden, String> {
        let dev = self.device;
        let input = if self.shard.is_first() {
            self.embed(inputs)?
        } else {
            Hidden {
                batch: hidden.batch.map(|(ix, t)| (ix, t.to_device(dev))),
                rows: hidden
                    .rows
                    .into_iter()
                    .map(|(i, t)| (i, t.to_device(dev)))
                    .collect(),
            }
        };
        // Each row's length this tick, then its slot, checking it continues where its cache ends.
        let mut len_of = vec![0i64; rows.len()];
        if let Some((ix, _)) = &input.batch {
            ix.iter().for_each(|&i| len_of[i] = 1);
        }
        input
            .rows
            .iter()
            .for_each(|(i, t)| len_of[*i] = t.size()[1]);
        let room = self.shard.cfg.max_position_embeddings;
        let mut slots = Vec::with_capacity(rows.len());
        for (r, &t) in rows.iter().zip(&len_of) {
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
            if t == 0 || len != r.start || r.start + t > room {
                return Err(format!(
                    "{}: sequence {} continues at position {} with {t} positions, but its cache holds {len} (of at most {room})",
                    self.name, r.seq, r.start
                ));
            }
            slots.push(slot);
        }
        let batch = input.batch.map(|(ix, x)| {
            let sl: Vec<i64> = ix.iter().map(|&i| slots[i]).collect();
            let pos: Vec<i64> = ix.iter().map(|&i| rows[i].start).collect();
            let h = self.shard.forward_slots(&x, &sl, &pos, &mut st.pool);
            (ix, h)
        });
        let others = input
            .rows
            .into_iter()
            .map(|(i, x)| {
                let h = self
                    .shard
                    .forward_slot(&x, slots[i], rows[i].start, &mut st.pool);
                (i, h)
            })
            .collect();
        for (r, t) in rows.iter().zip(len_of) {
            if let Some(e) = st.seqs.get_mut(&r.seq) {
                e.1 = r.start + t;
            }
        }
        Ok(Hidden {
            batch,
            rows: others,
        })
    }

    /// First shard: single-token rows embedded in one lookup, the others one by one.
    fn embed(&self, inputs: Vec<RowInput>) -> Result<Hidden, String> {
        let dev = self.device;
        let mut ix = Vec::new();
        let mut ids = Vec::new();
        let mut out = Hidden::default();
        for (i, inp) in inputs.into_iter().enumerate() {
            match inp {
                RowInput::Ids {
                    ids: t,
                    visual: None,
                } if t.len() == 1 => {
                    ix.push(i);
                    ids.push(t[0]);
                }
                RowInput::Ids { ids: t, visual } => {
                    let t = Tensor::from_slice(&t).to_device(dev).unsqueeze(0);
                    let visual = visual.map(|v| v.to_device(dev));
                    let e = embed_for_generation(&self.shard, &t, visual.as_ref(), self.ids)
                        .map_err(|e| format!("{}: {e}", self.name))?;
                    out.rows.push((i, e));
                }
                RowInput::Embeds(e) => out.rows.push((i, e.to_device(dev).unsqueeze(0))),
            }
        }
        if !ix.is_empty() {
            let t = Tensor::from_slice(&ids).to_device(dev).unsqueeze(1);
            let e = embed_for_generation(&self.shard, &t, None, self.ids)
                .map_err(|e| format!("{}: {e}", self.name))?;
            out.batch = Some((ix, e));
        }
        Ok(out)
    }

    /// Last shard: norm, keep the hidden states, sample, and cut NIP contexts.
    fn finish(
        &self,
        st: &mut ShardState,
        rows: &[RowMeta],
        hidden: Hidden,
    ) -> Result<Vec<RowOut>, String> {
        // The last position of every row, batched rows first, read back once for sampling.
        let mut order: Vec<usize> = Vec::with_capacity(rows.len());
        let mut last: Vec<Tensor> = Vec::new();
        if let Some((ix, h)) = &hidden.batch {
            let n = self.shard.norm(h); // [B, 1, L]
            for (k, &i) in ix.iter().enumerate() {
                order.push(i);
                st.hidden
                    .entry(rows[i].seq)
                    .or_default()
                    .push(Chunk::Row(n.shallow_clone(), k as i64));
            }
            last.push(n.squeeze_dim(1));
        }
        for (i, h) in &hidden.rows {
            let n = self.shard.norm(h).get(0); // [T, L]
            order.push(*i);
            last.push(n.narrow(0, n.size()[0] - 1, 1));
            st.hidden
                .entry(rows[*i].seq)
                .or_default()
                .push(Chunk::Whole(n));
        }
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
        for (k, &i) in order.iter().enumerate() {
            let r = &rows[i];
            let context = match r.context_from {
                Some(from) => {
                    let log = st.hidden.entry(r.seq).or_default();
                    let all =
                        Tensor::cat(&log.iter().map(Chunk::materialize).collect::<Vec<_>>(), 0);
                    let end = all.size()[0];
                    if from < 0 || from >= end {
                        return Err(format!(
                            "{}: NIP context from position {from}, but sequence {} has {end}",
                            self.name, r.seq
                        ));
                    }
                    let ctx = all.narrow(0, from, end - from).flip([0]);
                    *log = vec![Chunk::Whole(all)];
                    Some(ctx)
                }
                None => None,
            };
            let (mut token, mut top) = (None, Vec::new());
            if let Some(s) = &r.sample {
                let row = flat[k * vocab..(k + 1) * vocab].to_vec();
                if s.beam > 0 {
                    top = top_log_probs(row, &s.params, &s.seen, &s.banned, s.beam);
                } else {
                    token = Some(sample_slice(row, &s.params, &s.seen, &s.banned, s.index));
                }
            }
            out.push(RowOut {
                seq: r.seq,
                token,
                top,
                context,
            });
        }
        Ok(out)
    }
}

/// A piece of a sequence's hidden-state log on the last shard.
enum Chunk {
    /// [T, L].
    Whole(Tensor),
    /// Row k of a decode batch [B, 1, L] (shared, so logging costs no copy).
    Row(Tensor, i64),
}

impl Chunk {
    /// The same piece, sharing its storage.
    fn share(&self) -> Chunk {
        match self {
            Chunk::Whole(t) => Chunk::Whole(t.shallow_clone()),
            Chunk::Row(t, k) => Chunk::Row(t.shallow_clone(), *k),
        }
    }

    fn materialize(&self) -> Tensor {
        match self {
            Chunk::Whole(t) => t.shallow_clone(),
            Chunk::Row(t, k) => t.get(*k),
        }
    }

    /// Bytes of the positions it stands for.
    fn bytes(&self) -> u64 {
        let (t, positions) = match self {
            Chunk::Whole(t) => (t, t.size()[0]),
            Chunk::Row(t, _) => (t, 1),
        };
        (positions * t.size().last().copied().unwrap_or(0)) as u64
            * t.kind().elt_size_in_bytes() as u64
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
                let (v, c) = self
                    .stage
                    .forward_regions(&job.pixels.to_device(self.device), job.masks.as_ref());
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
                        masks,
                        timesteps,
                    } => {
                        let scores = tch::no_grad(|| {
                            self.stage.csr_scores(
                                &cond.to_device(self.device),
                                &pixels.to_device(self.device),
                                masks.as_ref(),
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
