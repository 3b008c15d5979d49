//! Contrastive image-text pretraining of the vision encoder (open_clip's recipe at toy scale), for
//! encoders that have no pretrained weights to load.
//!
//! DEEM starts from an open_clip ConvNeXt that CLIP training taught what images show. A tiny model has
//! no such checkpoint offline, and a random trunk keeps little of an object's shape: a linear probe on
//! its visual tokens tells the main object's shape apart barely above chance. This module trains the
//! image tower (`visual.trunk.*`, `visual.head.proj`) against a small causal text tower (LLaMA
//! layers, pooled at the caption's EOS, as CLIP's text transformer pools at its EOT token) with the
//! symmetric InfoNCE loss and a learned temperature. DEEM keeps the image tower ([`is_image_tower`]):
//! its weights carry open_clip's names, so `deem train --pretrained` loads them as it would a real
//! open_clip file; the text tower conditions the diffusion decoder's pretraining (`crate::train::sd`).

use tch::nn::OptimizerConfig;
use tch::{nn, Kind, Tensor};

use crate::config::DeemConfig;
use crate::models::deem::clip_pixels;
use crate::models::llama::{LlamaConfig, LlamaShard};
use crate::models::vision::VisionEncoder;
use crate::rng::{Purpose, Stream};
use crate::train::TrainError;

/// How the encoder is pretrained.
#[derive(Debug, Clone)]
pub struct ClipOptions {
    pub seed: u64,
    pub steps: u64,
    pub warmup_steps: u64,
    /// Image-caption pairs per step (the contrastive batch).
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Layers of the text tower.
    pub text_layers: i64,
    /// The pairs come in groups of this many consecutive ones (a scene and its hard negatives), and a
    /// batch takes whole groups; 1 = pairs drawn one by one.
    pub group: usize,
}

impl Default for ClipOptions {
    fn default() -> Self {
        ClipOptions {
            seed: 0,
            steps: 1500,
            warmup_steps: 20,
            batch_size: 64,
            lr: 2e-3,
            weight_decay: 0.05,
            text_layers: 2,
            group: 1,
        }
    }
}

/// A causal text tower: LLaMA layers at the UNet's context width, the final norm, the hidden state at
/// each caption's last id (its EOS), and a bias-free projection to the joint embedding.
struct TextTower {
    layers: LlamaShard,
    proj: Tensor,
}

/// The image tower (DEEM's vision encoder), the text tower and the learned temperature.
pub struct Clip {
    pub vision: VisionEncoder,
    text: TextTower,
    logit_scale: Tensor,
    image_size: i64,
}

/// One contrastive step's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipReport {
    pub step: u64,
    pub loss: f64,
    /// Share of images whose own caption scores highest in the batch.
    pub accuracy: f64,
}

impl Clip {
    /// Builds the towers under `root`: `visual.…` (open_clip names) and `text.…`.
    pub fn new(root: &nn::Path, cfg: &DeemConfig, text_layers: i64) -> Result<Self, TrainError> {
        if text_layers < 1 {
            return Err(TrainError::from(format!(
                "text_layers: expected at least 1, found {text_layers}"
            )));
        }
        // The text tower is as wide as the UNet's context: its states condition the diffusion decoder
        // when that is pretrained (`crate::train::sd`), as OpenCLIP's text states condition SD 2.
        let width = cfg.diffusion.unet.cross_attention_dim;
        let mut l = LlamaConfig::from(&cfg.llm);
        if width % l.num_attention_heads != 0 {
            return Err(TrainError::from(format!(
                "the text tower is diffusion.unet.cross_attention_dim ({width}) wide, which llm.num_attention_heads ({}) must divide",
                l.num_attention_heads
            )));
        }
        l.intermediate_size = l.intermediate_size * width / l.hidden_size;
        l.hidden_size = width;
        l.head_dim = width / l.num_attention_heads;
        l.num_new_tokens = 0;
        l.num_hidden_layers = text_layers;
        // Tied: the tower has no LM head (it never predicts ids).
        l.tie_word_embeddings = true;
        let text = root / "text";
        let layers = LlamaShard::new(&text, &l, 0..text_layers)?;
        let proj = (&text / "proj").var(
            "weight",
            &[cfg.vision.embed_dim, width],
            nn::Init::Randn {
                mean: 0.0,
                stdev: (width as f64).powf(-0.5),
            },
        );
        Ok(Clip {
            vision: VisionEncoder::new(&(root / "visual"), &cfg.vision),
            text: TextTower { layers, proj },
            // open_clip's initial temperature: logit scale ln(1 / 0.07).
            logit_scale: root.var("logit_scale", &[], nn::Init::Const((1.0f64 / 0.07).ln())),
            image_size: cfg.vision.image_size,
        })
    }

    /// L2-normalised image embeddings of [0, 1] pixels `[B, 3, H, W]`.
    pub fn image_embeddings(&self, pixels: &Tensor) -> Tensor {
        normalise(&self.vision.embed(&clip_pixels(pixels, self.image_size)))
    }

    /// The text tower's final (normed) states `[B, T, cross_attention_dim]` of padded ids `[B, T]`.
    pub fn text_states(&self, ids: &Tensor) -> Tensor {
        let t = &self.text.layers;
        t.norm(&t.forward_layers(&t.embed(ids), 0, None))
    }

    /// L2-normalised text embeddings of padded ids `[B, T]` whose last real id sits at `last` `[B]`.
    pub fn text_embeddings(&self, ids: &Tensor, last: &Tensor) -> Tensor {
        let h = self.text_states(ids);
        let c = h.size()[2];
        let at = last.view([-1, 1, 1]).expand([-1, 1, c], false);
        let pooled = h.gather(1, &at, false).squeeze_dim(1);
        normalise(&pooled.matmul(&self.text.proj.tr()))
    }

    /// The symmetric InfoNCE loss of matched pairs (row i of each) and the image→text top-1 accuracy.
    pub fn loss(&self, pixels: &Tensor, ids: &Tensor, last: &Tensor) -> (Tensor, f64) {
        let img = self.image_embeddings(pixels);
        let txt = self.text_embeddings(ids, last);
        // open_clip clamps the scale at 100.
        let logits = img.matmul(&txt.tr()) * self.logit_scale.exp().clamp_max(100.0);
        let n = logits.size()[0];
        let target = Tensor::arange(n, (Kind::Int64, logits.device()));
        let loss = (logits.cross_entropy_for_logits(&target)
            + logits.tr().cross_entropy_for_logits(&target))
            / 2.0;
        let accuracy = tch::no_grad(|| {
            logits
                .argmax(1, false)
                .eq_tensor(&target)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        });
        (loss, accuracy)
    }
}

/// `items[i]` for each index of `picks`, stacked along a new first dimension.
pub(crate) fn stack_picks(items: &[Tensor], picks: &[i64]) -> Tensor {
    Tensor::stack(
        &picks
            .iter()
            .map(|&i| &items[i as usize])
            .collect::<Vec<_>>(),
        0,
    )
}

fn normalise(x: &Tensor) -> Tensor {
    x / x
        .norm_scalaropt_dim(2.0, &[-1i64][..], true)
        .clamp_min(1e-6)
}

/// Pads caption ids (each non-empty) with `pad` into `[B, T]` and gives each one's last index.
pub fn pad_captions(captions: &[&[i64]], pad: i64) -> (Tensor, Tensor) {
    let t = captions.iter().map(|c| c.len()).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(captions.len() * t);
    let mut last = Vec::with_capacity(captions.len());
    for c in captions {
        ids.extend_from_slice(c);
        ids.extend(std::iter::repeat_n(pad, t - c.len()));
        last.push(c.len().max(1) as i64 - 1);
    }
    (
        Tensor::from_slice(&ids).view([captions.len() as i64, t as i64]),
        Tensor::from_slice(&last),
    )
}

/// Pretrains the encoder on image-caption pairs (`images[i]` [3, S, S] in [0, 1] with caption ids
/// `captions[i]`, EOS-terminated) and returns every CLIP weight: the image tower under open_clip's
/// names (`visual.trunk.…`, `visual.head.proj.weight`; see [`is_image_tower`]), the adapters DEEM adds
/// (untrained), `text.…` and `logit_scale`. Batch `k` is drawn from (seed, k) alone. `on_step` sees
/// every step's report. The weights come in name order.
pub fn pretrain(
    cfg: &DeemConfig,
    images: &[Tensor],
    captions: &[Vec<i64>],
    o: &ClipOptions,
    mut on_step: impl FnMut(&ClipReport),
) -> Result<Vec<(String, Tensor)>, TrainError> {
    if images.len() != captions.len() {
        return Err(TrainError::from(format!(
            "{} images but {} captions",
            images.len(),
            captions.len()
        )));
    }
    if images.len() < 2 {
        return Err(TrainError::from(format!(
            "contrastive pretraining needs at least 2 image-caption pairs, found {}",
            images.len()
        )));
    }
    if let Some(i) = captions.iter().position(|c| c.is_empty()) {
        return Err(TrainError::from(format!("caption {i} has no ids")));
    }
    let g = o.group.max(1);
    if g > 1 && (images.len() % g != 0 || o.batch_size < 2 * g) {
        return Err(TrainError::from(format!(
            "--group {g}: the {} pairs must split into groups of {g} and a batch ({}) hold at least two",
            images.len(),
            o.batch_size
        )));
    }
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let clip = crate::with_init_lock(Some(o.seed), || Clip::new(&vs.root(), cfg, o.text_layers))?;
    let mut opt = nn::AdamW {
        wd: o.weight_decay,
        ..Default::default()
    }
    .build(&vs, o.lr)?;
    for step in 0..o.steps {
        let picks = batch_picks(o, step, images.len());
        let pixels = stack_picks(images, &picks);
        let caps: Vec<&[i64]> = picks
            .iter()
            .map(|&i| captions[i as usize].as_slice())
            .collect();
        let (ids, last) = pad_captions(&caps, cfg.llm.pad_token_id);
        opt.set_lr(o.lr * crate::train::lr_factor(step, o.warmup_steps, o.steps));
        let (loss, accuracy) = clip.loss(&pixels, &ids, &last);
        opt.backward_step(&loss);
        let loss = loss.double_value(&[]);
        if !loss.is_finite() {
            return Err(TrainError::from(format!(
                "step {step}: the contrastive loss is {loss}"
            )));
        }
        on_step(&ClipReport {
            step,
            loss,
            accuracy,
        });
    }
    Ok(crate::train::cpu_weights(&vs))
}

/// The pairs of step `step` out of `n`: `batch_size / group` groups drawn from (seed, step) alone, each
/// whole (`group` consecutive pairs).
pub fn batch_picks(o: &ClipOptions, step: u64, n: usize) -> Vec<i64> {
    let g = o.group.max(1);
    let b = o.batch_size.clamp(2, n) / g;
    Stream::new(o.seed, step, 1, Purpose::Data)
        .below(b, (n / g) as u64)
        .iter()
        .flat_map(|&k| (0..g as i64).map(move |j| k * g as i64 + j))
        .collect()
}

/// Whether a CLIP weight belongs to the image tower DEEM keeps (open_clip's `visual.trunk.…`,
/// `visual.head.…`; the DEEM adapters under `visual.` are not CLIP's).
pub fn is_image_tower(name: &str) -> bool {
    name.starts_with("visual.trunk.") || name.starts_with("visual.head.")
}

/// A CLIP built for `cfg` with the weights `pretrain` returned (every variable must be there); its text
/// tower has as many layers as the weights do.
pub fn load(
    vs: &nn::VarStore,
    cfg: &DeemConfig,
    weights: &std::collections::BTreeMap<String, Tensor>,
) -> Result<Clip, TrainError> {
    let text_layers = weights
        .keys()
        .filter_map(|k| {
            k.strip_prefix("text.model.layers.")?
                .split('.')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    let clip = Clip::new(&vs.root(), cfg, text_layers)?;
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let w = weights
                .get(&name)
                .ok_or_else(|| TrainError::from(format!("the CLIP weights have no `{name}`")))?;
            if w.size() != var.size() {
                return Err(TrainError::from(format!(
                    "`{name}` is {:?}, the CLIP for this configuration expects {:?}",
                    w.size(),
                    var.size()
                )));
            }
            var.copy_(w);
        }
        Ok(())
    })?;
    Ok(clip)
}
