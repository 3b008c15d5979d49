//! The cost of one training microbatch per model part, from the configuration alone (nothing is built):
//! forward and backward FLOPs, counted as 2 × the multiply-accumulates of every linear and convolution
//! at the positions it runs at plus attention's score and value products (the usual accounting of
//! Kaplan et al. and Narayanan et al.); and the bytes autograd keeps from the forward to the backward,
//! per transformer layer after Korthikanti et al., "Reducing Activation Recomputation in Large
//! Transformer Models" §4 (without dropout, with fused attention keeping no T × T scores), and per
//! feature map for the ConvNeXt and UNet blocks. These are estimates: `deem bench layers` measures the
//! same parts on a device, and the planner prefers its figures.

use crate::config::{DeemConfig, Stage};

/// The shape of one microbatch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub rows: i64,
    /// Tokens per row (image placeholders included).
    pub tokens: i64,
    /// Images per row (each goes through the encoder and is reconstructed by CSR).
    pub images: i64,
    /// Images per row drawn by NIP (those with text before them).
    pub nip_images: i64,
}

/// One part's cost per microbatch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartCost {
    pub forward_flops: f64,
    pub backward_flops: f64,
    /// Bytes a microbatch's forward keeps alive until its backward.
    pub activation_bytes: f64,
}

impl std::ops::Add for PartCost {
    type Output = PartCost;
    fn add(self, o: PartCost) -> PartCost {
        PartCost {
            forward_flops: self.forward_flops + o.forward_flops,
            backward_flops: self.backward_flops + o.backward_flops,
            activation_bytes: self.activation_bytes + o.activation_bytes,
        }
    }
}

fn bytes(cfg: &DeemConfig) -> f64 {
    cfg.model.dtype.size_bytes() as f64
}

/// Whether the LLM's base weights train (backward computes weight gradients: 2 × the forward, else 1 ×
/// for the input gradients alone).
fn llm_trains(cfg: &DeemConfig) -> bool {
    cfg.train.stage != Stage::I || cfg.train.train_llm_in_stage_one
}

/// One decoder layer: the projections and MLP at every token, causal attention (half of T² per row for
/// scores and values each). Kept for the input gradients: the two RMSNorm inputs, Q, K, V and the
/// attention output, the SwiGLU MLP's gate, up and activation; when the layer trains, also the
/// projections' inputs (the normalised states, the attention output's copy, the MLP product); in a low
/// precision, the RMSNorms' fp32 copies. Autograd keeps a linear's input only when its weight trains.
pub fn llm_layer(cfg: &DeemConfig, s: Shape) -> PartCost {
    let l = &cfg.llm;
    let (h, i) = (l.hidden_size as f64, l.intermediate_size as f64);
    let kv = h / l.num_attention_heads as f64 * l.num_key_value_heads as f64;
    let n = (s.rows * s.tokens) as f64;
    let params = crate::params::llm_layer(l) as f64;
    let fwd = 2.0 * n * params + 2.0 * s.rows as f64 * (s.tokens as f64).powi(2) * h;
    let d = bytes(cfg);
    let trains = llm_trains(cfg);
    let kept = 4.0 * h + 2.0 * kv + 3.0 * i + if trains { 3.0 * h + i } else { 0.0 };
    let fp32_copies = if d < 4.0 { 2.0 * 4.0 * h } else { 0.0 };
    PartCost {
        forward_flops: fwd,
        backward_flops: if trains { 2.0 * fwd } else { fwd },
        activation_bytes: n * (d * kept + fp32_copies),
    }
}

/// The first shard's extras: the embedding lookup and the images spliced in (two hidden states kept).
pub fn llm_embed(cfg: &DeemConfig, s: Shape) -> PartCost {
    let n = (s.rows * s.tokens) as f64;
    PartCost {
        activation_bytes: 2.0 * n * cfg.llm.hidden_size as f64 * bytes(cfg),
        ..Default::default()
    }
}

/// The last shard's extras: the final norm, the heads over the whole vocabulary and the NTP loss (the
/// fp32 log-probabilities kept for its backward).
pub fn llm_head(cfg: &DeemConfig, s: Shape) -> PartCost {
    let l = &cfg.llm;
    let (h, v) = (
        l.hidden_size as f64,
        (l.vocab_size + l.num_new_tokens) as f64,
    );
    let n = (s.rows * s.tokens) as f64;
    let fwd = 2.0 * n * h * v;
    let d = bytes(cfg);
    PartCost {
        forward_flops: fwd,
        backward_flops: 2.0 * fwd,
        activation_bytes: n * (h * (4.0 + d) + v * 4.0),
    }
}

/// Positions of each ConvNeXt stage's feature map for an image of `side` pixels.
fn stage_positions(cfg: &DeemConfig) -> Vec<f64> {
    let v = &cfg.vision;
    (0..v.dims.len())
        .map(|i| ((v.image_size / v.patch_size) as f64 / 2f64.powi(i as i32)).powi(2))
        .collect()
}

/// The vision actor: ConvNeXt trunk (depthwise 7×7, LayerNorm, two pointwise linears per block; twelve
/// channel-widths kept per position and block when the trunk trains, in stage I), the adapters, and
/// the Q-Former over the third stage's grid.
pub fn vision(cfg: &DeemConfig, s: Shape) -> PartCost {
    let v = &cfg.vision;
    let r = &cfg.resampler;
    let images = (s.rows * s.images) as f64;
    let pos = stage_positions(cfg);
    let mut trunk = 2.0 * (v.in_channels * v.dims[0] * v.patch_size.pow(2)) as f64 * pos[0];
    let mut trunk_act = 0.0;
    let mut adapters = 0.0;
    let mut adapter_act = 0.0;
    for (i, (&depth, &c)) in v.depths.iter().zip(&v.dims).enumerate() {
        let (c, n) = (c as f64, pos[i]);
        if i > 0 {
            trunk += 2.0 * 4.0 * v.dims[i - 1] as f64 * c * n;
        }
        trunk += depth as f64 * n * 2.0 * (49.0 * c + 8.0 * c * c);
        trunk_act += depth as f64 * n * 12.0 * c;
        adapters += 2.0 * n * c * v.adapter_width as f64;
        adapter_act += n * c;
    }
    let (q, hq, e) = (
        r.num_query_tokens as f64,
        r.hidden_size as f64,
        r.encoder_hidden_size as f64,
    );
    let m = pos[2.min(pos.len() - 1)] + 1.0;
    let cross = (0..r.num_hidden_layers)
        .filter(|i| i % r.cross_attention_frequency == 0)
        .count() as f64;
    let layers = r.num_hidden_layers as f64;
    let resampler = 2.0 * m * e * e
        + layers
            * (8.0 * q * hq * hq + 4.0 * q * q * hq + 4.0 * q * hq * r.intermediate_size as f64)
        + cross * (4.0 * q * hq * hq + 4.0 * m * e * hq + 4.0 * q * m * hq)
        + 2.0 * q * hq * (cfg.llm.hidden_size + cfg.diffusion.unet.cross_attention_dim) as f64;
    let resampler_act = 3.0 * m * e + layers * 16.0 * q * hq + cross * 4.0 * m * hq;
    let trains = cfg.train.stage == Stage::I;
    let d = bytes(cfg);
    let fwd = images * (trunk + adapters + resampler);
    let bwd = images * (2.0 * (adapters + resampler) + if trains { 2.0 * trunk } else { 0.0 });
    PartCost {
        forward_flops: fwd,
        backward_flops: bwd,
        activation_bytes: images
            * d
            * (adapter_act + resampler_act + if trains { trunk_act } else { 0.0 }),
    }
}

/// One UNet (or VAE encoder) level: `resnets` ResNet blocks of two 3×3 convolutions at `c` channels
/// over `n` positions, and, with `attention`, a transformer block (projections, self-attention over the
/// `n` positions, cross-attention to `ctx` context tokens of `cross` channels, GEGLU).
fn level(c: f64, n: f64, resnets: f64, attention: Option<(f64, f64)>) -> (f64, f64) {
    let mut flops = resnets * 2.0 * 2.0 * 9.0 * c * c * n;
    let mut act = resnets * 6.0 * c * n;
    if let Some((ctx, cross)) = attention {
        flops +=
            2.0 * n * 20.0 * c * c + 4.0 * n * n * c + 4.0 * n * ctx * c + 4.0 * ctx * cross * c;
        act += 20.0 * c * n;
    }
    (flops, act)
}

/// The diffusion actor for the NIP and CSR images: the frozen VAE encoder (no gradient), the UNet
/// (frozen, but the gradient reaches the condition through it: one backward pass for the inputs) and
/// the NIP condition perceiver.
pub fn diffusion(cfg: &DeemConfig, s: Shape) -> PartCost {
    let dc = &cfg.diffusion;
    let u = &dc.unet;
    let images = (s.rows * (s.images + s.nip_images)) as f64;
    let side = dc.image_size as f64;
    // VAE encoder: full resolution down to the latents.
    let mut vae = 0.0;
    for (i, &c) in dc.vae.block_out_channels.iter().enumerate() {
        let n = (side / 2f64.powi(i as i32)).powi(2);
        vae += level(c as f64, n, dc.vae.layers_per_block as f64, None).0;
    }
    let latent = side / 2f64.powi(dc.vae.block_out_channels.len().max(1) as i32 - 1);
    let ctx = u.cross_attention_dim as f64;
    let tokens = cfg.resampler.num_query_tokens.max(dc.condition.num_queries) as f64;
    let (mut unet, mut unet_act) = (0.0, 0.0);
    let lpb = u.layers_per_block as f64;
    for (i, &c) in u.block_out_channels.iter().enumerate() {
        let n = (latent / 2f64.powi(i as i32)).powi(2);
        let attn = u
            .down_block_types
            .get(i)
            .is_some_and(|t| t.contains("CrossAttn"));
        let (f, a) = level(c as f64, n, lpb, attn.then_some((tokens, ctx)));
        // The up path runs one more block per level on concatenated skips (about 1.5 × the channels).
        let up = (lpb + 1.0) / lpb * 1.5;
        unet += f * (1.0 + up);
        unet_act += a * (1.0 + up);
    }
    let last = *u.block_out_channels.last().unwrap_or(&0) as f64;
    let n_mid = (latent / 2f64.powi(u.block_out_channels.len() as i32 - 1)).powi(2);
    let (f, a) = level(last, n_mid, 2.0, Some((tokens, ctx)));
    unet += f;
    unet_act += a;
    let k = &dc.condition;
    let (w, l) = (k.width as f64, cfg.llm.hidden_size as f64);
    let per_row_ctx = s.tokens as f64;
    let condition = s.rows as f64
        * (2.0 * per_row_ctx * l * l
            + k.num_layers as f64
                * (4.0 * k.num_queries as f64 * w * w
                    + 4.0 * per_row_ctx * l * w
                    + 16.0 * k.num_queries as f64 * w * w));
    let d = bytes(cfg);
    PartCost {
        forward_flops: images * (vae + unet) + condition,
        backward_flops: images * unet + 2.0 * condition,
        activation_bytes: images * unet_act * d + s.rows as f64 * per_row_ctx * l * d * 2.0,
    }
}

/// Model FLOPs of one training step of `cfg` (every part's forward and backward over the
/// `train.microbatches` microbatches of shape `s`): the numerator of model FLOPs utilisation.
pub fn step_flops(cfg: &DeemConfig, s: Shape) -> f64 {
    let layers = cfg.llm.num_hidden_layers as f64;
    let l = llm_layer(cfg, s);
    let parts = [
        vision(cfg, s),
        llm_embed(cfg, s),
        llm_head(cfg, s),
        diffusion(cfg, s),
        PartCost {
            forward_flops: layers * l.forward_flops,
            backward_flops: layers * l.backward_flops,
            activation_bytes: 0.0,
        },
    ];
    let per_mb: f64 = parts
        .iter()
        .map(|p| p.forward_flops + p.backward_flops)
        .sum();
    per_mb * cfg.train.microbatches as f64
}
