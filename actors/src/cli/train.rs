//! `deem train`: runs DEEM training — pipelined over the actors of a topology, or with
//! `--single-process` the reference trainer (`deem::train::Trainer`) on one device — over the built-in
//! synthetic batches, with a progress bar, Prometheus metrics and a run directory holding one JSON line
//! per step (`steps.jsonl`, the same fields either way, so two runs compare line by line) and the final
//! weights (`model.safetensors`, reference key names).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use deem::data::batches::SyntheticBatches;
use deem::models::deem::{Batch, Part};
use deem::models::pretrained::{part_spec, summarise, Filled, Pretrained};
use deem::train::{StepReport, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::prefetch::Feed;
use crate::cli::train_data::{dataset_batches, Batches};
use crate::pipeline::checkpoint;
use crate::pipeline::distributed::DistPlan;
use crate::pipeline::driver::StepTiming;
use crate::pipeline::{PipelineError, PipelineTrainer};
use crate::runtime::metrics::{ActorLabels, LossLabels, Metrics};
use crate::runtime::topology::Topology;
use crate::runtime::RuntimeError;
use crate::settings::LoadedConfig;

/// Where the steps run.
pub enum Mode {
    /// The reference trainer on one device.
    SingleProcess(deem::DeviceSpec),
    /// The actors of a topology.
    Pipeline(Topology),
    /// This process's share of a topology spread over the processes of a launched world.
    Distributed(Topology, Arc<DistPlan>),
}

pub struct TrainJob {
    pub run_dir: PathBuf,
    pub steps: Option<u64>,
    pub mode: Mode,
    pub progress: bool,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Train on the datasets of this folder (as `deem data synth` writes it) instead of the built-in
    /// batches: the recipe's `train.sources`, or the stage's own mix (see [`crate::cli::train_data::dataset_batches`]).
    pub data: Option<PathBuf>,
    /// Start from this model (a previous stage's run directory or `model.safetensors`).
    pub init_from: Option<PathBuf>,
    /// Pretrained components loaded over the initialisation, in order, through the one loader
    /// (`deem::models::pretrained`: roles recognised, names mapped, names and shapes checked).
    pub pretrained: Vec<PathBuf>,
    /// Stop (with a checkpoint) once this many steps are done, without changing the schedule the
    /// run's `train.steps` sets; `--resume` continues it.
    pub stop_at: Option<u64>,
}

/// The weights of a model file or run directory (`--init-from`, `deem pretrain decoder --clip`).
pub fn read_weights(
    path: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, tch::Tensor>> {
    let file = if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    let ck = deem::checkpoint::Checkpoint::open(&file)?;
    let mut out = std::collections::BTreeMap::new();
    for name in ck.names().map(String::from).collect::<Vec<_>>() {
        if let Some(t) = ck.tensor(&name)? {
            out.insert(name, t);
        }
    }
    Ok(out)
}

/// Opens `paths` with the one loader (roles recognised, names mapped) for `flag` (`--pretrained`).
fn open_pretrained(
    paths: &[PathBuf],
    c: &deem::config::DeemConfig,
    flag: &str,
) -> anyhow::Result<Arc<Pretrained>> {
    let pre = Pretrained::open(paths, Some(c)).map_err(|e| anyhow::anyhow!("{flag} {e}"))?;
    for note in &pre.notes {
        tracing::info!("{flag} {note}");
    }
    for s in &pre.sources {
        let skipped: Vec<String> = s
            .skipped
            .iter()
            .map(|(why, keys)| format!("{why}: {} tensors", keys.len()))
            .collect();
        if skipped.is_empty() {
            tracing::info!(role = s.role.describe(), "{flag} {}", s.path.display());
        } else {
            tracing::info!(
                role = s.role.describe(),
                skipped = %skipped.join("; "),
                "{flag} {}",
                s.path.display()
            );
        }
    }
    Ok(Arc::new(pre))
}

/// Logs which parameters each source filled and which kept their initialisation.
fn log_filled(pre: &Pretrained, filled: &[Filled], flag: &str) {
    for (i, s) in pre.sources.iter().enumerate() {
        let names: Vec<String> = filled
            .iter()
            .flat_map(|f| f.by_source[i].iter().cloned())
            .collect();
        tracing::info!(
            tensors = names.len(),
            "{flag} {} ({}) filled {}",
            s.path.display(),
            s.role.describe(),
            summarise(&names)
        );
    }
    let kept: Vec<String> = filled.iter().flat_map(|f| f.kept.iter().cloned()).collect();
    if !kept.is_empty() {
        tracing::info!(
            tensors = kept.len(),
            "{flag}: kept their initialisation: {}",
            summarise(&kept)
        );
    }
}

enum Engine<'rt> {
    Reference(Box<Trainer>),
    Pipeline {
        trainer: Box<PipelineTrainer>,
        rt: &'rt tokio::runtime::Runtime,
    },
}

impl<'rt> Engine<'rt> {
    fn start(
        mode: &Mode,
        c: &deem::config::DeemConfig,
        rt: &'rt tokio::runtime::Runtime,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Ok(match mode {
            Mode::SingleProcess(device) => {
                Engine::Reference(Box::new(Trainer::new(c, (*device).into())?))
            }
            Mode::Pipeline(topo) => Engine::Pipeline {
                trainer: Box::new(rt.block_on(PipelineTrainer::start_with(
                    c,
                    topo,
                    Some(metrics.clone()),
                ))?),
                rt,
            },
            Mode::Distributed(topo, plan) => Engine::Pipeline {
                trainer: Box::new(rt.block_on(PipelineTrainer::start_on(
                    c,
                    topo,
                    Some(metrics.clone()),
                    Some(plan.clone()),
                ))?),
                rt,
            },
        })
    }

    /// Loads `pre` into the model's parameters and their fp32 masters (not the optimizer moments);
    /// with `complete` every parameter needs a value. Returns what each stage filled.
    fn load(
        &mut self,
        c: &deem::config::DeemConfig,
        pre: &Arc<Pretrained>,
        complete: bool,
    ) -> anyhow::Result<Vec<Filled>> {
        match self {
            Engine::Pipeline { trainer, rt } => {
                Ok(rt.block_on(trainer.load_pretrained(pre, complete))?)
            }
            Engine::Reference(t) => {
                let spec = part_spec(c, &Part::Whole);
                let opt = &mut t.opt;
                let filled =
                    pre.load_into(&t.vs, &spec, complete, |n, src| opt.set_master(n, src))?;
                Ok(vec![filled])
            }
        }
    }

    fn step(&mut self, batch: &Batch, kill: Option<(&str, usize)>) -> anyhow::Result<StepReport> {
        match self {
            Engine::Reference(t) => Ok(t.step(batch)?),
            Engine::Pipeline { trainer, rt } => {
                Ok(rt.block_on(trainer.step_with_fault(batch, kill))?)
            }
        }
    }

    /// After a failed step: the supervisor's restart policy (every actor afresh from the latest
    /// checkpoint; returns the step it resumes at), or `None` when it refuses (the budget is spent, or
    /// the reference trainer, which has no actors).
    fn restart(
        &mut self,
        run_dir: &std::path::Path,
        failed: String,
    ) -> Option<anyhow::Result<u64>> {
        let Engine::Pipeline { trainer, rt } = self else {
            return None;
        };
        if trainer.is_distributed() {
            // The other processes cannot be restarted from here: this process fails, and the
            // launcher (deem launch, torchrun) restarts the world from the latest checkpoint.
            return None;
        }
        match rt.block_on(trainer.restart(run_dir, failed)) {
            Ok(at) => Some(Ok(at)),
            Err(PipelineError::Runtime(RuntimeError::RestartsExhausted { .. })) => None,
            Err(e) => Some(Err(anyhow::Error::new(e).context("restarting the actors"))),
        }
    }

    /// Optimizer steps completed = the index of the next batch.
    fn cursor(&self) -> u64 {
        match self {
            Engine::Reference(t) => t.step,
            Engine::Pipeline { trainer, .. } => trainer.steps_done(),
        }
    }

    fn save_checkpoint(
        &self,
        run_dir: &std::path::Path,
        c: &deem::config::DeemConfig,
        topology: &str,
    ) -> anyhow::Result<()> {
        match self {
            Engine::Pipeline { trainer, rt } => {
                rt.block_on(trainer.save_checkpoint(run_dir, topology))?;
            }
            Engine::Reference(t) => {
                let write = || -> anyhow::Result<()> {
                    let tmp = checkpoint::begin(run_dir, t.step)?;
                    deem::train::save_shard(&tmp.join("trainer.safetensors"), &t.vs, &t.opt)?;
                    let manifest =
                        checkpoint::Manifest::new(c, t.step, topology, vec!["trainer".into()])
                            .with_scaler(&t.scaler);
                    checkpoint::commit(run_dir, &tmp, &manifest)?;
                    Ok(())
                };
                write().map_err(|e| checkpoint::abandon(run_dir, t.step, format!("{e:#}")))?;
            }
        }
        Ok(())
    }

    fn resume(
        &mut self,
        run_dir: &std::path::Path,
        c: &deem::config::DeemConfig,
    ) -> anyhow::Result<u64> {
        match self {
            Engine::Pipeline { trainer, rt } => Ok(rt.block_on(trainer.resume(run_dir))?.step),
            Engine::Reference(t) => {
                let (dir, manifest) = checkpoint::latest_of(run_dir, c)?;
                let ck = deem::checkpoint::Checkpoint::open(&dir)?;
                deem::train::load_shard(&ck, &t.vs, &mut t.opt, manifest.optimizer_steps())?;
                t.step = manifest.step;
                t.scaler = manifest
                    .scaler
                    .unwrap_or_else(|| deem::train::LossScaler::of(c));
                Ok(manifest.step)
            }
        }
    }

    fn timing(&self) -> Option<(Vec<String>, StepTiming)> {
        match self {
            Engine::Reference(_) => None,
            Engine::Pipeline { trainer, .. } => trainer
                .last_timing
                .clone()
                .map(|t| (trainer.stages.iter().map(|s| s.name.clone()).collect(), t)),
        }
    }

    /// The whole model's parameters (across processes: those of the run's latest checkpoint).
    fn weights(&self, run_dir: &std::path::Path) -> anyhow::Result<Vec<(String, tch::Tensor)>> {
        match self {
            Engine::Reference(t) => Ok(deem::train::cpu_weights(&t.vs)),
            Engine::Pipeline { trainer, rt } if trainer.is_distributed() => Ok(rt
                .block_on(trainer.model_weights(run_dir))?
                .into_iter()
                .collect()),
            Engine::Pipeline { trainer, rt } => {
                Ok(rt.block_on(trainer.weights())?.into_iter().collect())
            }
        }
    }

    fn stop(self) {
        if let Engine::Pipeline { trainer, rt } = self {
            rt.block_on(trainer.stop());
        }
    }
}

fn record(
    m: &Metrics,
    r: &StepReport,
    seconds: f64,
    batch: &Batch,
    timing: Option<(Vec<String>, StepTiming)>,
) {
    let rows = batch.input_ids.size()[0] as u64;
    m.train_steps.inc();
    m.train_samples.inc_by(rows);
    m.train_tokens.inc_by(batch.input_ids.numel() as u64);
    for (part, v) in [
        ("total", r.total),
        ("ntp", r.ntp),
        ("nip", r.nip),
        ("csr", r.csr),
    ] {
        m.train_loss
            .get_or_create(&LossLabels { part: part.into() })
            .set(v);
    }
    m.train_step_seconds.observe(seconds);
    m.train_samples_per_second
        .set(rows as f64 / seconds.max(1e-9));
    m.train_grad_norm.set(r.grad_norm);
    m.train_learning_rate.set(r.lr);
    m.precision.loss_scale.set(r.loss_scale);
    if r.skipped {
        m.precision.skipped_steps.inc();
    }
    if let Some((names, t)) = timing {
        for (i, name) in names.iter().enumerate() {
            let l = ActorLabels {
                actor: name.clone(),
            };
            m.train_actor_busy_seconds
                .get_or_create(&l)
                .inc_by(t.busy_seconds[i]);
            m.train_actor_idle_seconds
                .get_or_create(&l)
                .inc_by(t.idle_seconds[i]);
        }
        let (busy, idle): (f64, f64) = (t.busy_seconds.iter().sum(), t.idle_seconds.iter().sum());
        m.train_bubble_ratio.set(idle / (busy + idle).max(1e-12));
        for (edge, traffic) in &t.p2p {
            let l = crate::runtime::metrics::EdgeLabels { edge: edge.clone() };
            m.dist.p2p_bytes.get_or_create(&l).inc_by(traffic.bytes);
            m.dist.p2p_seconds.get_or_create(&l).inc_by(traffic.seconds);
        }
        m.dist.allreduce_bytes.inc_by(t.all_reduce.0);
        m.dist.allreduce_seconds.inc_by(t.all_reduce.1);
        for (edge, (bytes, depth)) in t.edges {
            let l = crate::runtime::metrics::EdgeLabels { edge };
            m.pipeline_edge_bytes.get_or_create(&l).inc_by(bytes);
            m.pipeline_edge_queue_depth
                .get_or_create(&l)
                .set(depth as i64);
        }
    }
}

/// Runs the job; returns the per-step reports (the last report of every step index). `rt` drives the
/// actors in pipeline mode.
pub fn run_job(
    job: &TrainJob,
    cfg: &LoadedConfig,
    metrics: &Arc<Metrics>,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Vec<StepReport>> {
    // `--steps N` is the run's length: the LR schedule (warm-up, cosine decay) spans those N steps.
    let with_steps;
    let cfg = match job.steps {
        Some(n) if n != cfg.config.train.steps => {
            let mut owned = cfg.clone();
            owned.config.train.steps = n;
            with_steps = owned;
            &with_steps
        }
        _ => cfg,
    };
    let c = &cfg.config;
    let steps = c.train.steps;
    std::fs::create_dir_all(&job.run_dir)
        .with_context(|| format!("{}: cannot create the run directory", job.run_dir.display()))?;
    let topology_name = match &job.mode {
        Mode::SingleProcess(_) => "single-process".to_string(),
        Mode::Pipeline(t) | Mode::Distributed(t, _) => t.name.clone(),
    };
    let mut engine = Engine::start(&job.mode, c, rt, metrics)?;
    if job.resume {
        let at = engine.resume(&job.run_dir, c)?;
        tracing::info!(
            step = at,
            "resumed from {}",
            checkpoint::checkpoints_dir(&job.run_dir).display()
        );
    } else {
        // Each stage takes its own tensors from the files: no process holds the whole model.
        let starts = [
            ("--pretrained", job.pretrained.clone(), false),
            ("--init-from", job.init_from.iter().cloned().collect(), true),
        ];
        for (flag, paths, complete) in starts {
            if paths.is_empty() {
                continue;
            }
            let pre = open_pretrained(&paths, c, flag)?;
            let filled = engine
                .load(c, &pre, complete)
                .map_err(|e| anyhow::anyhow!("{flag}: {e:#}"))?;
            log_filled(&pre, &filled, flag);
        }
        // A restart needs a checkpoint to return to, even before the first periodic one.
        engine.save_checkpoint(&job.run_dir, c, &topology_name)?;
    }
    let result = train_loop(&mut engine, job, cfg, metrics, steps, &topology_name);
    let leader = leads(&job.mode);
    let final_state = result.as_ref().ok().map(|_| {
        engine
            .save_checkpoint(&job.run_dir, c, &topology_name)
            .and_then(|_| engine.weights(&job.run_dir))
    });
    engine.stop();
    if let (Mode::Distributed(_, d), Some(Ok(_))) = (&job.mode, &final_state) {
        d.world.finish();
    }
    let reports = result?;
    if let Some(w) = final_state {
        let w = w?;
        if leader {
            deem::checkpoint::save(&job.run_dir.join("model.safetensors"), &w)?;
        }
    }
    Ok(reports)
}

/// The rows of each global batch this process trains on: its replica's microbatches in data
/// parallelism, else all of them.
fn own_rows(job: &TrainJob, c: &deem::config::DeemConfig) -> std::ops::Range<usize> {
    let rows = c.train.batch_size as usize;
    match &job.mode {
        Mode::Distributed(_, d) if d.data_parallel > 1 => {
            let per_mb = rows / c.train.microbatches as usize;
            let per = d.per_replica(c.train.microbatches) as usize;
            let first = d.replica as usize * per * per_mb;
            first..first + per * per_mb
        }
        _ => 0..rows,
    }
}

/// Whether this process writes the run's files (`steps.jsonl`, `model.safetensors`): every process but
/// the ranks above 0 of a world.
fn leads(mode: &Mode) -> bool {
    !matches!(mode, Mode::Distributed(_, d) if d.world.rank() != 0)
}

fn train_loop<'rt>(
    engine: &mut Engine<'rt>,
    job: &TrainJob,
    cfg: &LoadedConfig,
    metrics: &Arc<Metrics>,
    steps: u64,
    topology_name: &str,
) -> anyhow::Result<Vec<StepReport>> {
    let c = &cfg.config;
    let devices = match &job.mode {
        Mode::SingleProcess(d) => vec![*d],
        Mode::Pipeline(t) | Mode::Distributed(t, _) => t.devices(),
    };
    let data: Arc<dyn Batches> = match &job.data {
        Some(dir) => Arc::new(dataset_batches(c, dir, metrics)?),
        None => Arc::new(SyntheticBatches::new(c, c.train.seed)),
    };
    let mut feed = Feed::new(data, own_rows(job, c), c);
    let steps_path = job.run_dir.join("steps.jsonl");
    if job.resume && leads(&job.mode) {
        drop_steps_from(&steps_path, engine.cursor())?;
    }
    let file: Box<dyn Write> = if leads(&job.mode) {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(job.resume)
                .write(true)
                .truncate(!job.resume)
                .open(&steps_path)
                .with_context(|| format!("{}: cannot open", steps_path.display()))?,
        )
    } else {
        Box::new(std::io::sink())
    };
    let mut log = std::io::BufWriter::new(file);
    let bar = if job.progress {
        ProgressBar::new(steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mode = match &job.mode {
        Mode::SingleProcess(d) => format!("single process on {d}"),
        Mode::Pipeline(t) => format!(
            "pipelined over topology {} ({} actors)",
            t.name,
            t.actors.len()
        ),
        Mode::Distributed(t, d) => format!(
            "rank {} of {}: pipeline rank {} of replica {} of topology {} ({} actors over {} processes)",
            d.world.rank(),
            d.world.size(),
            d.pipeline_rank,
            d.replica,
            t.name,
            t.actors.len(),
            t.world_size()
        ),
    };
    tracing::info!(steps, stage = ?c.train.stage, schedule = ?c.train.schedule, run_dir = %job.run_dir.display(), "training, {mode}");
    let mut reports: Vec<StepReport> = Vec::with_capacity(steps as usize);
    // A world the launcher restarted does not inject its fault again.
    let mut fault_fired =
        matches!(&job.mode, Mode::Distributed(_, d) if d.world.env.restart_count > 0);
    bar.set_position(engine.cursor());
    let end = job.stop_at.map_or(steps, |s| s.min(steps));
    while engine.cursor() < end {
        let i = engine.cursor();
        let batch = feed.take(i, metrics)?;
        let kill = c
            .fault
            .as_ref()
            .filter(|f| !fault_fired && f.at_step == i)
            .map(|f| (f.kill_actor.clone(), f.at_op.unwrap_or(0)));
        fault_fired |= kill.is_some();
        let started = std::time::Instant::now();
        let r = match engine.step(&batch, kill.as_ref().map(|(a, op)| (a.as_str(), *op))) {
            Ok(r) => r,
            Err(e) => match engine.restart(&job.run_dir, format!("{e:#}")) {
                Some(at) => {
                    let at = at?;
                    writeln!(
                        log,
                        "{}",
                        serde_json::json!({"event": "restart", "failed_step": i, "resumed_at": at, "error": format!("{e:#}")})
                    )?;
                    reports.truncate(at as usize);
                    bar.set_position(at);
                    continue;
                }
                None => return Err(e.context(format!("step {i} failed"))),
            },
        };
        let secs = started.elapsed().as_secs_f64();
        let samples_per_second = c.train.batch_size as f64 / secs.max(1e-9);
        let tokens_per_second = batch.input_ids.numel() as f64 / secs.max(1e-9);
        record(metrics, &r, secs, &batch, engine.timing());
        metrics.precision.sample_devices(&devices);
        if !r.total.is_finite() {
            tracing::warn!(step = r.step, "the loss is not finite");
        }
        writeln!(
            log,
            "{}",
            serde_json::json!({"step": r.step, "total": r.total, "ntp": r.ntp, "nip": r.nip, "csr": r.csr,
                               "grad_norm": r.grad_norm, "lr": r.lr, "seconds": secs,
                               "samples_per_second": samples_per_second,
                               "tokens_per_second": tokens_per_second})
        )?;
        log.flush()?;
        bar.set_message(format!(
            "loss {:.3} (ntp {:.3} nip {:.3} csr {:.3}) {samples_per_second:.1} samples/s",
            r.total, r.ntp, r.nip, r.csr
        ));
        bar.inc(1);
        reports.push(r);
        let every = c.train.checkpoint_every;
        if every > 0 && engine.cursor() % every == 0 && engine.cursor() < end {
            let t = std::time::Instant::now();
            engine.save_checkpoint(&job.run_dir, c, topology_name)?;
            metrics
                .train_checkpoint_seconds
                .observe(t.elapsed().as_secs_f64());
        }
    }
    bar.finish();
    log.flush()?;
    Ok(reports)
}

/// Drops the lines of `steps.jsonl` for steps at or after `cursor` (a resumed run logs them again);
/// event lines stay. A missing file is fine.
fn drop_steps_from(path: &std::path::Path, cursor: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_none_or(|s| s < cursor)
        })
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(
        &tmp,
        kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))?;
    Ok(())
}

/// The runtime the training commands (train, experiment, pretrain llm) drive their actors from.
pub(crate) fn training_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// A `--device` value that this machine has.
pub(crate) fn parse_device(s: &str) -> anyhow::Result<deem::DeviceSpec> {
    let device: deem::DeviceSpec = s.parse().map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    if let deem::DeviceSpec::Cuda(n) = device {
        let have = deem::device::cuda_device_count();
        if n >= have {
            anyhow::bail!(
                "--device: \"{device}\" is not available ({have} CUDA device(s)); use --device cpu"
            );
        }
    }
    Ok(device)
}

/// A launched world this process joins instead of running every actor itself: `None` without a
/// launcher's variables, with `--single-process`, or for a world of one process and a topology of one.
fn join_world(
    args: &super::TrainArgs,
    cfg: &LoadedConfig,
    topo: &Topology,
) -> anyhow::Result<Option<Arc<DistPlan>>> {
    let Some(env) = super::launch::launched(topo)? else {
        return Ok(None);
    };
    let timeout = std::time::Duration::from_secs(args.peer_timeout);
    tracing::info!(rank = env.rank, world = env.world_size, master = %format!("{}:{}", env.master_addr, env.master_port), source = env.source, "joining the world");
    let world = Arc::new(crate::dist::World::join(env, timeout)?);
    Ok(Some(Arc::new(DistPlan::new(world, topo, &cfg.config)?)))
}

/// Refuses, before any actor starts, a placement whose CUDA devices cannot hold what the planner
/// predicts for them (`deem plan`'s estimate, full-length rows of one image). Devices whose memory is
/// unknown (the CPU) are not checked.
fn fits(
    c: &deem::config::DeemConfig,
    topo: &crate::runtime::topology::Topology,
) -> anyhow::Result<()> {
    if !topo
        .devices()
        .iter()
        .any(|d| matches!(d, deem::DeviceSpec::Cuda(_)))
    {
        return Ok(());
    }
    let shape = super::plan::rows_of(c, c.llm.max_position_embeddings, 1);
    // The time is not used: any throughput does.
    let costs = super::plan::estimate(c, shape, 400.0);
    let p = crate::pipeline::plan::plan(c, topo, &costs);
    crate::pipeline::plan::check_fits(&p, &|d| super::plan::capacity(d, None))
        .context("checked before starting (--skip-memory-check to start anyway)")
}

/// `deem train`.
pub fn run(args: super::TrainArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    let mut resume = args.resume;
    let mut metrics_addr = args.metrics_addr;
    let mut metrics = crate::runtime::metrics::Metrics::new();
    let mode = if args.single_process {
        Mode::SingleProcess(parse_device(&args.device)?)
    } else {
        let topo = args
            .topology
            .load(&cfg, deem::device::cuda_device_count())?;
        if !args.skip_memory_check {
            fits(&cfg.config, &topo)?;
        }
        match join_world(&args, &cfg, &topo)? {
            None => Mode::Pipeline(topo),
            Some(plan) => {
                let env = &plan.world.env;
                metrics = crate::runtime::metrics::Metrics::for_rank(env.rank, &env.node);
                // Every rank of a node serves /metrics on the base port + its local rank.
                if let Some(a) = metrics_addr.as_mut() {
                    a.set_port(a.port() + env.local_rank as u16);
                }
                // A world the launcher restarted continues from the latest checkpoint.
                if env.restart_count > 0 && checkpoint::latest(&args.run_dir).is_ok() {
                    tracing::info!(
                        restart = env.restart_count,
                        "restarted by the launcher: resuming"
                    );
                    resume = true;
                }
                Mode::Distributed(topo, plan)
            }
        }
    };
    let job = TrainJob {
        run_dir: args.run_dir.clone(),
        steps: args.steps,
        mode,
        progress: !args.quiet,
        resume,
        data: args.data.clone(),
        init_from: args.init_from.clone(),
        pretrained: args.pretrained.clone(),
        stop_at: args.stop_at,
    };
    let runtime = training_runtime()?;
    let server = match metrics_addr {
        Some(addr) => Some(runtime.block_on(crate::runtime::http::Server::start(
            addr,
            crate::runtime::http::router(metrics.clone()),
        ))?),
        None => None,
    };
    let reports = run_job(&job, &cfg, &metrics, &runtime)?;
    if let Some(s) = server {
        runtime.block_on(s.stop())?;
    }
    if let (Some(first), Some(last)) = (reports.first(), reports.last()) {
        if leads(&job.mode) {
            println!(
                "trained {} steps: loss {:.4} → {:.4}; wrote {}",
                reports.len(),
                first.total,
                last.total,
                job.run_dir.display()
            );
        }
    }
    Ok(())
}
