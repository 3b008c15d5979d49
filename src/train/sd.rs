//! Text-to-image pretraining of the diffusion decoder (Stable Diffusion's recipe at toy scale), for
//! configurations with no pretrained UNet and VAE to load.
//!
//! DEEM keeps SD's UNet and VAE frozen and teaches its own modules to condition them: NIP draws the next
//! image from the LLM's states, CSR reconstructs each input image from the encoder's embedding. Through
//! a random UNet the CSR loss is lowest for a constant condition, so CSR can only mean something once the
//! decoder has learnt to draw the world. This module trains, in order:
//!
//! 1. the VAE (`vae.*`): reconstruction MSE plus a small KL term, then its latents rescaled so that
//!    `latents × scaling_factor` has unit variance on the data, as SD's scaling factor is chosen;
//! 2. the UNet (`unet.*`): the ε-prediction loss on those latents, conditioned on the frozen CLIP text
//!    tower's final states of the caption (SD 2 conditions on OpenCLIP's text states), the caption
//!    dropped to the empty one with probability `uncond_prob` for classifier-free guidance.
//!
//! Both keep diffusers' names, so `deem train --pretrained` loads them as it would SD's files.

use tch::nn::OptimizerConfig;
use tch::{nn, Kind, Tensor};

use crate::config::DeemConfig;
use crate::models::deem::resize;
use crate::models::diffusion::{AutoencoderKL, Ddpm, UNet2DCondition};
use crate::rng::{ints, Purpose, Stream};
use crate::train::clip::{pad_captions, stack_picks, Clip};
use crate::train::TrainError;

/// How the decoder is pretrained.
#[derive(Debug, Clone)]
pub struct DecoderOptions {
    pub seed: u64,
    pub vae_steps: u64,
    pub unet_steps: u64,
    pub warmup_steps: u64,
    pub batch_size: usize,
    pub vae_lr: f64,
    pub unet_lr: f64,
    /// Weight of the KL term of the VAE loss (per latent element, against the per-pixel MSE).
    pub kl_weight: f64,
    /// Probability that a caption is replaced by the empty caption (classifier-free guidance).
    pub uncond_prob: f64,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        DecoderOptions {
            seed: 0,
            vae_steps: 400,
            unet_steps: 1500,
            warmup_steps: 20,
            batch_size: 32,
            vae_lr: 2e-3,
            unet_lr: 1e-3,
            kl_weight: 1e-4,
            uncond_prob: 0.1,
        }
    }
}

/// One step's numbers: which part trains, and its loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecoderReport {
    pub part: &'static str,
    pub step: u64,
    pub loss: f64,
}

/// The VAE's input: `images` at `picks`, at `size` px, in [−1, 1].
fn vae_input(images: &[Tensor], picks: &[i64], size: i64) -> Tensor {
    resize(&stack_picks(images, picks), size) * 2.0 - 1.0
}

/// Pretrains the VAE, then the UNet on `images` ([3, S, S] in [0, 1]) captioned by `captions`
/// (EOS-terminated ids), conditioned on `clip`'s text tower (frozen). `empty` is the empty caption's
/// ids (the unconditional context). Returns the `vae.*` and `unet.*` weights.
pub fn pretrain(
    cfg: &DeemConfig,
    clip: &Clip,
    images: &[Tensor],
    captions: &[Vec<i64>],
    empty: &[i64],
    o: &DecoderOptions,
    mut on_step: impl FnMut(&DecoderReport),
) -> Result<Vec<(String, Tensor)>, TrainError> {
    if images.len() != captions.len() || images.is_empty() {
        return Err(TrainError::from(format!(
            "expected as many captions as images (at least one), found {} images and {} captions",
            images.len(),
            captions.len()
        )));
    }
    if empty.is_empty() || captions.iter().any(|c| c.is_empty()) {
        return Err(TrainError::from(
            "every caption, the empty one too, needs at least its EOS id",
        ));
    }
    let d = &cfg.diffusion;
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let (vae, unet) = crate::with_init_lock(Some(o.seed), || {
        (
            AutoencoderKL::new(&(vs.root() / "vae"), &d.vae),
            UNet2DCondition::new(&(vs.root() / "unet"), &d.unet),
        )
    });
    let ddpm = Ddpm::new(&d.scheduler);
    let b = o.batch_size.clamp(1, images.len());
    let n = images.len() as u64;
    let size = d.image_size;

    // 1. The VAE (the UNet's variables get no gradient here, so AdamW leaves them as they are).
    let mut opt = nn::AdamW::default().build(&vs, o.vae_lr)?;
    for step in 0..o.vae_steps {
        let picks = Stream::new(o.seed, step, 2, Purpose::Data).below(b, n);
        let x = vae_input(images, &picks, size);
        let (mean, logvar) = vae.encode(&x);
        let eps = Stream::new(o.seed, step, 2, Purpose::NipNoise)
            .normal(&mean.size())
            .to_kind(mean.kind());
        let z = &mean + (&logvar * 0.5).exp() * eps;
        let recon = (vae.decode(&z) - &x).square().mean(Kind::Float);
        let kl = ((mean.square() + logvar.exp() - 1.0 - &logvar) * 0.5).mean(Kind::Float);
        let loss = &recon + kl * o.kl_weight;
        opt.set_lr(o.vae_lr * crate::train::lr_factor(step, o.warmup_steps, o.vae_steps));
        opt.backward_step(&loss);
        let loss = recon.double_value(&[]);
        if !loss.is_finite() {
            return Err(TrainError::from(format!(
                "VAE step {step}: the reconstruction loss is {loss}"
            )));
        }
        on_step(&DecoderReport {
            part: "vae",
            step,
            loss,
        });
    }
    // Latents × scaling_factor get unit variance on the data (measured on up to 256 images): the
    // encoder's mean channels are scaled by c and the decoder's first 1×1 convolution by 1/c.
    tch::no_grad(|| -> Result<(), TrainError> {
        let probe: Vec<i64> = (0..n.min(256) as i64).collect();
        let std = vae
            .encode(&vae_input(images, &probe, size))
            .0
            .std(true)
            .double_value(&[]);
        if !(std.is_finite() && std > 0.0) {
            return Err(TrainError::from(format!(
                "the VAE's latents have standard deviation {std}"
            )));
        }
        let c = 1.0 / (std * vae.scaling_factor);
        let vars = vs.variables();
        let lc = d.vae.latent_channels;
        let qw = vars["vae.quant_conv.weight"].shallow_clone();
        let qb = vars["vae.quant_conv.bias"].shallow_clone();
        let _ = qw.narrow(0, 0, lc).g_mul_scalar_(c);
        let _ = qb.narrow(0, 0, lc).g_mul_scalar_(c);
        let _ = qb.narrow(0, lc, lc).g_add_scalar_(2.0 * c.ln());
        let mut pw = vars["vae.post_quant_conv.weight"].shallow_clone();
        let _ = pw.g_mul_scalar_(1.0 / c);
        Ok(())
    })?;

    // 2. The UNet on the (now frozen) VAE's scaled latents, encoded once (256 images at a time).
    let all: Vec<i64> = (0..n as i64).collect();
    let latents_all: Vec<Tensor> = tch::no_grad(|| {
        all.chunks(256)
            .flat_map(|c| {
                (vae.encode(&vae_input(images, c, size)).0 * vae.scaling_factor).unbind(0)
            })
            .collect()
    });
    let mut opt = nn::AdamW::default().build(&vs, o.unet_lr)?;
    for step in 0..o.unet_steps {
        let picks = Stream::new(o.seed, step, 3, Purpose::Data).below(b, n);
        let drop = Stream::new(o.seed, step, 3, Purpose::NullCondition).bernoulli(b, o.uncond_prob);
        let latents = stack_picks(&latents_all, &picks);
        let context = tch::no_grad(|| {
            let caps: Vec<&[i64]> = picks
                .iter()
                .zip(&drop)
                .map(|(&i, &dropped)| {
                    if dropped {
                        empty
                    } else {
                        captions[i as usize].as_slice()
                    }
                })
                .collect();
            clip.text_states(&pad_captions(&caps, cfg.llm.pad_token_id).0)
        });
        let noise = Stream::new(o.seed, step, 3, Purpose::NipNoise).normal(&latents.size());
        let t = ints(
            &Stream::new(o.seed, step, 3, Purpose::NipTimesteps)
                .below(b, d.scheduler.num_train_timesteps as u64),
        );
        let pred = unet.forward(&ddpm.add_noise(&latents, &noise, &t), &t, &context);
        let loss = (pred - ddpm.target(&latents, &noise, &t))
            .square()
            .mean(Kind::Float);
        opt.set_lr(o.unet_lr * crate::train::lr_factor(step, o.warmup_steps, o.unet_steps));
        opt.backward_step(&loss);
        let loss = loss.double_value(&[]);
        if !loss.is_finite() {
            return Err(TrainError::from(format!(
                "UNet step {step}: the diffusion loss is {loss}"
            )));
        }
        on_step(&DecoderReport {
            part: "unet",
            step,
            loss,
        });
    }
    Ok(crate::train::cpu_weights(&vs))
}
