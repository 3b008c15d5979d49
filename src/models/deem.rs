//! The DEEM model on one device (paper §3, `../shared/REFERENCE.md` "Losses"): encoder → resampler →
//! visual tokens spliced into the LLM sequence → text logits (NTP); the LLM's hidden states of each
//! image's context → NIP condition → UNet (NIP); the resampler's `proj_i` output → the same UNet (CSR).
//!
//! Each piece is a method, so the pipelined runtime can run them on different actors and still compute
//! exactly what [`Deem::losses`] computes here.

use tch::nn;
use tch::{Kind, Tensor};

use crate::config::DeemConfig;
use crate::models::diffusion::condition::NipCondition;
use crate::models::diffusion::{AutoencoderKL, Ddpm, UNet2DCondition};
use crate::models::llama::{LlamaConfig, LlamaShard};
use crate::models::region::MaskExtractor;
use crate::models::resampler::Resampler;
use crate::models::vision::{VisionEncoder, CLIP_MEAN, CLIP_STD};
use crate::rng::{Purpose, Stream};
use crate::text::sequence::splice_images;

use super::ModelError;

/// A training batch: token ids with image placeholders, and the images in order of appearance.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]` int64; each image is `<|startofimage|>` + `num_query_tokens` × `<|sniffer|>`.
    pub input_ids: Tensor,
    /// `[N, 3, H, W]` in [0, 1], one per `<|startofimage|>`, row by row.
    pub pixels: Tensor,
    /// `[B, T]` bool: which ids are NTP targets (instruction data: the assistant's replies only, as
    /// LLaVA trains). `None`: every id not masked by [`ntp_loss`]'s own rules.
    pub loss_mask: Option<Tensor>,
    /// Region input: `[N, 1, H, W]` in [0, 1], one mask per image (1 = inside the region; a whole image
    /// has an all-ones mask). `Some`: every image goes through the mask-aware extractor and CSR is
    /// averaged over each image's region. `None`: whole images, no extractor.
    pub masks: Option<Tensor>,
}

impl Batch {
    /// Number of images in each row (its `<|startofimage|>` count).
    pub fn images_per_row(&self, soi_id: i64) -> Vec<i64> {
        Vec::try_from(
            self.input_ids
                .eq(soi_id)
                .sum_dim_intlist(&[1i64][..], false, Kind::Int64),
        )
        .unwrap_or_default()
    }

    /// Splits the rows into `m` microbatches (each image goes with its row).
    pub fn split(&self, m: i64, soi_id: i64) -> Result<Vec<Batch>, ModelError> {
        let b = self.input_ids.size()[0];
        if m <= 0 || b % m != 0 {
            return Err(ModelError::Batch(format!(
                "{b} rows do not split into train.microbatches = {m}"
            )));
        }
        let per = self.images_per_row(soi_id);
        let rows = b / m;
        let mut img = 0i64;
        Ok((0..m)
            .map(|i| {
                let n: i64 = per[(i * rows) as usize..((i + 1) * rows) as usize]
                    .iter()
                    .sum();
                let mb = Batch {
                    input_ids: self.input_ids.narrow(0, i * rows, rows),
                    pixels: self.pixels.narrow(0, img, n),
                    loss_mask: self.loss_mask.as_ref().map(|m| m.narrow(0, i * rows, rows)),
                    masks: self.masks.as_ref().map(|m| m.narrow(0, img, n)),
                };
                img += n;
                mb
            })
            .collect())
    }
}

/// Token ids the model treats specially.
#[derive(Debug, Clone, Copy)]
pub struct SpecialIds {
    pub bos: i64,
    pub pad: i64,
    pub soi: i64,
    pub sniffer: i64,
}

/// `x` [B, C, H, W] bilinearly resized to `size` × `size` (as it is when already that size).
pub fn resize(x: &Tensor, size: i64) -> Tensor {
    if x.size()[2] == size && x.size()[3] == size {
        x.shallow_clone()
    } else {
        x.upsample_bilinear2d([size, size], false, None, None)
    }
}

/// CLIP-normalised input at `size` px from [0, 1] pixels `[B, 3, H, W]`.
pub fn clip_pixels(pixels: &Tensor, size: i64) -> Tensor {
    let x = resize(pixels, size);
    let mean = Tensor::from_slice(&CLIP_MEAN)
        .to_kind(x.kind())
        .to_device(x.device())
        .view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&CLIP_STD)
        .to_kind(x.kind())
        .to_device(x.device())
        .view([1, 3, 1, 1]);
    (x - mean) / std
}

/// The vision actor's modules: encoder, resampler and mask-aware extractor (under `visual.` and
/// `visual_tokenizer.`).
#[derive(Debug)]
pub struct VisionStage {
    pub encoder: VisionEncoder,
    pub resampler: Resampler,
    pub region: MaskExtractor,
    image_size: i64,
    /// `vision.mask_aware`: images without a mask get an all-ones one.
    mask_aware: bool,
}

impl VisionStage {
    pub fn new(root: &nn::Path, cfg: &DeemConfig) -> Self {
        crate::init_part("visual");
        VisionStage {
            encoder: VisionEncoder::new(&(root / "visual"), &cfg.vision),
            resampler: Resampler::new(
                &(root / "visual_tokenizer"),
                &cfg.resampler,
                cfg.llm.hidden_size,
                cfg.diffusion.unet.cross_attention_dim,
            ),
            region: MaskExtractor::new_seeded(
                &(root / "visual_tokenizer"),
                cfg.vision.dims.len(),
                cfg.vision.adapter_width,
                cfg.train.seed,
            ),
            image_size: cfg.vision.image_size,
            mask_aware: cfg.vision.mask_aware,
        }
    }

    /// CLIP-normalised encoder input at the encoder's resolution, from [0, 1] pixels.
    pub fn clip_pixels(&self, pixels: &Tensor) -> Tensor {
        clip_pixels(pixels, self.image_size)
    }

    /// `(visual tokens [N, Q, L], CSR condition [N, Q, C])` of [0, 1] pixels (whole images).
    pub fn forward(&self, pixels: &Tensor) -> (Tensor, Tensor) {
        self.forward_regions(pixels, None)
    }

    /// [`Self::forward`] with region input: with `masks` `[N, 1, H, W]`, the mask-aware extractor masks
    /// the encoder output and prepends its region tokens to the resampler's input (with
    /// `vision.mask_aware`, always: all-ones masks when none are given).
    pub fn forward_regions(&self, pixels: &Tensor, masks: Option<&Tensor>) -> (Tensor, Tensor) {
        let v = self.encoder.forward(&self.clip_pixels(pixels));
        let ones;
        let masks = match masks {
            None if self.mask_aware => {
                let (n, h, w) = (pixels.size()[0], pixels.size()[2], pixels.size()[3]);
                ones = Tensor::ones([n, 1, h, w], (Kind::Float, pixels.device()));
                Some(&ones)
            }
            m => m,
        };
        let r = match masks {
            Some(m) => {
                let mv = self.region.forward(&v, &m.to_device(pixels.device()));
                self.resampler.forward(&mv.tokens, Some(&mv.region_tokens))
            }
            None => self.resampler.forward(&v.tokens, None),
        };
        (r.visual_tokens, r.csr_condition)
    }
}

/// The diffusion actor's modules: NIP condition, UNet, VAE and the training schedule.
#[derive(Debug)]
pub struct DiffusionStage {
    pub condition: NipCondition,
    pub unet: UNet2DCondition,
    pub vae: AutoencoderKL,
    pub ddpm: Ddpm,
    pub(crate) image_size: i64,
    pub(crate) latent_side: i64,
    pub(crate) latent_channels: i64,
    pub(crate) null_prob: f64,
    pub(crate) num_train_timesteps: u64,
    pub(crate) scheduler: crate::config::SchedulerConfig,
}

impl DiffusionStage {
    pub fn new(root: &nn::Path, cfg: &DeemConfig) -> Self {
        crate::init_part("diffusion");
        let d = &cfg.diffusion;
        DiffusionStage {
            condition: NipCondition::new(
                &(root / "nip_condition"),
                &d.condition,
                cfg.llm.hidden_size,
            ),
            unet: UNet2DCondition::new(&(root / "unet"), &d.unet),
            vae: AutoencoderKL::new(&(root / "vae"), &d.vae),
            ddpm: Ddpm::new(&d.scheduler),
            image_size: d.image_size,
            latent_side: d.image_size >> (d.vae.block_out_channels.len().max(1) - 1),
            latent_channels: d.vae.latent_channels,
            null_prob: d.condition.null_condition_prob,
            num_train_timesteps: d.scheduler.num_train_timesteps as u64,
            scheduler: d.scheduler.clone(),
        }
    }

    /// The initial latents `[C, h, w]` of a drawn image, from its own seeded stream.
    pub fn initial_noise(&self, seed: u64, image: u64) -> Tensor {
        Stream::new(seed, image, 0, Purpose::ImageNoise).normal(&[
            self.latent_channels,
            self.latent_side,
            self.latent_side,
        ])
    }

    /// The noise DDPM adds at sampling step `step` of image `image` of a response (its own stream, apart
    /// from the initial latents').
    pub fn step_noise(&self, seed: u64, image: u64, step: usize) -> Tensor {
        Stream::new(seed, image, step as u64 + 1, Purpose::ImageNoise).normal(&[
            self.latent_channels,
            self.latent_side,
            self.latent_side,
        ])
    }

    /// Draws images from NIP contexts (`ctx` [B, N, L], `mask` [B, N]) starting at `noise`
    /// [B, C, h, w]: the `sampler` loop of `steps` steps (DDPM adds `step_noise(i)` at step i) with
    /// classifier-free guidance against the learned null condition (one doubled batch), decoded by the
    /// VAE. Returns pixels [B, 3, H, W] in [0, 1]. `on_step` is called after every denoising step.
    pub fn draw(
        &self,
        (ctx, mask, noise): (&Tensor, &Tensor, &Tensor),
        (sampler, steps, guidance): (crate::config::SamplerKind, i64, f64),
        step_noise: impl FnMut(usize) -> Tensor,
        on_step: impl FnMut(),
    ) -> Tensor {
        tch::no_grad(|| {
            let b = ctx.size()[0];
            let cond = self.condition.forward(ctx, mask);
            let context = if guidance > 1.0 {
                Tensor::cat(&[&self.condition.null(b).to_kind(cond.kind()), &cond], 0)
            } else {
                cond
            };
            let s = crate::models::diffusion::Sampler::new(sampler, &self.scheduler, steps);
            self.sample_pixels(&s, (noise, guidance, &context), step_noise, on_step)
        })
    }

    /// The loop of `sampler` from `noise` with the UNet on `context` (doubled `[uncond; cond]` when
    /// `guidance` > 1), then the VAE: pixels in [0, 1]. `on_step` runs after every UNet call.
    fn sample_pixels(
        &self,
        sampler: &crate::models::diffusion::Sampler,
        (noise, guidance, context): (&Tensor, f64, &Tensor),
        step_noise: impl FnMut(usize) -> Tensor,
        mut on_step: impl FnMut(),
    ) -> Tensor {
        let latents = sampler.sample(
            noise,
            guidance,
            |x, t| {
                let out = self.unet.forward(x, t, context);
                on_step();
                out
            },
            step_noise,
        );
        let pixels = self.vae.decode(&(latents / self.vae.scaling_factor));
        ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)
    }

    /// CSR reconstructions: images drawn by DDIM (`steps`, no guidance) from each image's own encoder
    /// condition `cond` [N, Q, C], starting from seeded noise. Pixels [N, 3, H, W] in [0, 1].
    pub fn reconstruct(&self, cond: &Tensor, steps: i64, seed: u64) -> Tensor {
        tch::no_grad(|| {
            let n = cond.size()[0];
            let noise = Tensor::stack(
                &(0..n as u64)
                    .map(|i| self.initial_noise(seed, i))
                    .collect::<Vec<_>>(),
                0,
            )
            .to_device(cond.device());
            let ddim = crate::models::diffusion::Sampler::new(
                crate::config::SamplerKind::Ddim,
                &self.scheduler,
                steps,
            );
            let none = |_| Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
            self.sample_pixels(&ddim, (&noise, 1.0, cond), none, || {})
        })
    }
}

/// The whole model in one VarStore with reference key names.
#[derive(Debug)]
pub struct Deem {
    pub cfg: DeemConfig,
    pub ids: SpecialIds,
    pub vision: VisionStage,
    pub llm: LlamaShard,
    pub diffusion: DiffusionStage,
}

impl Deem {
    pub fn new(root: &nn::Path, cfg: &DeemConfig) -> Result<Self, ModelError> {
        let l = &cfg.llm;
        Ok(Deem {
            cfg: cfg.clone(),
            ids: special_ids(cfg),
            vision: VisionStage::new(root, cfg),
            llm: LlamaShard::new(root, &LlamaConfig::from(l), 0..l.num_hidden_layers)?,
            diffusion: DiffusionStage::new(root, cfg),
        })
    }
}

/// Which modules [`initial_weights_of`] builds: the whole model, or one actor's part of it.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Whole,
    Vision,
    Llm(std::ops::Range<i64>),
    Diffusion,
}

/// The whole model's initial weights for `cfg.train.seed` (CPU, reference key names, detached): what
/// both trainers start from, and what `deem serve` runs without a checkpoint. Built under the init
/// lock, so the draw is the same whatever other threads build meanwhile.
pub fn initial_weights(
    cfg: &DeemConfig,
) -> Result<std::collections::BTreeMap<String, Tensor>, ModelError> {
    initial_weights_of(cfg, &Part::Whole)
}

/// The initial weights of `part` alone: each part draws from its own seed ([`crate::init_part`]), so
/// they equal the same names' values in [`initial_weights`] while only that part is built (a pipeline
/// stage never holds the whole model).
pub fn initial_weights_of(
    cfg: &DeemConfig,
    part: &Part,
) -> Result<std::collections::BTreeMap<String, Tensor>, ModelError> {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let root = vs.root();
    crate::with_init_lock(Some(cfg.train.seed), || -> Result<(), ModelError> {
        match part {
            Part::Whole => drop(Deem::new(&root, cfg)?),
            Part::Vision => drop(VisionStage::new(&root, cfg)),
            Part::Llm(layers) => drop(LlamaShard::new(
                &root,
                &LlamaConfig::from(&cfg.llm),
                layers.clone(),
            )?),
            Part::Diffusion => drop(DiffusionStage::new(&root, cfg)),
        }
        Ok(())
    })?;
    Ok(vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect())
}

/// A training forward of `shard` over packed rows `ids` (hidden states `hidden`): documents isolated
/// when `train.isolate_documents`, else one causal sequence per row.
pub fn llm_forward(shard: &LlamaShard, hidden: &Tensor, ids: &Tensor, cfg: &DeemConfig) -> Tensor {
    llm_forward_span(shard, hidden, ids, cfg, 0..shard.layers.len())
}

/// [`llm_forward`] through the shard's layers `span` only.
pub fn llm_forward_span(
    shard: &LlamaShard,
    hidden: &Tensor,
    ids: &Tensor,
    cfg: &DeemConfig,
    span: std::ops::Range<usize>,
) -> Tensor {
    let docs = cfg
        .train
        .isolate_documents
        .then(|| crate::models::llama::Documents::from_ids(ids, cfg.llm.bos_token_id));
    shard.forward_span(hidden, span, docs.as_ref())
}

/// The special ids of a configuration (`<|startofimage|>` and `<|sniffer|>` follow the base vocabulary).
pub fn special_ids(cfg: &DeemConfig) -> SpecialIds {
    let l = &cfg.llm;
    SpecialIds {
        bos: l.bos_token_id,
        pad: l.pad_token_id,
        soi: l.vocab_size,
        sniffer: l.vocab_size + 1,
    }
}

/// The first shard's input: token embeddings with the images' visual tokens spliced in.
pub fn embed_sequence(
    first: &LlamaShard,
    ids: &Tensor,
    visual: Option<&Tensor>,
    s: SpecialIds,
) -> Result<Tensor, ModelError> {
    let embeds = first.embed(ids);
    match visual {
        Some(v) => {
            let soi = first
                .soi_embedding()
                .expect("the first shard owns the SoI vector");
            Ok(splice_images(&embeds, ids, v, soi, s.soi, s.sniffer)?)
        }
        None if ids.eq(s.soi).any().int64_value(&[]) != 0 => Err(ModelError::Batch(
            "the sequence has <|startofimage|> tokens but no images were given".into(),
        )),
        None => Ok(embeds),
    }
}

/// The first shard's input during generation: token embeddings of `ids` [1, T] with the SoI vector
/// added at every `<|startofimage|>` (the image itself may follow in a later chunk) and, when `visual`
/// [N, K, C] is given, the images' visual tokens in place of their placeholders.
pub fn embed_for_generation(
    first: &LlamaShard,
    ids: &Tensor,
    visual: Option<&Tensor>,
    s: SpecialIds,
) -> Result<Tensor, ModelError> {
    let soi = first
        .soi_embedding()
        .expect("the first shard owns the SoI vector");
    let embeds = first.embed(ids);
    match visual {
        Some(v) => Ok(splice_images(&embeds, ids, v, soi, s.soi, s.sniffer)?),
        None => {
            let is_soi = ids.eq(s.soi).unsqueeze(-1).to_kind(embeds.kind());
            let kind = embeds.kind();
            Ok(embeds + is_soi * soi.to_kind(kind))
        }
    }
}
