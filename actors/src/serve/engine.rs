//! The generation engine, after text-generation-inference's launcher + router: it opens the weights,
//! spawns one compute actor per topology entry (vision, the LLM shards in pipeline order, diffusion)
//! under a supervisor that rebuilds a dead worker in place, starts the scheduler thread, and puts
//! requests into admission. A worker's death fails every request in flight with an error event and
//! turns `/ready` 503 while its supervisor rebuilds it (new requests wait in the queue meanwhile);
//! once `serve.max_restarts` rebuilds within `serve.restart_window_s` are spent, or with restarts off,
//! the worker stays failed and new requests get 503 until the service is restarted from outside.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use deem::config::DeemConfig;
use deem::models::deem::{special_ids, DiffusionStage, Part, VisionStage};
use deem::models::llama::{LlamaConfig, LlamaShard};
use deem::models::pretrained::{part_spec, Pretrained};
use deem::text::tokenizer::DeemTokenizer;
use flume::Sender;
use futures_util::Stream;
use tch::nn;

use super::admission::Admission;
use super::error::{InferError, ServeError};
use super::events::{Event, Events};
use super::messages::{DiffusionJob, Inbox, ShardIn, ShardNext, VisionJob};
use super::remote::{Bridge, Ends, ServeWorld};
use super::scheduler::{GroupState, Scheduler};
use super::validation::ValidRequest;
use super::workers::{DiffusionWorker, ShardDetail, ShardWorker, VisionWorker};
use crate::runtime::compute::BuildError;
use crate::runtime::metrics::Metrics;
use crate::runtime::topology::{Component, Placement, Topology};
use crate::runtime::{
    ComputeSpec, ComputeStatus, OnReport, Policy, Report, Restartable, RuntimeError, Supervisor,
    Work,
};

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum Weights {
    /// A DEEM checkpoint: a file or a directory with `model.safetensors` (or a sharded index), as
    /// `deem train` writes it into its run directory.
    Checkpoint(PathBuf),
    /// The initialisation for `train.seed` (demos and tests without a trained model).
    Init,
}

/// A worker's status as `/ready` shows it (vision and diffusion report no sequences).
pub type WorkerStatus = ComputeStatus<ShardDetail>;

/// Why the engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "topology {0}: serving needs a vision actor, at least one llm shard and a diffusion actor"
    )]
    Topology(String),
    #[error("{}: cannot open the checkpoint: {source}", path.display())]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: Box<deem::checkpoint::CheckpointError>,
    },
    #[error("building the initial weights: {0}")]
    Init(#[from] deem::models::ModelError),
    #[error("cannot start actor {actor}: {source}")]
    Start {
        actor: String,
        #[source]
        source: RuntimeError,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot start the scheduler thread: {0}")]
    Scheduler(std::io::Error),
    #[error("cannot start the threads to the other ranks: {0}")]
    Bridge(std::io::Error),
    #[error("{budget} cannot hold one full-length sequence on shard {shard}: its {layers} layers × llm.max_position_embeddings = {positions} positions need {need} bytes")]
    KvBudget {
        /// `serve.kv_cache_bytes = N`, or how `serve.kv_cache_fraction` came to its bytes.
        budget: String,
        shard: String,
        layers: i64,
        positions: i64,
        need: u64,
    },
}

/// A shard's KV budget: `serve.kv_cache_bytes`, or `serve.kv_cache_fraction` of its device's memory
/// less its weights; with how it was reached, for messages. `None`: no budget.
fn shard_budget(cfg: &DeemConfig, p: &Placement) -> Option<(u64, String)> {
    if let Some(b) = cfg.serve.kv_cache_bytes {
        return Some((b, format!("serve.kv_cache_bytes = {b}")));
    }
    let f = cfg.serve.kv_cache_fraction?;
    let Some(total) = crate::runtime::topology::device_memory(&p.device) else {
        tracing::warn!(shard = %p.name, device = %p.device, "serve.kv_cache_fraction: the device's memory is unknown; no budget");
        return None;
    };
    let b = ((total as f64 * f) as u64).saturating_sub(p.param_bytes);
    Some((
        b,
        format!(
            "serve.kv_cache_fraction = {f} of {}'s {total} bytes less the shard's {} bytes of weights = {b}",
            p.device, p.param_bytes
        ),
    ))
}

/// `cfg` with `serve.max_running` lowered to what each shard's KV budget holds (`serve.kv_cache_bytes`
/// or `serve.kv_cache_fraction`; keys and values of every layer, full-length slots, in the model's
/// dtype); refuses a budget that cannot hold one sequence. Every process of a service computes the same
/// (with a fraction, as long as the ranks' devices are alike).
pub fn budgeted(cfg: &DeemConfig, topo: &Topology) -> Result<DeemConfig, EngineError> {
    let mut out = cfg.clone();
    let l = LlamaConfig::from(&cfg.llm);
    // The pool is held in the model's dtype (the shard's weights').
    let per_layer = 2
        * l.num_key_value_heads
        * l.head_dim
        * l.max_position_embeddings
        * cfg.model.dtype.size_bytes() as i64;
    for (_, shards, _) in [roles(topo)?] {
        for p in shards {
            let Some((budget, origin)) = shard_budget(cfg, p) else {
                continue;
            };
            let layers = p
                .layers
                .as_ref()
                .map_or(l.num_hidden_layers, |r| r.end - r.start);
            let need = (layers * per_layer) as u64;
            let fit = (budget / need.max(1)) as usize;
            if fit == 0 {
                return Err(EngineError::KvBudget {
                    budget: origin,
                    shard: p.name.clone(),
                    layers,
                    positions: l.max_position_embeddings,
                    need,
                });
            }
            out.serve.max_running = out.serve.max_running.min(fit);
        }
    }
    if out.serve.max_running < cfg.serve.max_running {
        tracing::info!(
            slots = out.serve.max_running,
            max_running = cfg.serve.max_running,
            "the KV budget holds fewer sequences than serve.max_running: running at most {}",
            out.serve.max_running
        );
    }
    Ok(out)
}

enum Source {
    /// A deem model through the one loader (each actor takes its own part, checked first).
    Checkpoint(Pretrained),
    /// The seeded initialisation: each actor draws its own part.
    Init,
}

/// The weights, read by each actor's build.
type SharedSource = Arc<Source>;

fn open_source(cfg: &DeemConfig, weights: &Weights) -> Result<Source, EngineError> {
    Ok(match weights {
        Weights::Init => Source::Init,
        Weights::Checkpoint(p) => Source::Checkpoint(
            Pretrained::open(std::slice::from_ref(p), Some(cfg)).map_err(|source| {
                EngineError::Checkpoint {
                    path: p.clone(),
                    source: Box::new(source),
                }
            })?,
        ),
    })
}

/// Loads an actor's modules (`part`) from the source: every parameter of the part from the
/// checkpoint (names and shapes checked before any is copied), or the part's initialisation.
fn load(
    vs: &nn::VarStore,
    source: &SharedSource,
    cfg: &DeemConfig,
    part: Part,
) -> Result<(), BuildError> {
    match &**source {
        Source::Checkpoint(pre) => {
            drop(pre.load_into(vs, &part_spec(cfg, &part), true, |_, _| {})?)
        }
        Source::Init => {
            deem::train::set_variables(vs, &deem::models::deem::initial_weights_of(cfg, &part)?)?
        }
    }
    Ok(())
}

/// The channels between the scheduler and the workers.
struct Wiring {
    inbox: (Sender<Inbox>, flume::Receiver<Inbox>),
    shards: Vec<(Sender<ShardIn>, flume::Receiver<ShardIn>)>,
    vision: (Sender<VisionJob>, flume::Receiver<VisionJob>),
    diffusion: (Sender<DiffusionJob>, flume::Receiver<DiffusionJob>),
}

impl Wiring {
    fn new(groups: usize) -> Self {
        Wiring {
            inbox: flume::unbounded(),
            shards: (0..groups)
                .map(|_| flume::bounded(groups * 2 + 4))
                .collect(),
            vision: flume::unbounded(),
            diffusion: flume::unbounded(),
        }
    }

    /// Clones of every end, for the threads to the other ranks.
    fn ends(&self) -> Ends {
        Ends {
            inbox: self.inbox.clone(),
            shards: self.shards.clone(),
            vision: self.vision.clone(),
            diffusion: self.diffusion.clone(),
        }
    }
}

/// The running workers.
struct Workers {
    vision: Option<Restartable<VisionWorker>>,
    shards: Vec<Restartable<ShardWorker>>,
    diffusion: Option<Restartable<DiffusionWorker>>,
}

impl Workers {
    async fn stop(&mut self) {
        if let Some(v) = self.vision.take() {
            v.stop().await;
        }
        for s in self.shards.drain(..) {
            s.stop().await;
        }
        if let Some(d) = self.diffusion.take() {
            d.stop().await;
        }
    }
}

/// The running service core: workers under their supervisor, admission and the scheduler thread.
pub struct Engine {
    admission: Admission,
    scheduler: Option<std::thread::JoinHandle<()>>,
    workers: Workers,
    supervisor: Option<Supervisor>,
    /// False once a worker has failed for good (admission then answers 503).
    healthy: Arc<AtomicBool>,
    /// The threads to the other ranks of a multi-process service.
    bridge: Option<Bridge>,
}

/// The compute-actor spec of each incarnation of a placement's worker: a fresh `build` every time,
/// and the serving fault hook (`[fault]` naming this actor: its first incarnation's compute thread
/// dies at that job — a tick for a shard, a batch of images otherwise).
fn specs_of<W: Work>(
    cfg: &DeemConfig,
    (topo, world): (&Topology, Option<&ServeWorld>),
    p: &Placement,
    build: impl Fn() -> Result<W, BuildError> + Send + Sync + 'static,
) -> impl Fn(u32) -> ComputeSpec<W> + Send + Sync + 'static {
    // Across processes only this rank's actors share the cores, with the node's other processes.
    let procs = world.map(ServeWorld::local_procs);
    let (name, device) = (p.name.clone(), p.device.to_string());
    let threads = topo.cpu_threads_in(p, procs);
    let fault = cfg
        .fault
        .as_ref()
        .filter(|f| f.kill_actor == p.name)
        .map(|f| f.at_step);
    let build = Arc::new(build);
    move |incarnation| {
        let build = build.clone();
        ComputeSpec {
            name: name.clone(),
            device: device.clone(),
            threads,
            build: Box::new(move || build()),
            fault_at_job: fault.filter(|_| incarnation == 0),
        }
    }
}

/// The serving supervisor's policy: `serve.max_restarts` rebuilds within `serve.restart_window_s`.
fn policy(cfg: &DeemConfig) -> Policy {
    match cfg.serve.max_restarts {
        0 => Policy::MarkFailed,
        max_restarts => Policy::RestartOne {
            max_restarts,
            window: std::time::Duration::from_secs_f64(cfg.serve.restart_window_s),
        },
    }
}

/// The vision, shard and diffusion placements of a serving topology, in pipeline order.
fn roles(topo: &Topology) -> Result<(&Placement, Vec<&Placement>, &Placement), EngineError> {
    let order = topo.pipeline_order();
    let shards: Vec<&Placement> = order
        .iter()
        .copied()
        .filter(|a| a.component == Component::Llm)
        .collect();
    let find = |c: Component| order.iter().copied().find(|a| a.component == c);
    match (
        find(Component::Vision),
        find(Component::Diffusion),
        shards.is_empty(),
    ) {
        (Some(v), Some(d), false) => Ok((v, shards, d)),
        _ => Err(EngineError::Topology(topo.origin.clone())),
    }
}

/// Whether this process hosts `p` (every placement without a world).
fn hosts(world: Option<&ServeWorld>, p: &Placement) -> bool {
    world.is_none_or(|w| p.rank == w.rank())
}

/// Starts, under a new serving supervisor told of every failure through `on_failure`, the workers this
/// process hosts (all of them without a world). On failure nothing is left running.
async fn start_workers(
    cfg: &DeemConfig,
    (topo, world): (&Topology, Option<&ServeWorld>),
    weights: &Weights,
    metrics: &Arc<Metrics>,
    (wiring, on_report): (Wiring, OnReport),
) -> Result<(Supervisor, Workers, Wiring), EngineError> {
    let (vision, shards, diffusion) = roles(topo)?;
    let source: SharedSource = Arc::new(open_source(cfg, weights)?);
    let supervisor = Supervisor::start(
        "serving",
        policy(cfg),
        Some(on_report),
        Some(metrics.clone()),
    )
    .await?;
    let mut workers = Workers {
        vision: None,
        shards: Vec::new(),
        diffusion: None,
    };
    let spawned = spawn_workers(
        cfg,
        (topo, world),
        &source,
        &wiring,
        metrics,
        &supervisor,
        &mut workers,
        (vision, &shards, diffusion),
    )
    .await;
    if let Err(e) = spawned {
        // Close the inputs so the started workers' threads end, then stop them.
        drop(wiring);
        workers.stop().await;
        supervisor.stop().await;
        return Err(e);
    }
    Ok((supervisor, workers, wiring))
}

impl Engine {
    /// Spawns the workers of `topo` (building and loading each one's modules on its own thread) under
    /// a supervisor, then the scheduler.
    pub async fn start(
        cfg: &DeemConfig,
        topo: &Topology,
        weights: &Weights,
        tokenizer: Arc<DeemTokenizer>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        Self::start_on(cfg, topo, weights, tokenizer, metrics, None).await
    }

    /// [`Self::start`] as rank 0 of a multi-process service (`world`): the workers placed here, the
    /// scheduler, and the threads to the other ranks.
    pub async fn start_on(
        cfg: &DeemConfig,
        topo: &Topology,
        weights: &Weights,
        tokenizer: Arc<DeemTokenizer>,
        metrics: Arc<Metrics>,
        world: Option<ServeWorld>,
    ) -> Result<Self, EngineError> {
        let cfg = &budgeted(cfg, topo)?;
        let groups = roles(topo)?.1.len();
        let wiring = Wiring::new(groups);
        // The supervisor's hook: the scheduler fails every request in flight and holds the queue
        // while the worker is rebuilt; a worker failed for good makes admission refuse new requests.
        let healthy = Arc::new(AtomicBool::new(true));
        let on_report: OnReport = {
            let (inbox, healthy) = (wiring.inbox.0.clone(), healthy.clone());
            Arc::new(move |r: &Report| match r {
                Report::Failed(f) => {
                    if !f.restarting {
                        healthy.store(false, Ordering::SeqCst);
                    }
                    let _ = inbox.send(Inbox::WorkerFailed(f.clone()));
                }
                Report::Restarted(r) => {
                    let _ = inbox.send(Inbox::WorkerRestarted(r.clone()));
                }
            })
        };
        let (supervisor, mut workers, wiring) = start_workers(
            cfg,
            (topo, world.as_ref()),
            weights,
            &metrics,
            (wiring, on_report),
        )
        .await?;
        // A lost rank, or a worker dead in another process, fails the service as a dead worker here
        // does.
        let bridge = match &world {
            None => None,
            Some(w) => match Bridge::start(w, wiring.ends(), supervisor.reporter()) {
                Ok(b) => Some(b),
                Err(e) => {
                    drop(wiring);
                    workers.stop().await;
                    supervisor.stop().await;
                    return Err(EngineError::Bridge(e));
                }
            },
        };
        let (admission, queue) = Admission::new(
            cfg.serve.queue_capacity,
            healthy.clone(),
            metrics.serve.clone(),
        );
        let Wiring {
            inbox,
            shards: shard_channels,
            vision: vision_ch,
            diffusion: diffusion_ch,
        } = wiring;
        let sched = Scheduler {
            cfg: cfg.clone(),
            ids: special_ids(cfg),
            eos: cfg.llm.eos_token_id,
            tokenizer,
            k: cfg.resampler.num_query_tokens as usize,
            queue,
            inbox: inbox.1,
            shard0: shard_channels[0].0.clone(),
            vision: vision_ch.0,
            diffusion: diffusion_ch.0,
            metrics: metrics.serve.clone(),
            seqs: Default::default(),
            groups: vec![GroupState::default(); groups],
            to_free: Vec::new(),
            owner: Default::default(),
            parked: None,
            failed: None,
            down: Vec::new(),
            epoch: 0,
        };
        let scheduler = std::thread::Builder::new()
            .name("deem-serve-scheduler".into())
            .spawn(move || sched.run())
            .map_err(EngineError::Scheduler)?;
        Ok(Engine {
            admission,
            scheduler: Some(scheduler),
            workers,
            supervisor: Some(supervisor),
            healthy,
            bridge,
        })
    }

    /// Queues a validated request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels it.
    pub fn submit(&self, req: ValidRequest) -> Result<Events, ServeError> {
        self.admission.submit(req, || self.unready_reason())
    }

    /// [`Self::submit`], the events as a stream.
    pub fn generate(
        &self,
        req: ValidRequest,
    ) -> Result<impl Stream<Item = Result<Event, InferError>> + Send + 'static, ServeError> {
        Ok(self.submit(req)?.into_stream())
    }

    /// The actors (or ranks) that failed and are not running again (being rebuilt, or failed for
    /// good).
    pub fn failed(&self) -> Vec<String> {
        self.supervisor
            .as_ref()
            .map(Supervisor::down)
            .unwrap_or_default()
    }

    /// True while every worker runs: false while one is being rebuilt, and for good once one failed
    /// past its restarts.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst) && self.failed().is_empty()
    }

    /// Why admission refuses: the latest failure of a worker that is still down.
    fn unready_reason(&self) -> String {
        let Some(sup) = &self.supervisor else {
            return "a worker failed".into();
        };
        let down = sup.down();
        match sup
            .failures()
            .into_iter()
            .rev()
            .find(|f| down.contains(&f.actor))
        {
            Some(f) => format!("actor {} failed: {}", f.actor, f.error),
            None => "a worker failed".into(),
        }
    }

    /// Each worker's status, asked through its actor's mailbox (pipeline order).
    pub async fn status(&self) -> Vec<WorkerStatus> {
        let mut out = Vec::new();
        if let Some(v) = &self.workers.vision {
            out.push(widen(v.status().await));
        }
        for s in &self.workers.shards {
            out.push(s.status().await);
        }
        if let Some(d) = &self.workers.diffusion {
            out.push(widen(d.status().await));
        }
        out
    }

    /// Stops taking requests, lets every queued and running one finish, then stops the workers.
    pub async fn shutdown(mut self) {
        self.admission.close();
        if let Some(t) = self.scheduler.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(b) = self.bridge.take() {
            let _ = tokio::task::spawn_blocking(move || b.stop()).await;
        }
        self.workers.stop().await;
        if let Some(s) = self.supervisor.take() {
            s.stop().await;
        }
    }
}

/// Runs the workers a rank other than 0 hosts in a multi-process service, until rank 0 stops the
/// service (`Ok`) or a peer is lost (its failure). A worker that dies here is reported to rank 0, which
/// fails the requests in flight.
pub async fn run_rank(
    cfg: &DeemConfig,
    topo: &Topology,
    weights: &Weights,
    metrics: Arc<Metrics>,
    world: ServeWorld,
) -> Result<Result<(), crate::runtime::Failure>, EngineError> {
    let cfg = &budgeted(cfg, topo)?;
    let wiring = Wiring::new(roles(topo)?.1.len());
    // Failures and restarts of the workers here go to rank 0's scheduler, through the bridge.
    let on_report: OnReport = {
        let inbox = wiring.inbox.0.clone();
        Arc::new(move |r: &Report| {
            let _ = inbox.send(match r {
                Report::Failed(f) => Inbox::WorkerFailed(f.clone()),
                Report::Restarted(r) => Inbox::WorkerRestarted(r.clone()),
            });
        })
    };
    let (supervisor, mut workers, wiring) = start_workers(
        cfg,
        (topo, Some(&world)),
        weights,
        &metrics,
        (wiring, on_report),
    )
    .await?;
    let rank = world.rank();
    let lost: OnReport = Arc::new(move |r: &Report| {
        if let Report::Failed(f) = r {
            tracing::error!(rank, peer = %f.actor, error = %f.error, "lost a peer of the service");
        }
    });
    let bridge = Bridge::start(&world, wiring.ends(), lost).map_err(EngineError::Bridge);
    drop(wiring);
    let end = match bridge {
        Ok(b) => tokio::task::spawn_blocking(move || {
            let end = b.wait_end();
            b.stop();
            end
        })
        .await
        .unwrap_or(Ok(())),
        Err(e) => {
            workers.stop().await;
            supervisor.stop().await;
            return Err(e);
        }
    };
    workers.stop().await;
    supervisor.stop().await;
    Ok(end)
}

/// A vision or diffusion status in the shards' shape (no sequences, no cache).
fn widen<D>(s: ComputeStatus<D>) -> WorkerStatus {
    ComputeStatus {
        name: s.name,
        device: s.device,
        state: s.state,
        jobs: s.jobs,
        error: s.error,
        detail: ShardDetail::default(),
    }
}

/// Spawns vision, the shards (wired shard → shard → scheduler) and diffusion under `supervisor`.
#[allow(clippy::too_many_arguments)]
async fn spawn_workers(
    cfg: &DeemConfig,
    (topo, world): (&Topology, Option<&ServeWorld>),
    source: &SharedSource,
    wiring: &Wiring,
    metrics: &Arc<Metrics>,
    supervisor: &Supervisor,
    workers: &mut Workers,
    (vision, shards, diffusion): (&Placement, &[&Placement], &Placement),
) -> Result<(), EngineError> {
    let started = |p: &Placement| {
        let actor = p.name.clone();
        move |source| EngineError::Start { actor, source }
    };
    let ids = special_ids(cfg);
    // Vision.
    let (c, src, device) = (cfg.clone(), source.clone(), vision.device.into());
    let (input, output) = (wiring.vision.1.clone(), wiring.inbox.0.clone());
    let specs = specs_of(cfg, (topo, world), vision, move || {
        let mut vs = nn::VarStore::new(device);
        let stage = deem::with_init_lock(None, || VisionStage::new(&vs.root(), &c));
        deem::train::set_dtype(&mut vs, c.model.dtype);
        load(&vs, &src, &c, Part::Vision)?;
        Ok(VisionWorker {
            stage,
            device,
            input: input.clone(),
            output: output.clone(),
        })
    });
    if hosts(world, vision) {
        let w = supervisor.spawn_restartable(specs).await;
        workers.vision = Some(w.map_err(started(vision))?);
    }
    // Shards.
    for (i, p) in shards.iter().enumerate() {
        let (c, src, device) = (cfg.clone(), source.clone(), p.device.into());
        let layers = p.layers.clone().unwrap_or(0..cfg.llm.num_hidden_layers);
        let input = wiring.shards[i].1.clone();
        let next = match wiring.shards.get(i + 1) {
            Some((tx, _)) => ShardNext::Shard(tx.clone()),
            None => ShardNext::Scheduler(wiring.inbox.0.clone()),
        };
        let (name, m, slots) = (
            p.name.clone(),
            metrics.serve.clone(),
            cfg.serve.max_running as i64,
        );
        let specs = specs_of(cfg, (topo, world), p, move || {
            let mut vs = nn::VarStore::new(device);
            let shard = deem::with_init_lock(None, || {
                LlamaShard::new(&vs.root(), &LlamaConfig::from(&c.llm), layers.clone())
            })?;
            // Served in the model's dtype: the checkpoint's tensors are converted as they load.
            deem::train::set_dtype(&mut vs, c.model.dtype);
            load(&vs, &src, &c, Part::Llm(shard.range.clone()))?;
            Ok(ShardWorker {
                name: name.clone(),
                shard,
                ids,
                device,
                input: input.clone(),
                next: next.clone(),
                metrics: m.clone(),
                slots,
            })
        });
        if hosts(world, p) {
            let w = supervisor.spawn_restartable(specs).await;
            workers.shards.push(w.map_err(started(p))?);
        }
    }
    // Diffusion.
    let (c, src, device) = (cfg.clone(), source.clone(), diffusion.device.into());
    let (input, output, m) = (
        wiring.diffusion.1.clone(),
        wiring.inbox.0.clone(),
        metrics.serve.clone(),
    );
    let (name, max_batch) = (diffusion.name.clone(), cfg.serve.max_running.max(1));
    let specs = specs_of(cfg, (topo, world), diffusion, move || {
        let mut vs = nn::VarStore::new(device);
        let stage = deem::with_init_lock(None, || DiffusionStage::new(&vs.root(), &c));
        deem::train::set_dtype(&mut vs, c.model.dtype);
        load(&vs, &src, &c, Part::Diffusion)?;
        Ok(DiffusionWorker {
            name: name.clone(),
            stage,
            device,
            input: input.clone(),
            output: output.clone(),
            metrics: m.clone(),
            max_batch,
        })
    });
    if hosts(world, diffusion) {
        let w = supervisor.spawn_restartable(specs).await;
        workers.diffusion = Some(w.map_err(started(diffusion))?);
    }
    Ok(())
}
