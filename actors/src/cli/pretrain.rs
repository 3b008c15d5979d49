//! `deem pretrain encoder`: contrastive image-caption pretraining of the vision encoder (see
//! `deem::train::clip`), and `deem pretrain decoder`: text-to-image pretraining of the VAE and UNet (see
//! `deem::train::sd`), and `deem pretrain llm`: the LLM from scratch on text, for configurations with no
//! pretrained open_clip / Stable Diffusion / LLaMA checkpoints to start from. All write into one
//! folder: the encoder run `encoder.safetensors` (the image tower under open_clip's names, for
//! `deem train --pretrained`), `clip.safetensors` (both towers, for the decoder run) and
//! `encoder.jsonl`; the decoder run `decoder.safetensors` (`vae.*`, `unet.*` under diffusers' names)
//! and `decoder.jsonl` (one line per step); the LLM run `llm.safetensors` (HF LLaMA names) and
//! `llm.jsonl`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use deem::config::DeemConfig;
use deem::text::tokenizer::DeemTokenizer;
use deem::train::clip::{ClipOptions, ClipReport};
use deem::train::sd::DecoderOptions;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::data::{read_checked, Format};
use crate::cli::train_data::MAX_BAD_RATIO;
use crate::runtime::metrics::Metrics;

/// The image-caption pairs of `data/pairs.jsonl`: pixels [3, S, S] in [0, 1] at `size` and caption
/// ids (`" {caption}"` + EOS).
fn pairs(
    cfg: &DeemConfig,
    data: &Path,
    name: &str,
    size: i64,
    metrics: &Metrics,
) -> anyhow::Result<(Vec<tch::Tensor>, Vec<Vec<i64>>, DeemTokenizer)> {
    let file = data.join(name);
    if !file.exists() {
        anyhow::bail!(
            "{}: missing; pretraining needs the image-caption pairs `deem data synth` writes",
            file.display()
        );
    }
    let (pairs, _) = read_checked(
        &file,
        None,
        Format::Pairs,
        MAX_BAD_RATIO,
        metrics,
        deem::data::readers::read_pairs_jsonl,
    )?;
    let tok = deem::text::tokenizer::load_tokenizer(None, Some(data), cfg)?;
    let mut images = Vec::with_capacity(pairs.len());
    let mut captions = Vec::with_capacity(pairs.len());
    for p in &pairs {
        images.push(deem::models::vision::unit_pixels(&p.image, size as u32));
        captions.push(caption_ids(cfg, &tok, &p.caption)?);
    }
    Ok((images, captions, tok))
}

fn caption_ids(cfg: &DeemConfig, tok: &DeemTokenizer, caption: &str) -> anyhow::Result<Vec<i64>> {
    let text = if caption.is_empty() {
        String::new()
    } else {
        format!(" {caption}")
    };
    let mut ids: Vec<i64> = tok
        .encode(&text, false)?
        .into_iter()
        .map(i64::from)
        .collect();
    ids.push(cfg.llm.eos_token_id);
    Ok(ids)
}

/// Per-step output of a pretraining run: a progress bar (hidden unless `progress`), one JSON line per
/// step in `out/{what}.jsonl`, and the step's loss in `deem_train_loss{part}`.
struct StepLog<'m> {
    bar: ProgressBar,
    log: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    err: Option<std::io::Error>,
    metrics: &'m Metrics,
}

impl<'m> StepLog<'m> {
    fn open(
        out: &Path,
        steps: u64,
        what: &str,
        progress: bool,
        metrics: &'m Metrics,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out)
            .with_context(|| format!("{}: cannot create the output directory", out.display()))?;
        let path = out.join(format!("{what}.jsonl"));
        let log = std::io::BufWriter::new(
            std::fs::File::create(&path)
                .with_context(|| format!("{}: cannot create", path.display()))?,
        );
        let bar = if progress {
            ProgressBar::new(steps)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {what} step {{pos}}/{{len}} [{{bar:30}}] {{msg}} ({{eta}})"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Ok(StepLog {
            bar,
            log,
            path,
            err: None,
            metrics,
        })
    }

    fn record(&mut self, part: &str, loss: f64, line: serde_json::Value, message: String) {
        self.metrics
            .train_loss
            .get_or_create(&crate::runtime::metrics::LossLabels { part: part.into() })
            .set(loss);
        if let Err(e) = writeln!(self.log, "{line}") {
            self.err.get_or_insert(e);
        }
        self.bar.set_message(message);
        self.bar.inc(1);
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.bar.finish_and_clear();
        let written = match self.err.take() {
            Some(e) => Err(e),
            None => self.log.flush(),
        };
        written.with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// Where the encoder's image-caption pairs come from.
pub enum PairSource {
    /// A pairs JSONL file in the data folder.
    File(String),
    /// This many fresh scenes of the synthetic world (with their shape twins when the group is 2),
    /// rendered in memory.
    Scenes(usize),
}

/// `n` fresh scenes of the synthetic world in `data` (its `SYNTH.json` seed and size; see
/// [`deem::data::synth::pretrain_scene`]) as pixels [3, S, S] in [0, 1] at `size` and caption ids; with
/// `group` 2 each scene is followed by its shape twin.
fn fresh_pairs(
    cfg: &DeemConfig,
    data: &Path,
    n: usize,
    group: usize,
    size: i64,
) -> anyhow::Result<(Vec<tch::Tensor>, Vec<Vec<i64>>)> {
    if group > 2 {
        anyhow::bail!(
            "--group {group} with --scenes: a scene has one shape twin, so the group is 1 or 2"
        );
    }
    let file = data.join("SYNTH.json");
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "{}: cannot read; --scenes draws from the synthetic world `deem data synth` wrote there",
            file.display()
        )
    })?;
    let synth: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    let (Some(seed), Some(synth_size)) = (synth["seed"].as_u64(), synth["size"].as_u64()) else {
        anyhow::bail!(
            "{}: expected the integer fields `seed` and `size`",
            file.display()
        );
    };
    let tok = deem::text::tokenizer::load_tokenizer(None, Some(data), cfg)?;
    let mut images = Vec::with_capacity(n * group.max(1));
    let mut captions = Vec::with_capacity(n * group.max(1));
    for k in 0..n as u64 {
        let s = deem::data::synth::pretrain_scene(seed, k, synth_size as u32);
        let twin = (group == 2).then(|| s.shape_twin());
        for scene in std::iter::once(s).chain(twin) {
            images.push(deem::models::vision::unit_pixels(
                &scene.render(),
                size as u32,
            ));
            captions.push(caption_ids(cfg, &tok, &scene.caption())?);
        }
    }
    Ok((images, captions))
}

/// Contrastive encoder pretraining on a pairs file in `data` or on fresh scenes; returns the last
/// step's report.
pub fn encoder(
    cfg: &DeemConfig,
    data: &Path,
    source: &PairSource,
    out: &Path,
    o: &ClipOptions,
    progress: bool,
    metrics: &Metrics,
) -> anyhow::Result<ClipReport> {
    let size = cfg.vision.image_size;
    let (images, captions) = match source {
        PairSource::File(name) => {
            let (images, captions, _) = pairs(cfg, data, name, size, metrics)?;
            (images, captions)
        }
        PairSource::Scenes(n) => fresh_pairs(cfg, data, *n, o.group, size)?,
    };
    let mut log = StepLog::open(out, o.steps, "encoder", progress, metrics)?;
    tracing::info!(
        pairs = images.len(),
        steps = o.steps,
        batch = o.batch_size,
        "contrastive encoder pretraining"
    );
    let mut last = None;
    let weights = deem::train::clip::pretrain(cfg, &images, &captions, o, |r| {
        log.record(
            "contrastive",
            r.loss,
            serde_json::json!({"step": r.step, "loss": r.loss, "accuracy": r.accuracy}),
            format!("loss {:.3} acc {:.2}", r.loss, r.accuracy),
        );
        last = Some(*r);
    })
    .map_err(anyhow::Error::msg)?;
    log.finish()?;
    let tower: Vec<(String, tch::Tensor)> = weights
        .iter()
        .filter(|(n, _)| deem::train::clip::is_image_tower(n))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    deem::checkpoint::save(&out.join("encoder.safetensors"), &tower)?;
    deem::checkpoint::save(&out.join("clip.safetensors"), &weights)?;
    last.ok_or_else(|| anyhow::anyhow!("--steps: expected at least 1 step"))
}

/// Text-to-image decoder pretraining on `data/pairs.jsonl`, conditioned on the text tower of the CLIP
/// in `clip_file` (`deem pretrain encoder`'s `clip.safetensors`); returns the last VAE and UNet losses.
pub fn decoder(
    cfg: &DeemConfig,
    data: &Path,
    clip_file: &Path,
    out: &Path,
    o: &DecoderOptions,
    progress: bool,
    metrics: &Metrics,
) -> anyhow::Result<(f64, f64)> {
    let w = crate::cli::train::read_weights(clip_file)
        .with_context(|| format!("--clip {}", clip_file.display()))?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let clip = deem::train::clip::load(&vs, cfg, &w)
        .map_err(|e| anyhow::anyhow!("--clip {}: {e}", clip_file.display()))?;
    let (images, captions, tok) =
        pairs(cfg, data, "pairs.jsonl", cfg.diffusion.image_size, metrics)?;
    let empty = caption_ids(cfg, &tok, "")?;
    let mut log = StepLog::open(
        out,
        o.vae_steps + o.unet_steps,
        "decoder",
        progress,
        metrics,
    )?;
    tracing::info!(
        pairs = images.len(),
        vae_steps = o.vae_steps,
        unet_steps = o.unet_steps,
        batch = o.batch_size,
        "text-to-image decoder pretraining"
    );
    let mut last = (f64::NAN, f64::NAN);
    let weights = deem::train::sd::pretrain(cfg, &clip, &images, &captions, &empty, o, |r| {
        log.record(
            r.part,
            r.loss,
            serde_json::json!({"part": r.part, "step": r.step, "loss": r.loss}),
            format!("{} loss {:.4}", r.part, r.loss),
        );
        if r.part == "vae" {
            last.0 = r.loss;
        } else {
            last.1 = r.loss;
        }
    })
    .map_err(anyhow::Error::msg)?;
    log.finish()?;
    deem::checkpoint::save(&out.join("decoder.safetensors"), &weights)?;
    Ok(last)
}

/// LLM pretraining: the reference trainer on `device` runs `cfg` (its `train.sources` from `data`,
/// `steps` or the recipe's) from the initialisation in `out/llm-run`; the LLM's weights go to
/// `out/llm.safetensors` and the steps to `out/llm.jsonl`. Returns the first and last NTP loss.
#[allow(clippy::too_many_arguments)]
pub fn llm(
    cfg: &crate::settings::LoadedConfig,
    data: &Path,
    out: &Path,
    steps: Option<u64>,
    device: deem::DeviceSpec,
    progress: bool,
    metrics: &std::sync::Arc<Metrics>,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(f64, f64)> {
    if cfg.config.train.sources.is_empty() {
        anyhow::bail!(
            "{}: train.sources: expected the text data the LLM pretrains on (configs/tiny-llm.toml names text_scenes.json)",
            cfg.base_origin
        );
    }
    let run_dir = out.join("llm-run");
    let job = crate::cli::train::TrainJob {
        run_dir: run_dir.clone(),
        steps,
        mode: crate::cli::train::Mode::SingleProcess(device),
        progress,
        resume: false,
        data: Some(data.to_path_buf()),
        init_from: None,
        pretrained: vec![],
        stop_at: None,
    };
    let reports = crate::cli::train::run_job(&job, cfg, metrics, rt)?;
    let (Some(first), Some(last)) = (reports.first(), reports.last()) else {
        anyhow::bail!("--steps: expected at least 1 step");
    };
    let llm: Vec<(String, tch::Tensor)> = crate::cli::train::read_weights(&run_dir)?
        .into_iter()
        .filter(|(n, _)| deem::train::is_base_llm(n))
        .collect();
    deem::checkpoint::save(&out.join("llm.safetensors"), &llm)?;
    let steps_file = run_dir.join("steps.jsonl");
    std::fs::copy(&steps_file, out.join("llm.jsonl"))
        .with_context(|| format!("{}: cannot copy to {}", steps_file.display(), out.display()))?;
    Ok((first.ntp, last.ntp))
}

/// `deem pretrain encoder | decoder | llm`.
pub fn run(cmd: super::PretrainCommand) -> anyhow::Result<()> {
    match cmd {
        super::PretrainCommand::Encoder {
            data,
            out,
            steps,
            batch_size,
            lr,
            seed,
            pairs,
            group,
            scenes,
            quiet,
            config,
        } => {
            let cfg = config.load()?;
            let pairs = if scenes > 0 {
                crate::cli::pretrain::PairSource::Scenes(scenes)
            } else {
                crate::cli::pretrain::PairSource::File(pairs)
            };
            let o = deem::train::clip::ClipOptions {
                seed,
                steps,
                batch_size,
                lr,
                group,
                ..Default::default()
            };
            let metrics = crate::runtime::metrics::Metrics::new();
            let r = crate::cli::pretrain::encoder(
                &cfg.config,
                &data,
                &pairs,
                &out,
                &o,
                !quiet,
                &metrics,
            )?;
            println!(
                "pretrained the encoder {} steps: contrastive loss {:.4}, in-batch accuracy {:.2}; wrote {}",
                steps,
                r.loss,
                r.accuracy,
                out.join("encoder.safetensors").display()
            );
        }
        super::PretrainCommand::Decoder {
            data,
            clip,
            out,
            vae_steps,
            unet_steps,
            batch_size,
            seed,
            quiet,
            config,
        } => {
            let cfg = config.load()?;
            let o = deem::train::sd::DecoderOptions {
                seed,
                vae_steps,
                unet_steps,
                batch_size,
                ..Default::default()
            };
            let metrics = crate::runtime::metrics::Metrics::new();
            let (vae, unet) = crate::cli::pretrain::decoder(
                &cfg.config,
                &data,
                &clip,
                &out,
                &o,
                !quiet,
                &metrics,
            )?;
            println!(
                "pretrained the decoder: VAE reconstruction loss {vae:.4}, UNet diffusion loss {unet:.4}; wrote {}",
                out.join("decoder.safetensors").display()
            );
        }
        super::PretrainCommand::Llm {
            data,
            out,
            steps,
            device,
            quiet,
            config,
            overrides,
        } => {
            let cfg = super::ConfigArgs {
                config: Some(config),
                overrides,
            }
            .load()?;
            let device = super::train::parse_device(&device)?;
            let runtime = super::train::training_runtime()?;
            let metrics = std::sync::Arc::new(crate::runtime::metrics::Metrics::new());
            let (first, last) = crate::cli::pretrain::llm(
                &cfg, &data, &out, steps, device, !quiet, &metrics, &runtime,
            )?;
            println!(
                "pretrained the LLM: NTP loss {first:.4} → {last:.4}; wrote {}",
                out.join("llm.safetensors").display()
            );
        }
    }
    Ok(())
}
