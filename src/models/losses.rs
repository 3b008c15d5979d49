//! DEEM's three losses (paper §3, `../shared/REFERENCE.md` "Losses") and how they combine: NTP on the
//! LLM's logits; NIP, the UNet drawing the next image from the LLM's hidden states; CSR, the UNet
//! reconstructing each input image from the encoder's own embedding (and the per-image CSR score the
//! service reports); the weights each training stage gives them.

use tch::{Kind, Tensor};

use super::deem::{embed_sequence, llm_forward, resize, Batch, Deem, DiffusionStage, SpecialIds};
use super::diffusion::condition::gather_contexts;
use super::ModelError;
use crate::config::{DeemConfig, Stage};
use crate::rng::{ints, Purpose, Stream};

/// Loss parts of one (micro)batch; absent parts are 0.
#[derive(Debug)]
pub struct Losses {
    pub total: Tensor,
    pub ntp: Tensor,
    pub nip: Tensor,
    pub csr: Tensor,
}

/// Region masks `[N, 1, H, W]` (any resolution) at the latents' resolution (bilinear: partly covered
/// latent pixels weigh partly), as f32 on their device.
fn latent_masks(masks: &Tensor, latents: &Tensor) -> Tensor {
    let (h, w) = (latents.size()[2], latents.size()[3]);
    masks
        .to_device(latents.device())
        .to_kind(Kind::Float)
        .upsample_bilinear2d([h, w], false, None, None)
}

/// The diffusion loss, in fp32 whatever the model's dtype (the UNet answers in the latents' f32).
fn mse(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b).square().mean(Kind::Float)
}

impl DiffusionStage {
    /// DEEM's consistency check per image: the CSR loss of reconstructing `pixels` [N, 3, H, W] from
    /// its own encoder condition `cond` [N, Q, C], averaged over the fixed `timesteps` with noise from
    /// a fixed stream (`seed`), so the same image always gets the same score.
    pub fn csr_scores(
        &self,
        cond: &Tensor,
        pixels: &Tensor,
        masks: Option<&Tensor>,
        timesteps: &[i64],
        seed: u64,
    ) -> Vec<f64> {
        tch::no_grad(|| {
            let latents = self.latents(pixels);
            let n = latents.size()[0];
            let device = latents.device();
            // Region input: each image's error is averaged over its region (as CSR trains).
            let weights = masks.map(|m| {
                let m = latent_masks(m, &latents);
                let area = m.sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float)
                    * latents.size()[1] as f64;
                (m, area.clamp_min(1e-6))
            });
            let mut total = Tensor::zeros([n], (Kind::Float, device));
            for (k, &t) in timesteps.iter().enumerate() {
                // The same noise for every image (keyed by the timestep's slot, not the image).
                let noise = Stream::new(seed, k as u64, 0, Purpose::CsrScore)
                    .normal(&latents.size()[1..])
                    .to_device(device)
                    .unsqueeze(0)
                    .expand_as(&latents);
                let tt = Tensor::full([n], t, (Kind::Int64, device));
                let noisy = self.ddpm.add_noise(&latents, &noise, &tt);
                let pred = self.unet.forward(&noisy, &tt, cond);
                let sq = (pred - self.ddpm.target(&latents, &noise, &tt))
                    .square()
                    .to_kind(Kind::Float);
                total += match &weights {
                    None => sq.mean_dim(&[1i64, 2, 3][..], false, Kind::Float),
                    Some((m, area)) => {
                        (sq * m).sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float) / area
                    }
                };
            }
            Vec::<f64>::try_from((total / timesteps.len() as f64).to_kind(Kind::Double))
                .unwrap_or_default()
        })
    }

    /// Scaled VAE latents (the frozen VAE's posterior mean) of [0, 1] pixels at the output resolution.
    pub fn latents(&self, pixels: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let x = resize(pixels, self.image_size) * 2.0 - 1.0;
            self.vae.encode(&x).0 * self.vae.scaling_factor
        })
    }

    /// The diffusion loss of `cond` on `latents` at timesteps `t` with `noise`.
    pub fn diffusion_loss(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        t: &Tensor,
        cond: &Tensor,
    ) -> Tensor {
        self.diffusion_loss_in(latents, noise, t, cond, None)
    }

    /// [`Self::diffusion_loss`], averaged over each image's region when `masks` `[N, 1, H, W]` (at
    /// any resolution; resized to the latents, so partly covered latent pixels weigh partly) is given:
    /// Σ err² · m / (channels · Σ m).
    fn diffusion_loss_in(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        t: &Tensor,
        cond: &Tensor,
        masks: Option<&Tensor>,
    ) -> Tensor {
        let noisy = self.ddpm.add_noise(latents, noise, t);
        let pred = self.unet.forward(&noisy, t, cond);
        let target = self.ddpm.target(latents, noise, t);
        match masks {
            None => mse(&pred, &target),
            Some(m) => {
                let m = latent_masks(m, latents);
                let err = (pred - target).square().to_kind(Kind::Float);
                (err * &m).sum(Kind::Float)
                    / (m.sum(Kind::Float) * latents.size()[1] as f64).clamp_min(1e-6)
            }
        }
    }

    /// NIP: draw the images `pixels` (those at `index`) from their LLM contexts; the learned null
    /// condition replaces a context with probability `null_condition_prob`; t uniform in [0, T).
    pub fn nip_loss(
        &self,
        ctx: &Tensor,
        mask: &Tensor,
        pixels: &Tensor,
        key: (u64, u64, u64),
    ) -> Tensor {
        let (seed, step, mb) = key;
        let device = ctx.device();
        let k = ctx.size()[0];
        let cond = self.condition.forward(ctx, mask);
        let drop = Stream::new(seed, step, mb, Purpose::NullCondition)
            .bernoulli(k as usize, self.null_prob);
        let drop_t = Tensor::from_slice(&drop).to_device(device).view([k, 1, 1]);
        let cond = cond.where_self(&drop_t.logical_not(), &self.condition.null(k));
        let latents = self.latents(pixels);
        let noise = Stream::new(seed, step, mb, Purpose::NipNoise)
            .normal(&latents.size())
            .to_device(device);
        let t = ints(
            &Stream::new(seed, step, mb, Purpose::NipTimesteps)
                .below(k as usize, self.num_train_timesteps),
        )
        .to_device(device);
        self.diffusion_loss(&latents, &noise, &t, &cond)
    }

    /// CSR: reconstruct every input image from its own encoder embedding, t in [200, 800), no dropout.
    pub fn csr_loss(&self, cond: &Tensor, pixels: &Tensor, key: (u64, u64, u64)) -> Tensor {
        self.csr_loss_regions(cond, pixels, None, key)
    }

    /// [`Self::csr_loss`] for region input: with `masks`, the loss is averaged over the regions
    /// (renormalised by their area) instead of the whole images.
    pub fn csr_loss_regions(
        &self,
        cond: &Tensor,
        pixels: &Tensor,
        masks: Option<&Tensor>,
        key: (u64, u64, u64),
    ) -> Tensor {
        let (seed, step, mb) = key;
        let device = cond.device();
        let latents = self.latents(pixels);
        let noise = Stream::new(seed, step, mb, Purpose::CsrNoise)
            .normal(&latents.size())
            .to_device(device);
        let n = latents.size()[0] as usize;
        let t = ints(&csr_timesteps(
            &mut Stream::new(seed, step, mb, Purpose::CsrTimesteps),
            n,
        ))
        .to_device(device);
        self.diffusion_loss_in(&latents, &noise, &t, cond, masks)
    }
}

/// NTP loss on logits `[B, T, V]`: cross-entropy of each next id, with pad, image placeholders, BOS
/// targets and the BOS→SoI transition masked; SoI itself is a target (the model learns when to draw).
/// With `loss_mask` `[B, T]`, only the ids it marks are targets (the rules above still apply).
pub fn ntp_loss(
    logits: &Tensor,
    ids: &Tensor,
    loss_mask: Option<&Tensor>,
    s: SpecialIds,
) -> Tensor {
    let t = ids.size()[1];
    let inputs = ids.narrow(1, 0, t - 1);
    let targets = ids.narrow(1, 1, t - 1);
    let mut masked = targets
        .eq(s.pad)
        .logical_or(&targets.eq(s.sniffer))
        .logical_or(&targets.eq(s.bos))
        .logical_or(&targets.eq(s.soi).logical_and(&inputs.eq(s.bos)));
    if let Some(m) = loss_mask {
        masked = masked.logical_or(&m.narrow(1, 1, t - 1).to_device(ids.device()).logical_not());
    }
    let keep = masked.logical_not().to_kind(Kind::Float).reshape([-1]);
    // Log-softmax over the vocabulary in fp32 whatever the model's dtype.
    let lp = logits
        .narrow(1, 0, t - 1)
        .reshape([-1, logits.size()[2]])
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float);
    let nll = -lp
        .gather(1, &targets.reshape([-1, 1]), false)
        .squeeze_dim(1);
    (nll * &keep).sum(Kind::Float) / keep.sum(Kind::Float).clamp_min(1.0)
}

/// The NIP contexts and the index (in order of appearance) of each image they draw; images whose
/// context is only `[BOS, SoI]` are skipped.
pub fn nip_inputs(
    hidden: &Tensor,
    ids: &Tensor,
    s: SpecialIds,
) -> Option<(Tensor, Tensor, Vec<i64>)> {
    gather_contexts(hidden, ids, s.bos, s.soi)
}

/// Which loss terms a stage trains, and their weights in the total (0 for a term it does not train).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    pub nip: f64,
    pub csr: f64,
}

impl LossWeights {
    pub fn of(cfg: &DeemConfig) -> Self {
        let t = &cfg.train;
        let (nip, csr) = match t.stage {
            Stage::I => (t.nip_loss_weight, t.csr_loss_weight),
            Stage::II => (0.0, t.csr_loss_weight),
            Stage::III => (0.0, 0.0),
        };
        LossWeights { nip, csr }
    }

    /// The loss DEEM trains, NTP + λ_NIP · NIP + λ_CSR · CSR, summed in that order: the one combine
    /// both trainers use, on loss tensors (the reference trainer, the diffusion stage with NTP zero) and
    /// on their values (the pipeline driver's report).
    pub fn combine<T>(&self, ntp: T, nip: T, csr: T) -> T
    where
        T: std::ops::Add<Output = T> + std::ops::Mul<f64, Output = T>,
    {
        ntp + nip * self.nip + csr * self.csr
    }
}

/// CSR timesteps: `round((u − 500)·0.6 + 500)` for `u` uniform in [0, 1000), i.e. in [200, 799].
pub fn csr_timesteps(s: &mut Stream, n: usize) -> Vec<i64> {
    (0..n)
        .map(|_| {
            ((s.uniform() * 1000.0 - 500.0) * 0.6 + 500.0)
                .round()
                .clamp(200.0, 799.0) as i64
        })
        .collect()
}

impl Deem {
    /// All losses of one microbatch. Random draws come from streams keyed by `(seed, step, microbatch)`.
    pub fn losses(
        &self,
        batch: &Batch,
        seed: u64,
        step: u64,
        microbatch: u64,
    ) -> Result<Losses, ModelError> {
        let key = (seed, step, microbatch);
        let w = LossWeights::of(&self.cfg);
        let zero = || Tensor::zeros([], (Kind::Float, batch.input_ids.device()));
        let ids = &batch.input_ids;
        let n_images = batch.pixels.size()[0];

        // 1. Vision → resampler: visual tokens and the CSR condition.
        let masks = batch.masks.as_ref();
        let vision = (n_images > 0).then(|| self.vision.forward_regions(&batch.pixels, masks));

        // 2. LLM over the spliced sequence.
        let embeds = embed_sequence(&self.llm, ids, vision.as_ref().map(|v| &v.0), self.ids)?;
        let hidden = self
            .llm
            .norm(&llm_forward(&self.llm, &embeds, ids, &self.cfg));
        let ntp = ntp_loss(
            &self.llm.logits(&hidden),
            ids,
            batch.loss_mask.as_ref(),
            self.ids,
        );

        // 3. NIP: the image after each SoI, drawn from its LLM context.
        let mut nip = zero();
        if w.nip > 0.0 && n_images > 0 {
            if let Some((ctx, mask, index)) = nip_inputs(&hidden, ids, self.ids) {
                let pixels = batch
                    .pixels
                    .index_select(0, &ints(&index).to_device(ids.device()));
                nip = self.diffusion.nip_loss(&ctx, &mask, &pixels, key);
            }
        }

        // 4. CSR: every input image reconstructed from its own encoder embedding.
        let mut csr = zero();
        if let (true, Some((_, cond))) = (w.csr > 0.0, &vision) {
            csr = self
                .diffusion
                .csr_loss_regions(cond, &batch.pixels, masks, key);
        }
        let total = w.combine(
            ntp.shallow_clone(),
            nip.shallow_clone(),
            csr.shallow_clone(),
        );
        Ok(Losses {
            total,
            ntp,
            nip,
            csr,
        })
    }
}
