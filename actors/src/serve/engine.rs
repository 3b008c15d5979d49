//! The generation engine: spawns the actors of a topology and runs the scheduler — continuous batching
//! over the LLM shards, image drawing on `<|startofimage|>`, and every request's event stream.
//!
//! The scheduler thread owns the sequences. Active sequences are spread over as many micro-batch groups
//! as there are LLM shards; each group is one tick in flight at a time, so while shard 1 decodes group
//! A, shard 0 decodes group B. New requests join a group between its ticks (prompt tokens per tick
//! bounded by `serve.token_budget`). A sequence that emits `<|startofimage|>` leaves the decode rounds
//! while the diffusion actor draws its image and the vision actor encodes it, then continues with the
//! image's visual tokens in its context. Finished, failed and cancelled sequences free their caches at
//! once (a `Free` message follows their last tick down the shards).
//!
//! A beam-search request keeps one cache per live hypothesis (each takes a KV slot): every step its
//! rows return their best next ids with log-probabilities, the scheduler advances the search, forks the
//! caches of hypotheses that continue twice (`Fork` down the shards) and frees those that ended.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use deem::checkpoint::{Checkpoint, LoadSpec};
use deem::config::DeemConfig;
use deem::llama::{LlamaConfig, LlamaShard};
use deem::model::{special_ids, DiffusionStage, SpecialIds, VisionStage};
use deem::sampling::{BeamSearch, SamplingParams};
use deem::tokenizer::DeemTokenizer;
use flume::{Receiver, Sender, TrySendError};
use ractor::{Actor, ActorRef};
use tch::{nn, Tensor};
use uuid::Uuid;

use super::workers::*;
use crate::metrics::{Metrics, RequestLabels, ServeMetrics};
use crate::topology::{Component, Topology};

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum Weights {
    /// A DEEM checkpoint: a file or a directory with `model.safetensors` (or a sharded index), as
    /// `deem train` writes it into its run directory.
    Checkpoint(PathBuf),
    /// The initialisation for `train.seed` (demos and tests without a trained model).
    Init,
}

/// One generation request, already validated and tokenised.
pub struct Request {
    pub id: Uuid,
    /// Prompt ids; every image is `<|startofimage|>` followed by its placeholders.
    pub prompt: Vec<i64>,
    /// The prompt's images, [N, 3, S, S] in [0, 1], in placeholder order.
    pub images: Option<Tensor>,
    /// Region input: one mask per image, [N, 1, S, S] in [0, 1] (whole images all ones); present when
    /// any image of the request has a mask. Images the model draws join the context with an all-ones
    /// mask then.
    pub masks: Option<Tensor>,
    /// Shared with every decode row of the request.
    pub params: Arc<SamplingParams>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ddim_steps: i64,
    pub guidance: f64,
    pub max_images: usize,
    /// 1: draw each token by `params`; more: beam search of that width (deterministic, no images,
    /// the text sent whole when the search ends).
    pub num_beams: usize,
    pub csr_score: bool,
    pub arrived: Instant,
    pub timeout: Duration,
    /// Set by [`Engine::submit`].
    pub events: Option<Sender<Event>>,
}

/// One input image's consistency score.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CsrScore {
    pub index: usize,
    pub csr_loss: f64,
    /// Above `serve.ood_threshold` (absent when no threshold is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_of_distribution: Option<bool>,
}

/// What a request's stream carries, in order.
#[derive(Debug)]
pub enum Event {
    Csr(Vec<CsrScore>),
    Text(String),
    Image(Vec<u8>),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error {
        timeout: bool,
        message: String,
    },
}

/// Why a request was not queued.
#[derive(Debug)]
pub enum Rejected {
    QueueFull,
    ShuttingDown,
}

struct Actors {
    refs: Vec<(String, ActorRef<WorkerMsg>, tokio::task::JoinHandle<()>)>,
}

/// The running service core: actors plus the scheduler thread.
pub struct Engine {
    requests: Option<Sender<Request>>,
    scheduler: Option<std::thread::JoinHandle<()>>,
    actors: Actors,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    metrics: Arc<Metrics>,
}

fn whole_model_spec(component: &str, namespace: &[&str]) -> LoadSpec {
    LoadSpec {
        component: component.to_string(),
        namespace: namespace.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Fills `vs` from the checkpoint or the initial weights.
fn load(vs: &nn::VarStore, source: &Source, spec: &LoadSpec) -> Result<(), String> {
    match source {
        Source::Checkpoint(ck) => ck.load_into(vs, spec).map_err(|e| e.to_string()),
        Source::Init(w) => deem::train::set_variables(vs, w),
    }
}

enum Source {
    Checkpoint(Checkpoint),
    Init(BTreeMap<String, Tensor>),
}

/// The weights, read by one actor's build at a time.
struct SharedSource(Mutex<Source>);

fn open_source(cfg: &DeemConfig, weights: &Weights) -> anyhow::Result<Source> {
    Ok(match weights {
        Weights::Init => Source::Init(crate::pipeline::driver::initial_weights(cfg)?),
        Weights::Checkpoint(p) => {
            let file = if p.is_dir() && p.join("model.safetensors").exists() {
                p.join("model.safetensors")
            } else {
                p.clone()
            };
            Source::Checkpoint(
                Checkpoint::open(&file)
                    .with_context(|| format!("{}: cannot open the checkpoint", p.display()))?,
            )
        }
    })
}

impl Engine {
    /// Spawns the actors of `topo` (building and loading each one's modules on its own thread), then the
    /// scheduler.
    pub async fn start(
        cfg: &DeemConfig,
        topo: &Topology,
        weights: &Weights,
        tokenizer: Arc<DeemTokenizer>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let source = Arc::new(SharedSource(Mutex::new(open_source(cfg, weights)?)));
        let mut shards: Vec<&crate::topology::Placement> = topo
            .actors
            .iter()
            .filter(|a| a.component == Component::Llm)
            .collect();
        shards.sort_by_key(|a| a.layers.as_ref().map_or(0, |r| r.start));
        let vision = topo
            .actors
            .iter()
            .find(|a| a.component == Component::Vision);
        let diffusion = topo
            .actors
            .iter()
            .find(|a| a.component == Component::Diffusion);
        let (Some(vision), Some(diffusion), false) = (vision, diffusion, shards.is_empty()) else {
            bail!(
                "topology {}: serving needs a vision actor, at least one llm shard and a diffusion actor",
                topo.origin
            );
        };
        let ids = special_ids(cfg);
        let (inbox_tx, inbox_rx) = flume::unbounded::<Inbox>();
        let groups = shards.len();
        let mut shard_txs = Vec::new();
        let mut shard_rxs = Vec::new();
        for _ in 0..groups {
            let (tx, rx) = flume::bounded::<ShardIn>(groups * 2 + 4);
            shard_txs.push(tx);
            shard_rxs.push(rx);
        }
        let (vision_tx, vision_rx) = flume::unbounded::<VisionJob>();
        let (diff_tx, diff_rx) = flume::unbounded::<DiffusionJob>();
        let on_cpu = topo
            .actors
            .iter()
            .filter(|a| a.device == deem::DeviceSpec::Cpu)
            .count()
            .max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads_for = move |d: deem::DeviceSpec| {
            (d == deem::DeviceSpec::Cpu).then(|| (cores / on_cpu).max(1) as i32)
        };
        let mut actors = Actors { refs: Vec::new() };
        let mut specs: Vec<WorkerArgs> = Vec::new();

        // Vision.
        {
            let (cfg, source, status) = (cfg.clone(), source.clone(), status_of(vision));
            let device: tch::Device = vision.device.into();
            let threads = threads_for(vision.device);
            let (rx, out) = (vision_rx, inbox_tx.clone());
            let st = status.clone();
            specs.push(WorkerArgs {
                name: vision.name.clone(),
                status,
                body: Box::new(move || {
                    set_threads(threads);
                    let vs = nn::VarStore::new(device);
                    let stage = deem::with_init_lock(None, || VisionStage::new(&vs.root(), &cfg));
                    let src = source.0.lock().map_err(|e| e.to_string())?;
                    load(
                        &vs,
                        &src,
                        &LoadSpec {
                            optional: deem::region::key_prefixes(),
                            ..whole_model_spec("vision", &["visual.", "visual_tokenizer."])
                        },
                    )?;
                    drop(src);
                    Ok(Box::new(move || {
                        VisionWorker {
                            stage,
                            device,
                            input: rx,
                            output: out,
                            status: st,
                        }
                        .run()
                    }) as Loop)
                }),
            });
        }
        // Shards.
        let mut rxs = shard_rxs.into_iter();
        for (i, p) in shards.iter().enumerate() {
            let (cfg, source, status) = (cfg.clone(), source.clone(), status_of(p));
            let device: tch::Device = p.device.into();
            let threads = threads_for(p.device);
            let layers = p.layers.clone().unwrap_or(0..cfg.llm.num_hidden_layers);
            let input = rxs.next().expect("one receiver per shard");
            let next = match shard_txs.get(i + 1) {
                Some(tx) => ShardNext::Shard(tx.clone()),
                None => ShardNext::Scheduler(inbox_tx.clone()),
            };
            let (name, m, st) = (p.name.clone(), metrics.serve.clone(), status.clone());
            let slots = cfg.serve.max_running as i64;
            specs.push(WorkerArgs {
                name: p.name.clone(),
                status,
                body: Box::new(move || {
                    set_threads(threads);
                    let vs = nn::VarStore::new(device);
                    let shard = deem::with_init_lock(None, || {
                        LlamaShard::new(&vs.root(), &LlamaConfig::from(&cfg.llm), layers)
                    })
                    .map_err(|e| e.to_string())?;
                    let src = source.0.lock().map_err(|e| e.to_string())?;
                    load(&vs, &src, &shard.load_spec())?;
                    drop(src);
                    Ok(Box::new(move || {
                        ShardWorker {
                            name,
                            shard,
                            ids,
                            device,
                            input,
                            next,
                            metrics: m,
                            status: st,
                            slots,
                        }
                        .run()
                    }) as Loop)
                }),
            });
        }
        // Diffusion.
        {
            let (cfg, source, status) = (cfg.clone(), source.clone(), status_of(diffusion));
            let device: tch::Device = diffusion.device.into();
            let threads = threads_for(diffusion.device);
            let (rx, out, m, st) = (
                diff_rx,
                inbox_tx.clone(),
                metrics.serve.clone(),
                status.clone(),
            );
            let max_batch = cfg.serve.max_running.max(1);
            specs.push(WorkerArgs {
                name: diffusion.name.clone(),
                status,
                body: Box::new(move || {
                    set_threads(threads);
                    let vs = nn::VarStore::new(device);
                    let stage =
                        deem::with_init_lock(None, || DiffusionStage::new(&vs.root(), &cfg));
                    let src = source.0.lock().map_err(|e| e.to_string())?;
                    load(
                        &vs,
                        &src,
                        &whole_model_spec("diffusion", &["nip_condition.", "unet.", "vae."]),
                    )?;
                    drop(src);
                    Ok(Box::new(move || {
                        DiffusionWorker {
                            stage,
                            device,
                            input: rx,
                            output: out,
                            metrics: m,
                            status: st,
                            max_batch,
                        }
                        .run()
                    }) as Loop)
                }),
            });
        }
        drop(inbox_tx);
        for args in specs {
            let name = args.name.clone();
            match Actor::spawn(None, WorkerActor, args).await {
                Ok((r, h)) => actors.refs.push((name, r, h)),
                Err(e) => {
                    // Close the inputs so the started actors' threads end, then stop them.
                    drop((shard_txs, vision_tx, diff_tx));
                    actors.stop().await;
                    bail!("cannot start actor {name}: {e}");
                }
            }
        }
        drop(source);

        let (req_tx, req_rx) = flume::bounded::<Request>(cfg.serve.queue_capacity);
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sched = Scheduler {
            cfg: cfg.clone(),
            ids,
            eos: cfg.llm.eos_token_id,
            tokenizer,
            k: cfg.resampler.num_query_tokens as usize,
            requests: req_rx,
            inbox: inbox_rx,
            shard0: shard_txs.into_iter().next().expect("at least one shard"),
            vision: vision_tx,
            diffusion: diff_tx,
            metrics: metrics.serve.clone(),
            seqs: HashMap::new(),
            groups: vec![GroupState::default(); groups],
            waiting: waiting.clone(),
            to_free: Vec::new(),
            owner: HashMap::new(),
            parked: None,
        };
        let scheduler = std::thread::Builder::new()
            .name("deem-serve-scheduler".into())
            .spawn(move || sched.run())?;
        Ok(Engine {
            requests: Some(req_tx),
            scheduler: Some(scheduler),
            actors,
            waiting,
            metrics,
        })
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver cancels it.
    pub fn submit(&self, req: Request) -> Result<Receiver<Event>, Rejected> {
        let tx = self.requests.as_ref().ok_or(Rejected::ShuttingDown)?;
        let (etx, erx) = flume::unbounded();
        let mut req = req;
        req.events = Some(etx);
        // Counted before the send, so the scheduler never admits a request not yet counted.
        let n = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.serve.num_requests_waiting.set(n as i64);
        let rejected = match tx.try_send(req) {
            Ok(()) => return Ok(erx),
            Err(TrySendError::Full(_)) => Rejected::QueueFull,
            Err(TrySendError::Disconnected(_)) => Rejected::ShuttingDown,
        };
        let n = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.serve.num_requests_waiting.set(n as i64);
        Err(rejected)
    }

    /// Each actor's status, asked through its mailbox.
    pub async fn status(&self) -> Vec<WorkerStatus> {
        let mut out = Vec::new();
        for (name, r, _) in &self.actors.refs {
            match ractor::call!(r, WorkerMsg::Status) {
                Ok(s) => out.push(s),
                Err(_) => out.push(WorkerStatus {
                    name: name.clone(),
                    device: "stopped".into(),
                    ..Default::default()
                }),
            }
        }
        out
    }

    /// Stops taking requests, lets every queued and running one finish, then stops the actors.
    pub async fn shutdown(mut self) {
        self.requests = None;
        if let Some(t) = self.scheduler.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.actors.stop().await;
    }
}

impl Actors {
    async fn stop(&mut self) {
        for (_, r, _) in &self.refs {
            r.stop(None);
        }
        for (_, _, h) in self.refs.drain(..) {
            let _ = h.await;
        }
    }
}

fn status_of(p: &crate::topology::Placement) -> SharedStatus {
    Arc::new(Mutex::new(WorkerStatus {
        name: p.name.clone(),
        device: p.device.to_string(),
        ..Default::default()
    }))
}

fn set_threads(threads: Option<i32>) {
    if let Some(n) = threads {
        tch::set_num_threads(n);
    }
}

// ---------------------------------------------------------------------------------------------------
// The scheduler.

#[derive(Debug, Clone, Default)]
struct GroupState {
    in_flight: bool,
    /// Sequences assigned to the group.
    members: usize,
}

/// What a sequence feeds next.
enum Feed {
    Prompt {
        visual: Option<Tensor>,
    },
    Token(i64),
    Image(Tensor),
    /// Beam search: the newest id of each live hypothesis, in the order of the beam's caches.
    Beams(Vec<i64>),
}

/// A beam-search request's state.
struct Beam {
    search: BeamSearch,
    /// The cache (shard sequence id) of each live hypothesis.
    caches: Vec<Uuid>,
    /// This step's candidates, per live hypothesis.
    got: Vec<Option<Vec<(i64, f64)>>>,
}

enum SeqState {
    /// Prompt images at the vision actor.
    Encoding,
    Ready(Feed),
    InTick,
    /// Its image is being drawn, or encoded after drawing.
    Drawing,
}

struct Seq {
    req: Request,
    events: Sender<Event>,
    group: usize,
    state: SeqState,
    /// Ids of every position fed so far (placeholders for image positions).
    tokens: Vec<i64>,
    sampled: u64,
    images_drawn: usize,
    /// Text ids since the last image, and how many bytes of their text were sent.
    text_ids: Vec<u32>,
    sent: usize,
    csr_pending: bool,
    finish: Option<&'static str>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    deadline: Instant,
    beam: Option<Beam>,
}

impl Seq {
    /// KV slots the sequence may hold at once.
    fn slots(&self) -> usize {
        self.req.num_beams.max(1)
    }
}

struct Scheduler {
    cfg: DeemConfig,
    ids: SpecialIds,
    eos: i64,
    tokenizer: Arc<DeemTokenizer>,
    /// Visual tokens per image.
    k: usize,
    requests: Receiver<Request>,
    inbox: Receiver<Inbox>,
    shard0: Sender<ShardIn>,
    vision: Sender<VisionJob>,
    diffusion: Sender<DiffusionJob>,
    metrics: ServeMetrics,
    seqs: HashMap<Uuid, Seq>,
    groups: Vec<GroupState>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    to_free: Vec<Uuid>,
    /// Beam caches other than the request's own id → the request.
    owner: HashMap<Uuid, Uuid>,
    /// A request taken from the queue that waits for enough free KV slots.
    parked: Option<Request>,
}

fn status(m: &ServeMetrics, s: &str) {
    m.requests
        .get_or_create(&RequestLabels {
            status: s.to_string(),
        })
        .inc();
}

impl Scheduler {
    fn run(mut self) {
        let mut closed = false;
        loop {
            // Admit between ticks, while KV slots are free.
            if let Some(r) = self.parked.take() {
                self.offer(r);
            }
            while !closed && self.parked.is_none() && self.free_slots() > 0 {
                match self.requests.try_recv() {
                    Ok(r) => self.offer(r),
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => closed = true,
                }
            }
            self.reap();
            self.launch();
            if closed && self.seqs.is_empty() && self.parked.is_none() {
                break;
            }
            let can_admit = !closed && self.parked.is_none() && self.free_slots() > 0;
            let wait = Duration::from_millis(if self.seqs.is_empty() { 200 } else { 20 });
            let got = if can_admit {
                flume::Selector::new()
                    .recv(&self.inbox, |m| m.ok().map(Either::Inbox))
                    .recv(&self.requests, |r| match r {
                        Ok(r) => Some(Either::Request(r)),
                        Err(_) => None,
                    })
                    .wait_timeout(wait)
                    .ok()
                    .flatten()
            } else {
                self.inbox.recv_timeout(wait).ok().map(Either::Inbox)
            };
            match got {
                Some(Either::Inbox(m)) => self.handle(m),
                Some(Either::Request(r)) => self.offer(r),
                None => {
                    if can_admit && self.requests.is_disconnected() {
                        closed = true;
                    }
                }
            }
            while let Ok(m) = self.inbox.try_recv() {
                self.handle(m);
            }
        }
        self.flush_frees();
    }

    /// KV slots no running sequence may claim.
    fn free_slots(&self) -> usize {
        let used: usize = self.seqs.values().map(Seq::slots).sum();
        self.cfg.serve.max_running.saturating_sub(used)
    }

    /// Admits `req` if its slots are free, else parks it until they are.
    fn offer(&mut self, req: Request) {
        if req.num_beams.max(1) <= self.free_slots() || self.seqs.is_empty() {
            self.admit(req);
        } else {
            self.parked = Some(req);
        }
    }

    fn admit(&mut self, mut req: Request) {
        let n = self
            .waiting
            .fetch_sub(1, Ordering::SeqCst)
            .saturating_sub(1);
        self.metrics.num_requests_waiting.set(n as i64);
        let Some(events) = req.events.take() else {
            return;
        };
        if events.is_disconnected() {
            status(&self.metrics, "cancelled");
            return;
        }
        self.metrics
            .request_queue_time_seconds
            .observe(req.arrived.elapsed().as_secs_f64());
        let group = (0..self.groups.len())
            .min_by_key(|&g| self.groups[g].members)
            .unwrap_or(0);
        self.groups[group].members += 1;
        let state = match &req.images {
            Some(px) if px.size()[0] > 0 => {
                let _ = self.vision.send(VisionJob {
                    seq: req.id,
                    pixels: px.shallow_clone(),
                    masks: req.masks.as_ref().map(Tensor::shallow_clone),
                    generated: false,
                });
                SeqState::Encoding
            }
            _ => SeqState::Ready(Feed::Prompt { visual: None }),
        };
        let deadline = req.arrived + req.timeout;
        let id = req.id;
        let beam = (req.num_beams > 1).then(|| {
            let room =
                (self.cfg.llm.max_position_embeddings as usize).saturating_sub(req.prompt.len());
            Beam {
                search: BeamSearch::new(req.num_beams, self.eos, req.max_tokens.min(room), 1.0),
                caches: vec![id],
                got: vec![None],
            }
        });
        self.seqs.insert(
            id,
            Seq {
                req,
                events,
                group,
                state,
                tokens: Vec::new(),
                sampled: 0,
                images_drawn: 0,
                text_ids: Vec::new(),
                sent: 0,
                csr_pending: false,
                finish: None,
                first_token: None,
                last_token: None,
                deadline,
                beam,
            },
        );
        self.metrics
            .num_requests_running
            .set(self.seqs.len() as i64);
    }

    /// Ends cancelled (client gone) and timed-out sequences.
    fn reap(&mut self) {
        let now = Instant::now();
        let gone: Vec<(Uuid, bool)> = self
            .seqs
            .iter()
            .filter_map(|(id, s)| {
                if s.events.is_disconnected() {
                    Some((*id, false))
                } else if now >= s.deadline {
                    Some((*id, true))
                } else {
                    None
                }
            })
            .collect();
        for (id, timeout) in gone {
            if timeout {
                let secs = self.cfg.serve.request_timeout_s;
                self.fail(
                    id,
                    true,
                    format!("the request ran past its timeout of {secs} s"),
                );
            } else {
                self.drop_seq(id, "cancelled");
            }
        }
    }

    /// Sends a tick for every idle group that has work.
    fn launch(&mut self) {
        for g in 0..self.groups.len() {
            if self.groups[g].in_flight {
                continue;
            }
            let mut ready: Vec<Uuid> = self
                .seqs
                .iter()
                .filter(|(_, s)| s.group == g && matches!(s.state, SeqState::Ready(_)))
                .map(|(id, _)| *id)
                .collect();
            ready.sort_by_key(|id| self.seqs[id].req.arrived);
            let mut budget = self.cfg.serve.token_budget;
            let mut rows = Vec::new();
            let mut inputs = Vec::new();
            for id in ready {
                let prompt_len = match &self.seqs[&id].state {
                    SeqState::Ready(Feed::Prompt { .. }) => self.seqs[&id].req.prompt.len(),
                    _ => 0,
                };
                if prompt_len > 0 && !rows.is_empty() && prompt_len > budget {
                    continue;
                }
                budget = budget.saturating_sub(prompt_len);
                if self.seqs[&id].beam.is_some() {
                    for (row, input) in self.beam_rows(id) {
                        rows.push(row);
                        inputs.push(input);
                    }
                } else {
                    let (row, input) = self.row(id);
                    rows.push(row);
                    inputs.push(input);
                }
            }
            if rows.is_empty() {
                continue;
            }
            self.metrics.batch_size.observe(rows.len() as f64);
            self.groups[g].in_flight = true;
            if self
                .shard0
                .send(ShardIn::Tick {
                    group: g,
                    rows,
                    inputs,
                    hidden: Hidden::default(),
                    error: None,
                })
                .is_err()
            {
                tracing::error!("the first LLM shard stopped");
            }
        }
    }

    /// Builds a sequence's row and marks it in flight.
    fn row(&mut self, id: Uuid) -> (RowMeta, RowInput) {
        let (soi, sniffer, k) = (self.ids.soi, self.ids.sniffer, self.k);
        let bos = self.ids.bos;
        let s = self.seqs.get_mut(&id).expect("ready sequence");
        let start = s.tokens.len() as i64;
        let feed = match std::mem::replace(&mut s.state, SeqState::InTick) {
            SeqState::Ready(f) => f,
            _ => unreachable!("only ready sequences get rows"),
        };
        let mut context_from = None;
        let input = match feed {
            Feed::Prompt { visual } => {
                s.tokens.extend_from_slice(&s.req.prompt);
                self.metrics.prompt_tokens.inc_by(s.req.prompt.len() as u64);
                RowInput::Ids {
                    ids: s.req.prompt.clone(),
                    visual,
                }
            }
            Feed::Token(t) => {
                s.tokens.push(t);
                if t == soi {
                    let pos = s.tokens.len() - 1;
                    let from = s.tokens[..pos].iter().rposition(|&x| x == bos).unwrap_or(0);
                    context_from = Some(from as i64);
                }
                RowInput::Ids {
                    ids: vec![t],
                    visual: None,
                }
            }
            Feed::Image(v) => {
                s.tokens.extend(std::iter::repeat_n(sniffer, k));
                RowInput::Embeds(v)
            }
            Feed::Beams(_) => unreachable!("beam rows come from beam_rows"),
        };
        let sample = context_from.is_none().then(|| {
            let mut banned = vec![sniffer];
            if s.images_drawn >= s.req.max_images {
                banned.push(soi);
            }
            // The context is only read by the repetition penalty.
            let seen = if s.req.params.repetition_penalty != 1.0 {
                s.tokens.iter().copied().filter(|&t| t != sniffer).collect()
            } else {
                Vec::new()
            };
            SampleSpec {
                params: s.req.params.clone(),
                seen,
                banned,
                index: s.sampled,
                beam: 0,
            }
        });
        (
            RowMeta {
                seq: id,
                start,
                sample,
                context_from,
            },
            input,
        )
    }

    /// A beam-search sequence's rows: its prompt, or the newest id of every live hypothesis (each in its
    /// own cache). Each row asks for the candidates the search needs; `<|startofimage|>` is banned.
    fn beam_rows(&mut self, id: Uuid) -> Vec<(RowMeta, RowInput)> {
        let (soi, sniffer) = (self.ids.soi, self.ids.sniffer);
        let s = self.seqs.get_mut(&id).expect("ready sequence");
        let beam = s.beam.as_ref().expect("a beam sequence");
        let need = beam.search.candidates_needed();
        let penalised = s.req.params.repetition_penalty != 1.0;
        // The context is only read by the repetition penalty: the prompt, then the hypothesis.
        let spec = |prompt: &[i64], generated: &[i64]| SampleSpec {
            params: s.req.params.clone(),
            seen: if penalised {
                prompt
                    .iter()
                    .chain(generated)
                    .copied()
                    .filter(|&t| t != sniffer)
                    .collect()
            } else {
                Vec::new()
            },
            banned: vec![sniffer, soi],
            index: 0,
            beam: need,
        };
        let rows = match std::mem::replace(&mut s.state, SeqState::InTick) {
            SeqState::Ready(Feed::Prompt { visual }) => {
                s.tokens.extend_from_slice(&s.req.prompt);
                self.metrics.prompt_tokens.inc_by(s.req.prompt.len() as u64);
                vec![(
                    RowMeta {
                        seq: id,
                        start: 0,
                        sample: Some(spec(&s.tokens, &[])),
                        context_from: None,
                    },
                    RowInput::Ids {
                        ids: s.req.prompt.clone(),
                        visual,
                    },
                )]
            }
            SeqState::Ready(Feed::Beams(next)) => {
                let live = beam.search.live();
                next.iter()
                    .zip(live)
                    .zip(&beam.caches)
                    .map(|((&t, h), &cache)| {
                        (
                            RowMeta {
                                seq: cache,
                                start: (s.tokens.len() + h.tokens.len() - 1) as i64,
                                sample: Some(spec(&s.tokens, &h.tokens)),
                                context_from: None,
                            },
                            RowInput::Ids {
                                ids: vec![t],
                                visual: None,
                            },
                        )
                    })
                    .collect()
            }
            _ => unreachable!("beam sequences feed their prompt, then hypotheses"),
        };
        rows
    }

    /// A beam row's candidates; once every live hypothesis reported, the search advances.
    fn beam_result(&mut self, id: Uuid, r: RowOut) {
        let Some(beam) = self.seqs.get_mut(&id).and_then(|s| s.beam.as_mut()) else {
            return;
        };
        if let Some(i) = beam.caches.iter().position(|&c| c == r.seq) {
            beam.got[i] = Some(r.top);
        }
        if beam.got.iter().any(Option::is_none) {
            return;
        }
        let candidates: Vec<Vec<(i64, f64)>> = beam.got.drain(..).flatten().collect();
        let parents = beam.search.step(&candidates);
        if beam.search.is_done() {
            self.finish_beam(id);
            return;
        }
        // The first continuation of a hypothesis keeps its cache; a second one forks it; hypotheses
        // without continuations free theirs (before the forks, so their slots are free for them).
        let old = std::mem::take(&mut beam.caches);
        let mut kept = vec![false; old.len()];
        let mut forks = Vec::new();
        for &p in &parents {
            if !kept[p] {
                kept[p] = true;
                beam.caches.push(old[p]);
            } else {
                let fresh = Uuid::new_v4();
                forks.push((old[p], fresh));
                self.owner.insert(fresh, id);
                beam.caches.push(fresh);
            }
        }
        beam.got = vec![None; beam.caches.len()];
        let next = beam
            .search
            .live()
            .iter()
            .map(|h| *h.tokens.last().expect("a live hypothesis has an id"))
            .collect();
        for (c, k) in old.into_iter().zip(kept) {
            if !k {
                self.owner.remove(&c);
                self.to_free.push(c);
            }
        }
        self.flush_frees();
        if !forks.is_empty() {
            let _ = self.shard0.send(ShardIn::Fork(forks));
        }
        if let Some(s) = self.seqs.get_mut(&id) {
            s.state = SeqState::Ready(Feed::Beams(next));
        }
    }

    /// Sends the best hypothesis' text (cut at a stop string) and ends the request.
    fn finish_beam(&mut self, id: Uuid) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let best = s
            .beam
            .as_ref()
            .and_then(|b| b.search.best().cloned())
            .unwrap_or(deem::sampling::Hypothesis {
                tokens: Vec::new(),
                log_prob: 0.0,
            });
        let ended = best.tokens.last() == Some(&self.eos);
        let text: Vec<u32> = best
            .tokens
            .iter()
            .filter(|&&t| t != self.eos)
            .map(|&t| t as u32)
            .collect();
        s.sampled = best.tokens.len() as u64;
        s.text_ids = text;
        self.metrics.generated_tokens.inc_by(s.sampled);
        self.metrics
            .time_to_first_token_seconds
            .observe(s.req.arrived.elapsed().as_secs_f64());
        let stopped = self.flush_text(id, true);
        self.finish(id, if ended || stopped { "stop" } else { "length" });
    }

    fn handle(&mut self, m: Inbox) {
        match m {
            Inbox::Tick { group, out } => {
                self.groups[group].in_flight = false;
                match out {
                    Ok(rows) => {
                        for r in rows {
                            self.tick_result(r);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "decode tick failed");
                        let ids: Vec<Uuid> = self
                            .seqs
                            .iter()
                            .filter(|(_, s)| {
                                s.group == group && matches!(s.state, SeqState::InTick)
                            })
                            .map(|(id, _)| *id)
                            .collect();
                        for id in ids {
                            self.fail(id, false, format!("generation failed: {e}"));
                        }
                    }
                }
            }
            Inbox::Encoded {
                seq,
                generated,
                out,
            } => {
                let Some(s) = self.seqs.get_mut(&seq) else {
                    return;
                };
                match out {
                    Err(e) => self.fail(seq, false, format!("the vision actor failed: {e}")),
                    Ok((visual, cond)) => {
                        if generated {
                            s.state = SeqState::Ready(Feed::Image(visual.get(0)));
                        } else {
                            if s.req.csr_score {
                                if let Some(px) = &s.req.images {
                                    s.csr_pending = true;
                                    let _ = self.diffusion.send(DiffusionJob::Score {
                                        seq,
                                        cond,
                                        pixels: px.shallow_clone(),
                                        masks: s.req.masks.as_ref().map(Tensor::shallow_clone),
                                        timesteps: self.cfg.serve.csr_timesteps.clone(),
                                    });
                                }
                            }
                            s.state = SeqState::Ready(Feed::Prompt {
                                visual: Some(visual),
                            });
                        }
                    }
                }
            }
            Inbox::Drawn { seq, out } => {
                let Some(s) = self.seqs.get_mut(&seq) else {
                    return;
                };
                match out {
                    Err(e) => self.fail(seq, false, format!("drawing the image failed: {e}")),
                    Ok((pixels, png)) => {
                        self.metrics.generated_images.inc();
                        let _ = s.events.send(Event::Image(png));
                        let masks = s.req.masks.as_ref().map(|_| {
                            deem::region::whole_image_masks(1, pixels.size()[1])
                                .to_device(pixels.device())
                        });
                        let _ = self.vision.send(VisionJob {
                            seq,
                            pixels: pixels.unsqueeze(0),
                            masks,
                            generated: true,
                        });
                    }
                }
            }
            Inbox::Scored { seq, out } => {
                let threshold = self.cfg.serve.ood_threshold;
                let Some(s) = self.seqs.get_mut(&seq) else {
                    return;
                };
                s.csr_pending = false;
                match out {
                    Err(e) => tracing::warn!(error = %e, "CSR scoring failed"),
                    Ok(scores) => {
                        let items: Vec<CsrScore> = scores
                            .iter()
                            .enumerate()
                            .map(|(index, &csr_loss)| {
                                self.metrics.csr_loss.observe(csr_loss);
                                let ood = threshold.map(|t| csr_loss > t);
                                if ood == Some(true) {
                                    self.metrics.ood_images.inc();
                                }
                                CsrScore {
                                    index,
                                    csr_loss,
                                    out_of_distribution: ood,
                                }
                            })
                            .collect();
                        let _ = s.events.send(Event::Csr(items));
                    }
                }
                self.maybe_done(seq);
            }
        }
    }

    fn tick_result(&mut self, r: RowOut) {
        let owner = self.owner.get(&r.seq).copied().unwrap_or(r.seq);
        if self.seqs.get(&owner).is_some_and(|s| s.beam.is_some()) {
            self.beam_result(owner, r);
            return;
        }
        let (soi, eos) = (self.ids.soi, self.eos);
        let max_pos = self.cfg.llm.max_position_embeddings as usize;
        let k = self.k;
        let Some(s) = self.seqs.get_mut(&r.seq) else {
            return;
        };
        if let Some(ctx) = r.context {
            // The SoI went through: draw the image.
            s.state = SeqState::Drawing;
            let _ = self.diffusion.send(DiffusionJob::Draw {
                seq: r.seq,
                context: ctx,
                steps: s.req.ddim_steps,
                guidance: s.req.guidance,
                seed: s.req.params.seed,
                image: s.images_drawn as u64 - 1,
            });
            return;
        }
        let Some(tok) = r.token else {
            return;
        };
        let now = Instant::now();
        match s.last_token {
            None => {
                self.metrics
                    .time_to_first_token_seconds
                    .observe((now - s.req.arrived).as_secs_f64());
                s.first_token = Some(now);
            }
            Some(prev) => self
                .metrics
                .inter_token_latency_seconds
                .observe((now - prev).as_secs_f64()),
        }
        s.last_token = Some(now);
        s.sampled += 1;
        self.metrics.generated_tokens.inc();
        let out_of_room = s.tokens.len() + 1 + if tok == soi { k } else { 0 } > max_pos;
        if tok == eos {
            self.finish(r.seq, "stop");
            return;
        }
        if tok == soi {
            self.flush_text(r.seq, true);
            let s = self.seqs.get_mut(&r.seq).expect("live sequence");
            if s.sampled as usize >= s.req.max_tokens || out_of_room {
                self.finish(r.seq, "length");
                return;
            }
            s.images_drawn += 1;
            s.text_ids.clear();
            s.sent = 0;
            s.state = SeqState::Ready(Feed::Token(soi));
            return;
        }
        s.text_ids.push(tok as u32);
        if self.flush_text(r.seq, false) {
            self.finish(r.seq, "stop");
            return;
        }
        let s = self.seqs.get_mut(&r.seq).expect("live sequence");
        if s.sampled as usize >= s.req.max_tokens || out_of_room {
            self.finish(r.seq, "length");
            return;
        }
        s.state = SeqState::Ready(Feed::Token(tok));
    }

    /// Sends the text decoded since the last flush. Holds back a possibly unfinished UTF-8 character
    /// and the tail that could start a stop string, unless `all`. Returns true when a stop string was
    /// found (the text before it is sent).
    fn flush_text(&mut self, id: Uuid, all: bool) -> bool {
        let Some(s) = self.seqs.get_mut(&id) else {
            return false;
        };
        let text = self.tokenizer.decode(&s.text_ids, true).unwrap_or_default();
        let mut end = text.len();
        let mut stopped = false;
        if let Some(pos) = s
            .req
            .stop
            .iter()
            .filter_map(|st| text.find(st.as_str()))
            .min()
        {
            end = pos;
            stopped = true;
        } else if !all {
            if text.ends_with('\u{FFFD}') {
                end = text.trim_end_matches('\u{FFFD}').len();
            }
            let hold = s
                .req
                .stop
                .iter()
                .map(|x| x.len())
                .max()
                .unwrap_or(1)
                .saturating_sub(1);
            end = end.saturating_sub(hold);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
        }
        if end > s.sent {
            let _ = s.events.send(Event::Text(text[s.sent..end].to_string()));
            s.sent = end;
        }
        stopped
    }

    fn finish(&mut self, id: Uuid, reason: &'static str) {
        // Sends what was held back (a found stop string is found again and cut again).
        self.flush_text(id, true);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.finish = Some(reason);
            s.state = SeqState::Drawing; // out of the decode rounds
        }
        self.maybe_done(id);
    }

    /// Sends `Done` once decoding ended and the CSR score (if asked for) arrived.
    fn maybe_done(&mut self, id: Uuid) {
        let Some(s) = self.seqs.get(&id) else {
            return;
        };
        let (Some(reason), false) = (s.finish, s.csr_pending) else {
            return;
        };
        let _ = s.events.send(Event::Done {
            finish_reason: reason,
            prompt_tokens: s.req.prompt.len(),
            completion_tokens: s.sampled as usize,
        });
        self.metrics
            .e2e_request_latency_seconds
            .observe(s.req.arrived.elapsed().as_secs_f64());
        self.drop_seq(id, reason);
    }

    fn fail(&mut self, id: Uuid, timeout: bool, message: String) {
        if let Some(s) = self.seqs.get(&id) {
            let _ = s.events.send(Event::Error { timeout, message });
        }
        self.drop_seq(id, if timeout { "timeout" } else { "error" });
    }

    /// Removes a sequence and frees its caches on every shard.
    fn drop_seq(&mut self, id: Uuid, outcome: &str) {
        if let Some(s) = self.seqs.remove(&id) {
            self.groups[s.group].members -= 1;
            status(&self.metrics, outcome);
            self.to_free.push(id);
            for c in s.beam.iter().flat_map(|b| &b.caches) {
                if *c != id {
                    self.owner.remove(c);
                    self.to_free.push(*c);
                }
            }
            self.flush_frees();
        }
        self.metrics
            .num_requests_running
            .set(self.seqs.len() as i64);
    }

    fn flush_frees(&mut self) {
        if !self.to_free.is_empty() {
            let _ = self
                .shard0
                .send(ShardIn::Free(std::mem::take(&mut self.to_free)));
        }
    }
}

enum Either {
    Inbox(Inbox),
    Request(Request),
}
