//! `deem bench decode|unet`: deem's side of `scripts/bench_reference.py`, which times HF transformers'
//! `generate` and a diffusers DDIM loop on the same checkpoints in the same command. Each prints one
//! JSON line.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use deem::checkpoint::Checkpoint;
use deem::models::diffusion::{self, Sampler, UNet2DCondition};
use deem::models::llama::{LlamaConfig, LlamaShard};
use serde_json::json;
use tch::{nn, Kind, Tensor};

/// Greedy decoding of `new_tokens` after a `prompt_tokens`-long prompt, through the serving path (KV
/// pool: the prompt as one chunk, then one token per step), best of `repeats`.
pub fn decode(
    dir: &Path,
    prompt_tokens: i64,
    new_tokens: i64,
    repeats: usize,
) -> anyhow::Result<serde_json::Value> {
    let cfg = LlamaConfig::from_hf_file(&dir.join("config.json"), 0)?;
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let m = LlamaShard::new(&vs.root(), &cfg, 0..cfg.num_hidden_layers)?;
    Checkpoint::open(dir)
        .with_context(|| format!("{}: cannot open the checkpoint", dir.display()))?
        .load_into(&vs, &m.load_spec())?;
    if prompt_tokens + new_tokens > cfg.max_position_embeddings {
        anyhow::bail!(
            "--prompt-tokens + --new-tokens = {} exceeds the model's max_position_embeddings ({})",
            prompt_tokens + new_tokens,
            cfg.max_position_embeddings
        );
    }
    let prompt: Vec<i64> = (0..prompt_tokens)
        .map(|i| 3 + i % (cfg.vocab_size - 3))
        .collect();
    let mut best = f64::INFINITY;
    let mut generated = Vec::new();
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        generated = tch::no_grad(|| {
            let mut pool = m.new_pool(1);
            let ids = Tensor::from_slice(&prompt).view([1, prompt_tokens]);
            let h = m.forward_slot(&m.embed(&ids), 0, 0, &mut pool);
            let mut next = m
                .logits(&m.norm(&h.narrow(1, prompt_tokens - 1, 1)))
                .argmax(-1, false)
                .int64_value(&[0, 0]);
            let mut out = vec![next];
            for pos in prompt_tokens..prompt_tokens + new_tokens - 1 {
                let x = m.embed(&Tensor::from_slice(&[next]).view([1, 1]));
                let h = m.forward_slots(&x, &[0], &[pos], &mut pool);
                next = m.logits(&m.norm(&h)).argmax(-1, false).int64_value(&[0, 0]);
                out.push(next);
            }
            out
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(json!({
        "tokens_per_second": new_tokens as f64 / best,
        "seconds": best,
        "new_tokens": new_tokens,
        "generated": generated,
    }))
}

/// `steps` DDIM steps of a diffusers UNet (batch 1, no guidance) on seeded latents and context, best
/// of `repeats`.
pub fn unet(
    dir: &Path,
    steps: i64,
    context_tokens: i64,
    repeats: usize,
) -> anyhow::Result<serde_json::Value> {
    let cfg = diffusion::unet_config_from_diffusers(&dir.join("config.json"))
        .map_err(anyhow::Error::msg)?;
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let side = raw["sample_size"].as_i64().unwrap_or(16);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = UNet2DCondition::new(&(vs.root() / "unet"), &cfg);
    deem::models::pretrained::Pretrained::open(&[dir.to_path_buf()], None)?.load_into(
        &vs,
        &UNet2DCondition::load_spec(),
        true,
        |_, _| {},
    )?;
    let sched = deem::config::SchedulerConfig {
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: deem::config::BetaSchedule::ScaledLinear,
        prediction_type: deem::config::PredictionType::Epsilon,
    };
    let ddim = Sampler::new(deem::config::SamplerKind::Ddim, &sched, steps);
    let none = |_| Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
    let mut s = deem::rng::Stream::new(0, 0, 0, deem::rng::Purpose::ImageNoise);
    let noise = s.normal(&[1, cfg.in_channels, side, side]);
    let ctx = s.normal(&[1, context_tokens, cfg.cross_attention_dim]);
    let mut best = f64::INFINITY;
    let mut checksum = 0.0;
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        let out = tch::no_grad(|| ddim.sample(&noise, 1.0, |x, t| model.forward(x, t, &ctx), none));
        best = best.min(started.elapsed().as_secs_f64());
        checksum = out
            .to_kind(Kind::Double)
            .abs()
            .mean(Kind::Double)
            .double_value(&[]);
    }
    Ok(json!({
        "steps_per_second": steps as f64 / best,
        "seconds": best,
        "steps": steps,
        "latent_mean_abs": checksum,
    }))
}

/// `deem bench decode | unet`.
pub fn run(b: super::BenchCommand) -> anyhow::Result<()> {
    let threads = match &b {
        super::BenchCommand::Decode { threads, .. }
        | super::BenchCommand::Unet { threads, .. }
        | super::BenchCommand::Layers { threads, .. } => *threads,
    };
    if let Some(n) = threads {
        tch::set_num_threads(n);
    }
    let out = match b {
        super::BenchCommand::Decode {
            checkpoint,
            prompt_tokens,
            new_tokens,
            repeats,
            ..
        } => decode(&checkpoint, prompt_tokens, new_tokens, repeats)?,
        super::BenchCommand::Unet {
            checkpoint,
            steps,
            context_tokens,
            repeats,
            ..
        } => unet(&checkpoint, steps, context_tokens, repeats)?,
        super::BenchCommand::Layers {
            config,
            device,
            repeats,
            out,
            ..
        } => {
            let cfg = config.load()?;
            let costs = crate::pipeline::costs::measure(&cfg.config, device.into(), repeats)?;
            costs.save(&out)?;
            serde_json::to_value(&costs)?
        }
    };
    println!("{out}");
    Ok(())
}
