//! `deem train --single-process`: the reference trainer (`deem::train::Trainer`) on one device, over the
//! built-in synthetic batches, with a progress bar, Prometheus metrics and a run directory holding the
//! per-step report (`steps.jsonl`) and the final weights (`model.safetensors`, reference key names).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use deem::data::SyntheticBatches;
use deem::train::{StepReport, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::metrics::{LossLabels, Metrics};
use crate::settings::LoadedConfig;

pub struct TrainJob {
    pub run_dir: PathBuf,
    pub steps: Option<u64>,
    pub device: deem::DeviceSpec,
    pub progress: bool,
}

fn record(m: &Metrics, r: &StepReport, seconds: f64, rows: u64) {
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
}

/// Runs the job; returns the per-step reports.
pub fn run(
    job: &TrainJob,
    cfg: &LoadedConfig,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Vec<StepReport>> {
    let c = &cfg.config;
    let steps = job.steps.unwrap_or(c.train.steps);
    std::fs::create_dir_all(&job.run_dir)
        .with_context(|| format!("{}: cannot create the run directory", job.run_dir.display()))?;
    let mut trainer = Trainer::new(c, job.device.into())?;
    let data = SyntheticBatches::new(c, c.train.seed);
    let losses_path = job.run_dir.join("steps.jsonl");
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(&losses_path)
            .with_context(|| format!("{}: cannot create", losses_path.display()))?,
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
    tracing::info!(steps, stage = ?c.train.stage, run_dir = %job.run_dir.display(), "training (single process)");
    let mut reports = Vec::with_capacity(steps as usize);
    for i in 0..steps {
        let batch = data.batch(i);
        let started = std::time::Instant::now();
        let r = trainer.step(&batch)?;
        let secs = started.elapsed().as_secs_f64();
        record(metrics, &r, secs, c.train.batch_size);
        writeln!(
            log,
            "{}",
            serde_json::json!({"step": r.step, "total": r.total, "ntp": r.ntp, "nip": r.nip, "csr": r.csr,
                               "grad_norm": r.grad_norm, "lr": r.lr, "seconds": secs,
                               "samples_per_second": c.train.batch_size as f64 / secs})
        )?;
        bar.set_message(format!(
            "loss {:.3} (ntp {:.3} nip {:.3} csr {:.3}) {:.1} samples/s",
            r.total,
            r.ntp,
            r.nip,
            r.csr,
            c.train.batch_size as f64 / secs
        ));
        bar.inc(1);
        reports.push(r);
    }
    bar.finish();
    log.flush()?;
    let weights: Vec<(String, tch::Tensor)> = trainer
        .vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(tch::Device::Cpu)))
        .collect();
    deem::checkpoint::save(&job.run_dir.join("model.safetensors"), &weights)?;
    Ok(reports)
}
