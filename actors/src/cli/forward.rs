//! `deem forward`: runs one component from a checkpoint on inputs read from a safetensors file and
//! writes its outputs to another — the way to check converted weights against the reference library.
//!
//! | component | inputs | outputs |
//! |---|---|---|
//! | `llm` | `input_ids` int64 [B, T] | `logits` [B, T, vocab (+ new tokens)] |
//! | `vision` | `pixel_values` [B, 3, S, S] | `tokens`, `multiscale_0` … `multiscale_3` |
//! | `resampler` | `image_tokens` [B, N, C] | `visual_tokens`, `csr_condition` |
//! | `unet` | `sample`, `timestep` [B], `encoder_hidden_states` | `noise_pred` |
//! | `vae-encode` | `pixel_values` in [−1, 1] | `latent_mean` |
//! | `vae-decode` | `latents` (unscaled) | `pixel_values` |
//! | `sample` | `noise`, `encoder_hidden_states` (+ `uncond_hidden_states` for guidance) | `latents` |

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use deem::checkpoint::{self, Checkpoint};
use deem::config::SamplerKind;
use deem::models::diffusion::{self, AutoencoderKL, Sampler, UNet2DCondition};
use deem::models::llama::{LlamaConfig, LlamaShard};
use deem::models::pretrained::Pretrained;
use deem::models::resampler::Resampler;
use deem::models::vision::VisionEncoder;
use deem::DeviceSpec;
use tch::{nn, Kind, Tensor};

use crate::settings::LoadedConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Component {
    Llm,
    Vision,
    Resampler,
    Unet,
    VaeEncode,
    VaeDecode,
    Sample,
}

/// One `deem forward` invocation.
#[derive(Debug, Clone)]
pub struct ForwardJob {
    pub component: Component,
    pub checkpoint: PathBuf,
    pub inputs: PathBuf,
    pub output: PathBuf,
    pub device: DeviceSpec,
    /// The sampler, its steps and the guidance scale for `sample`.
    pub scheduler: deem::config::SamplerKind,
    pub steps: i64,
    pub guidance: f64,
}

fn input(inputs: &Checkpoint, name: &str, file: &Path, expect: &str) -> anyhow::Result<Tensor> {
    match inputs.tensor(name)? {
        Some(t) => Ok(t),
        None => {
            let have: Vec<&str> = inputs.names().collect();
            bail!(
                "{}: no tensor `{name}` ({expect}); the file holds {have:?}",
                file.display()
            )
        }
    }
}

fn check_rank(t: &Tensor, name: &str, file: &Path, rank: usize, what: &str) -> anyhow::Result<()> {
    if t.dim() != rank {
        bail!(
            "{}: `{name}` has shape {:?}; expected {what}",
            file.display(),
            t.size()
        );
    }
    Ok(())
}

/// Rows of DEEM's appended token embedding in a checkpoint (0 for a plain HF one).
fn new_token_rows(ck: &Checkpoint) -> i64 {
    [
        "model.embed_tokens_new.weight",
        "mm_decoder.embed_tokens_new.weight",
        "lm_head_new.weight",
    ]
    .iter()
    .find_map(|k| ck.shape(k))
    .map_or(0, |s| s[0])
}

fn config_json(dir: &Path) -> anyhow::Result<PathBuf> {
    let p = if dir.is_dir() {
        dir.join("config.json")
    } else {
        dir.with_file_name("config.json")
    };
    if !p.exists() {
        bail!("{}: missing; the checkpoint needs the config.json its library saves beside the weights", p.display());
    }
    Ok(p)
}

/// Fills the component's variables through the one loader (the checkpoint's role recognised, its
/// names mapped), every variable but `spec.optional`'s from the file.
fn fill(job: &ForwardJob, vs: &nn::VarStore, spec: &checkpoint::LoadSpec) -> anyhow::Result<()> {
    let pre = Pretrained::open(std::slice::from_ref(&job.checkpoint), None)?;
    pre.load_into(vs, spec, true, |_, _| {})?;
    Ok(())
}

fn load_unet(job: &ForwardJob, vs: &nn::VarStore) -> anyhow::Result<UNet2DCondition> {
    let cfg = diffusion::unet_config_from_diffusers(&config_json(&job.checkpoint)?)
        .map_err(anyhow::Error::msg)?;
    let unet = UNet2DCondition::new(&(vs.root() / "unet"), &cfg);
    fill(job, vs, &UNet2DCondition::load_spec())?;
    Ok(unet)
}

fn load_vae(job: &ForwardJob, vs: &nn::VarStore) -> anyhow::Result<AutoencoderKL> {
    let cfg = diffusion::vae_config_from_diffusers(&config_json(&job.checkpoint)?)
        .map_err(anyhow::Error::msg)?;
    let vae = AutoencoderKL::new(&(vs.root() / "vae"), &cfg);
    fill(job, vs, &AutoencoderKL::load_spec())?;
    Ok(vae)
}

/// Runs the job in f32; `cfg` supplies the vision/resampler sizes (the llm reads its HF config.json).
pub fn compute(job: &ForwardJob, cfg: &LoadedConfig) -> anyhow::Result<Vec<(String, Tensor)>> {
    let device: tch::Device = job.device.into();
    let ck = Checkpoint::open(&job.checkpoint)?;
    let inputs = Checkpoint::open(&job.inputs).with_context(|| "reading the inputs")?;
    let vs = nn::VarStore::new(device);
    let out = match job.component {
        Component::Llm => {
            let llama_cfg =
                LlamaConfig::from_hf_file(&config_json(&job.checkpoint)?, new_token_rows(&ck))?;
            let model = LlamaShard::new(&vs.root(), &llama_cfg, 0..llama_cfg.num_hidden_layers)?;
            fill(job, &vs, &model.load_spec())?;
            let ids = input(&inputs, "input_ids", &job.inputs, "int64 [B, T]")?;
            check_rank(&ids, "input_ids", &job.inputs, 2, "[B, T]")?;
            let limit = llama_cfg.vocab_size + llama_cfg.num_new_tokens;
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= limit {
                bail!(
                    "{}: `input_ids` range over [{lo}, {hi}]; expected ids in [0, {limit})",
                    job.inputs.display()
                );
            }
            let logits = tch::no_grad(|| {
                model.forward_ids(&ids.to_kind(Kind::Int64).to_device(device), 0, None)
            });
            vec![("logits".to_string(), logits)]
        }
        Component::Vision => {
            let v = &cfg.config.vision;
            let enc = VisionEncoder::new(&(vs.root() / "visual"), v);
            fill(job, &vs, &VisionEncoder::load_spec())?;
            let px = input(&inputs, "pixel_values", &job.inputs, "float [B, 3, S, S]")?;
            check_rank(
                &px,
                "pixel_values",
                &job.inputs,
                4,
                &format!("[B, {}, S, S]", v.in_channels),
            )?;
            if px.size()[1] != v.in_channels {
                bail!(
                    "{}: `pixel_values` has {} channels; expected {}",
                    job.inputs.display(),
                    px.size()[1],
                    v.in_channels
                );
            }
            let o = tch::no_grad(|| enc.forward(&px.to_kind(Kind::Float).to_device(device)));
            let mut named = vec![("tokens".to_string(), o.tokens)];
            named.extend(
                o.multiscale
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| (format!("multiscale_{i}"), m)),
            );
            named
        }
        Component::Resampler => {
            let c = &cfg.config;
            let r = Resampler::new(
                &(vs.root() / "visual_tokenizer"),
                &c.resampler,
                c.llm.hidden_size,
                c.diffusion.unet.cross_attention_dim,
            );
            fill(job, &vs, &Resampler::load_spec())?;
            let t = input(&inputs, "image_tokens", &job.inputs, "float [B, N, C]")?;
            check_rank(&t, "image_tokens", &job.inputs, 3, "[B, N, C]")?;
            let (n, width) = (t.size()[1], t.size()[2]);
            let side = ((n - 1) as f64).sqrt().round() as i64;
            if width != c.resampler.encoder_hidden_size || n < 2 || side * side != n - 1 {
                bail!(
                    "{}: `image_tokens` has shape {:?}; expected [B, 1 + k², {}] (a pooled token and a square grid)",
                    job.inputs.display(),
                    t.size(),
                    c.resampler.encoder_hidden_size
                );
            }
            let o = tch::no_grad(|| r.forward(&t.to_kind(Kind::Float).to_device(device), None));
            vec![
                ("visual_tokens".to_string(), o.visual_tokens),
                ("csr_condition".to_string(), o.csr_condition),
            ]
        }
        Component::Unet => {
            let unet = load_unet(job, &vs)?;
            let f = |n: &str, what: &str| {
                input(&inputs, n, &job.inputs, what).map(|t| t.to_device(device))
            };
            let sample = f("sample", "float [B, C, H, W]")?;
            let t = f("timestep", "int64 [B] or a scalar")?;
            let ctx = f("encoder_hidden_states", "float [B, M, cross_attention_dim]")?;
            check_rank(&sample, "sample", &job.inputs, 4, "[B, C, H, W]")?;
            let pred = tch::no_grad(|| {
                unet.forward(&sample.to_kind(Kind::Float), &t, &ctx.to_kind(Kind::Float))
            });
            vec![("noise_pred".to_string(), pred)]
        }
        Component::VaeEncode => {
            let vae = load_vae(job, &vs)?;
            let px = input(
                &inputs,
                "pixel_values",
                &job.inputs,
                "float [B, 3, H, W] in [-1, 1]",
            )?;
            check_rank(&px, "pixel_values", &job.inputs, 4, "[B, 3, H, W]")?;
            let mean = tch::no_grad(|| vae.encode(&px.to_kind(Kind::Float).to_device(device)).0);
            vec![("latent_mean".to_string(), mean)]
        }
        Component::VaeDecode => {
            let vae = load_vae(job, &vs)?;
            let lat = input(
                &inputs,
                "latents",
                &job.inputs,
                "float [B, C, h, w] (unscaled)",
            )?;
            check_rank(&lat, "latents", &job.inputs, 4, "[B, C, h, w]")?;
            let px = tch::no_grad(|| vae.decode(&lat.to_kind(Kind::Float).to_device(device)));
            vec![("pixel_values".to_string(), px)]
        }
        Component::Sample => sample(job, cfg, &vs, &inputs, device)?,
    };
    Ok(out
        .into_iter()
        .map(|(n, t)| (n, t.to_device(tch::Device::Cpu).contiguous()))
        .collect())
}

/// `deem forward sample`: the `--scheduler` loop of `--steps` steps from `noise` with the UNet.
fn sample(
    job: &ForwardJob,
    cfg: &LoadedConfig,
    vs: &nn::VarStore,
    inputs: &Checkpoint,
    device: tch::Device,
) -> anyhow::Result<Vec<(String, Tensor)>> {
    let unet = load_unet(job, vs)?;
    let f = |n: &str, what: &str| {
        input(inputs, n, &job.inputs, what).map(|t| t.to_kind(Kind::Float).to_device(device))
    };
    let noise = f("noise", "float [B, C, H, W]")?;
    let ctx = f("encoder_hidden_states", "float [B, M, cross_attention_dim]")?;
    let sampler = Sampler::new(job.scheduler, &cfg.config.diffusion.scheduler, job.steps);
    let step_noise = match job.scheduler {
        SamplerKind::Ddpm => Some(f(
            "step_noise",
            "float [steps, B, C, H, W], needed for --scheduler ddpm",
        )?),
        _ => None,
    };
    let z = |i: usize| match &step_noise {
        Some(n) => n.get(i as i64),
        None => Tensor::zeros([0], (Kind::Float, device)),
    };
    let latents = if job.guidance > 1.0 {
        let uncond = f(
            "uncond_hidden_states",
            "float [B, M, C], needed for --guidance above 1",
        )?;
        let both = Tensor::cat(&[&uncond, &ctx], 0);
        tch::no_grad(|| sampler.sample(&noise, job.guidance, |x, t| unet.forward(x, t, &both), z))
    } else {
        tch::no_grad(|| sampler.sample(&noise, 1.0, |x, t| unet.forward(x, t, &ctx), z))
    };
    Ok(vec![("latents".to_string(), latents)])
}

/// Runs the job and writes the outputs (atomically).
pub fn run_to_file(job: &ForwardJob, cfg: &LoadedConfig) -> anyhow::Result<Vec<String>> {
    let outputs = compute(job, cfg)?;
    checkpoint::save(&job.output, &outputs)?;
    Ok(outputs
        .iter()
        .map(|(n, t)| format!("{n} {:?}", t.size()))
        .collect())
}

/// `deem forward`.
pub fn run(args: super::ForwardArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    let device = super::train::parse_device(&args.device)?;
    let job = crate::cli::forward::ForwardJob {
        component: args.component,
        checkpoint: args.checkpoint,
        inputs: args.inputs,
        output: args.output,
        device,
        scheduler: args.scheduler,
        steps: args.steps,
        guidance: args.guidance,
    };
    let written = crate::cli::forward::run_to_file(&job, &cfg)?;
    println!("wrote {}: {}", job.output.display(), written.join(", "));
    Ok(())
}
