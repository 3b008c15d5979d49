//! `deem train`: runs DEEM training — pipelined over the actors of a topology, or with
//! `--single-process` the reference trainer (`deem::train::Trainer`) on one device — over the built-in
//! synthetic batches, with a progress bar, Prometheus metrics and a run directory holding one JSON line
//! per step (`steps.jsonl`, the same fields either way, so two runs compare line by line) and the final
//! weights (`model.safetensors`, reference key names).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use deem::data::SyntheticBatches;
use deem::model::Batch;
use deem::train::{StepReport, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::metrics::{ActorLabels, LossLabels, Metrics};
use crate::pipeline::driver::StepTiming;
use crate::pipeline::PipelineTrainer;
use crate::settings::LoadedConfig;
use crate::topology::Topology;

/// Where the steps run.
pub enum Mode {
    /// The reference trainer on one device.
    SingleProcess(deem::DeviceSpec),
    /// The actors of a topology.
    Pipeline(Topology),
}

pub struct TrainJob {
    pub run_dir: PathBuf,
    pub steps: Option<u64>,
    pub mode: Mode,
    pub progress: bool,
}

enum Engine<'rt> {
    Reference(Box<Trainer>),
    Pipeline {
        trainer: Box<PipelineTrainer>,
        rt: &'rt tokio::runtime::Runtime,
    },
}

impl Engine<'_> {
    fn step(&mut self, batch: &Batch) -> anyhow::Result<StepReport> {
        match self {
            Engine::Reference(t) => Ok(t.step(batch)?),
            Engine::Pipeline { trainer, rt } => rt.block_on(trainer.step(batch)),
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

    fn weights(&self) -> anyhow::Result<Vec<(String, tch::Tensor)>> {
        match self {
            Engine::Reference(t) => Ok(t
                .vs
                .variables()
                .into_iter()
                .map(|(k, v)| (k, v.detach().to_device(tch::Device::Cpu)))
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
    rows: u64,
    timing: Option<(Vec<String>, StepTiming)>,
) {
    m.train_steps.inc();
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
    }
}

/// Runs the job; returns the per-step reports. `rt` drives the actors in pipeline mode.
pub fn run(
    job: &TrainJob,
    cfg: &LoadedConfig,
    metrics: &Arc<Metrics>,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Vec<StepReport>> {
    let c = &cfg.config;
    let steps = job.steps.unwrap_or(c.train.steps);
    std::fs::create_dir_all(&job.run_dir)
        .with_context(|| format!("{}: cannot create the run directory", job.run_dir.display()))?;
    let mut engine = match &job.mode {
        Mode::SingleProcess(device) => {
            Engine::Reference(Box::new(Trainer::new(c, (*device).into())?))
        }
        Mode::Pipeline(topo) => Engine::Pipeline {
            trainer: Box::new(rt.block_on(PipelineTrainer::start(c, topo))?),
            rt,
        },
    };
    let result = train_loop(&mut engine, job, cfg, metrics, steps);
    let weights = result.as_ref().ok().map(|_| engine.weights());
    engine.stop();
    let reports = result?;
    if let Some(w) = weights {
        deem::checkpoint::save(&job.run_dir.join("model.safetensors"), &w?)?;
    }
    Ok(reports)
}

fn train_loop(
    engine: &mut Engine<'_>,
    job: &TrainJob,
    cfg: &LoadedConfig,
    metrics: &Arc<Metrics>,
    steps: u64,
) -> anyhow::Result<Vec<StepReport>> {
    let c = &cfg.config;
    let data = SyntheticBatches::new(c, c.train.seed);
    let steps_path = job.run_dir.join("steps.jsonl");
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(&steps_path)
            .with_context(|| format!("{}: cannot create", steps_path.display()))?,
    );
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
    };
    tracing::info!(steps, stage = ?c.train.stage, schedule = ?c.train.schedule, run_dir = %job.run_dir.display(), "training, {mode}");
    let mut reports = Vec::with_capacity(steps as usize);
    for i in 0..steps {
        let batch = data.batch(i);
        let started = std::time::Instant::now();
        let r = engine.step(&batch)?;
        let secs = started.elapsed().as_secs_f64();
        let samples_per_second = c.train.batch_size as f64 / secs.max(1e-9);
        record(metrics, &r, secs, c.train.batch_size, engine.timing());
        if !r.total.is_finite() {
            tracing::warn!(step = r.step, "the loss is not finite");
        }
        writeln!(
            log,
            "{}",
            serde_json::json!({"step": r.step, "total": r.total, "ntp": r.ntp, "nip": r.nip, "csr": r.csr,
                               "grad_norm": r.grad_norm, "lr": r.lr, "seconds": secs,
                               "samples_per_second": samples_per_second})
        )?;
        bar.set_message(format!(
            "loss {:.3} (ntp {:.3} nip {:.3} csr {:.3}) {samples_per_second:.1} samples/s",
            r.total, r.ntp, r.nip, r.csr
        ));
        bar.inc(1);
        reports.push(r);
    }
    bar.finish();
    log.flush()?;
    Ok(reports)
}
