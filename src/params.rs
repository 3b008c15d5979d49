//! Parameter counts per component, computed from the configuration alone (no tensors allocated), so a
//! topology can be sized before anything is built. The formulas follow the reference modules' weights:
//! timm `ConvNeXt`, HF `Blip2QFormerModel` (query path), HF `LlamaForCausalLM`, diffusers
//! `UNet2DConditionModel` and `AutoencoderKL`; each is checked against a published total in the tests.

use crate::config::{
    ConditionConfig, DeemConfig, LlmConfig, ResamplerConfig, UNetConfig, VaeConfig, VisionConfig,
};

fn linear(i: i64, o: i64, bias: bool) -> i64 {
    i * o + if bias { o } else { 0 }
}

fn conv(i: i64, o: i64, k: i64) -> i64 {
    i * o * k * k + o
}

fn norm(c: i64) -> i64 {
    2 * c
}

/// timm ConvNeXt trunk (stem, stages, head norm; no classifier).
pub fn convnext_trunk(v: &VisionConfig) -> i64 {
    let mut n = conv(v.in_channels, v.dims[0], v.patch_size) + norm(v.dims[0]);
    for (s, (&depth, &d)) in v.depths.iter().zip(&v.dims).enumerate() {
        if s > 0 {
            n += norm(v.dims[s - 1]) + conv(v.dims[s - 1], d, 2);
        }
        // conv_dw (7×7 depthwise) + norm + mlp.fc1 + mlp.fc2 + gamma
        let block = (49 * d + d) + norm(d) + linear(d, 4 * d, true) + linear(4 * d, d, true) + d;
        n += depth * block;
    }
    n + norm(*v.dims.last().unwrap_or(&0))
}

/// The trunk, open_clip's head projection, and DEEM's adapters (one linear per stage to
/// `adapter_width`, one on the projected pooled feature).
pub fn vision(v: &VisionConfig) -> i64 {
    let last = *v.dims.last().unwrap_or(&0);
    let head = match v.head_proj {
        crate::config::HeadProj::Linear => linear(last, v.embed_dim, false),
        crate::config::HeadProj::Mlp => {
            linear(last, 2 * v.embed_dim, true) + linear(2 * v.embed_dim, v.embed_dim, false)
        }
    };
    let n = convnext_trunk(v) + head;
    let adapters: i64 = v
        .dims
        .iter()
        .map(|&d| linear(d, v.adapter_width, true))
        .sum();
    n + adapters + linear(v.embed_dim, v.adapter_width, true)
}

/// Input projection + LayerNorm, the Q-Former query path, and the two output projections
/// (`proj_t` to the LLM width, `proj_i` to the UNet context width).
pub fn resampler(r: &ResamplerConfig, llm_width: i64, unet_context: i64) -> i64 {
    let (h, e) = (r.hidden_size, r.encoder_hidden_size);
    let input = linear(e, e, true) + norm(e);
    let self_attn = 4 * linear(h, h, true) + norm(h);
    let cross_attn = 2 * linear(h, h, true) + 2 * linear(e, h, true) + norm(h);
    let mlp = linear(h, r.intermediate_size, true) + linear(r.intermediate_size, h, true) + norm(h);
    let cross_layers = (0..r.num_hidden_layers)
        .filter(|i| i % r.cross_attention_frequency == 0)
        .count() as i64;
    input
        + r.num_query_tokens * h
        + norm(h)
        + r.num_hidden_layers * (self_attn + mlp)
        + cross_layers * cross_attn
        + linear(h, llm_width, true)
        + linear(h, unet_context, true)
}

/// DEEM's mask-aware extractor: one pooled-feature linear per stage and the 112×112 mask-shape MLP.
pub fn mask_extractor(v: &VisionConfig) -> i64 {
    let (w, side) = (v.adapter_width, crate::models::region::MASK_SHAPE_SIDE);
    v.dims.len() as i64 * linear(w, w, true) + linear(side * side, w, true) + 2 * linear(w, w, true)
}

/// Parameters of one LLaMA decoder layer.
pub fn llm_layer(l: &LlmConfig) -> i64 {
    let h = l.hidden_size;
    let kv = h / l.num_attention_heads * l.num_key_value_heads;
    let attn = 2 * linear(h, h, false) + 2 * linear(h, kv, false);
    let mlp = 3 * linear(h, l.intermediate_size, false);
    attn + mlp + 2 * h
}

/// The embedding (base vocabulary plus DEEM's new rows) and the learnable SoI vector.
pub fn llm_embedding(l: &LlmConfig) -> i64 {
    (l.vocab_size + l.num_new_tokens) * l.hidden_size + l.hidden_size
}

/// Final norm, the frozen original head (absent when tied) and `head_new` for the new tokens.
pub fn llm_head(l: &LlmConfig) -> i64 {
    let head = if l.tie_word_embeddings {
        0
    } else {
        l.vocab_size * l.hidden_size
    };
    l.hidden_size + head + l.num_new_tokens * l.hidden_size
}

/// Parameters of an LLM shard that owns layers `[start, end)`.
pub fn llm_shard(l: &LlmConfig, start: i64, end: i64) -> i64 {
    let mut n = (end - start) * llm_layer(l);
    if start == 0 {
        n += llm_embedding(l);
    }
    if end == l.num_hidden_layers {
        n += llm_head(l);
    }
    n
}

fn resnet(i: i64, o: i64, temb: Option<i64>) -> i64 {
    let shortcut = if i != o { linear(i, o, true) } else { 0 };
    norm(i)
        + conv(i, o, 3)
        + temb.map_or(0, |t| linear(t, o, true))
        + norm(o)
        + conv(o, o, 3)
        + shortcut
}

fn transformer_2d(c: i64, cross: i64, layers: i64) -> i64 {
    // proj_in/proj_out have the same count as linears or 1×1 convs.
    let attn1 = 3 * linear(c, c, false) + linear(c, c, true);
    let attn2 = linear(c, c, false) + 2 * linear(cross, c, false) + linear(c, c, true);
    let ff = linear(c, 8 * c, true) + linear(4 * c, c, true); // GEGLU
    norm(c) + 2 * linear(c, c, true) + layers * (attn1 + attn2 + ff + 3 * norm(c))
}

/// diffusers `UNet2DConditionModel`.
pub fn unet(u: &UNetConfig) -> i64 {
    let ch = &u.block_out_channels;
    let c0 = ch[0];
    let temb = 4 * c0;
    let n_blocks = ch.len();
    let lpb = u.layers_per_block;
    let attn = |c: i64| transformer_2d(c, u.cross_attention_dim, u.transformer_layers_per_block);
    let mut n = conv(u.in_channels, c0, 3) + linear(c0, temb, true) + linear(temb, temb, true);
    let mut prev = c0;
    for (i, t) in u.down_block_types.iter().enumerate() {
        let out = ch[i];
        for j in 0..lpb {
            n += resnet(if j == 0 { prev } else { out }, out, Some(temb));
            if t.starts_with("CrossAttn") {
                n += attn(out);
            }
        }
        if i + 1 < n_blocks {
            n += conv(out, out, 3);
        }
        prev = out;
    }
    let last = ch[n_blocks - 1];
    n += 2 * resnet(last, last, Some(temb)) + attn(last);
    let rev: Vec<i64> = ch.iter().rev().copied().collect();
    let mut prev_out = rev[0];
    for (i, t) in u.up_block_types.iter().enumerate() {
        let out = rev[i];
        let input = rev[(i + 1).min(n_blocks - 1)];
        for j in 0..=lpb {
            let skip = if j == lpb { input } else { out };
            let res_in = if j == 0 { prev_out } else { out };
            n += resnet(res_in + skip, out, Some(temb));
            if t.starts_with("CrossAttn") {
                n += attn(out);
            }
        }
        if i + 1 < n_blocks {
            n += conv(out, out, 3);
        }
        prev_out = out;
    }
    n + norm(c0) + conv(c0, u.out_channels, 3)
}

/// diffusers `AutoencoderKL` (encoder, decoder, quant convs).
pub fn vae(a: &VaeConfig) -> i64 {
    let ch = &a.block_out_channels;
    let (c0, last, lat) = (ch[0], ch[ch.len() - 1], a.latent_channels);
    let mid = 2 * resnet(last, last, None) + norm(last) + 4 * linear(last, last, true);
    let mut enc = conv(a.in_channels, c0, 3);
    let mut prev = c0;
    for (i, &out) in ch.iter().enumerate() {
        for j in 0..a.layers_per_block {
            enc += resnet(if j == 0 { prev } else { out }, out, None);
        }
        if i + 1 < ch.len() {
            enc += conv(out, out, 3);
        }
        prev = out;
    }
    enc += mid + norm(last) + conv(last, 2 * lat, 3);
    let mut dec = conv(lat, last, 3) + mid;
    let mut prev = last;
    for (i, &out) in ch.iter().rev().enumerate() {
        for j in 0..=a.layers_per_block {
            dec += resnet(if j == 0 { prev } else { out }, out, None);
        }
        if i + 1 < ch.len() {
            dec += conv(out, out, 3);
        }
        prev = out;
    }
    dec += norm(c0) + conv(c0, a.out_channels, 3);
    enc + dec + linear(2 * lat, 2 * lat, true) + linear(lat, lat, true)
}

/// NIP condition path: LLM-width projection, a perceiver of `num_layers` (queries cross-attend to the
/// projected hidden states, then an MLP), and the learned null condition.
pub fn condition(k: &ConditionConfig, llm_width: i64) -> i64 {
    let w = k.width;
    let layer = norm(w)
        + norm(llm_width)
        + 2 * linear(w, w, true)
        + 2 * linear(llm_width, w, true)
        + norm(w)
        + linear(w, 4 * w, true)
        + linear(4 * w, w, true);
    linear(llm_width, llm_width, true)
        + k.num_queries * w
        + k.num_layers * layer
        + norm(w)
        + k.num_queries * w
}

/// Parameter counts of the three placeable components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentParams {
    /// Encoder, adapters, resampler and mask extractor (the vision actor's modules).
    pub vision: i64,
    /// All LLM layers with embedding and heads.
    pub llm: i64,
    /// UNet, VAE and the NIP condition path.
    pub diffusion: i64,
}

impl ComponentParams {
    pub fn of(cfg: &DeemConfig) -> Self {
        let l = &cfg.llm;
        let d = &cfg.diffusion;
        ComponentParams {
            vision: vision(&cfg.vision)
                + resampler(&cfg.resampler, l.hidden_size, d.unet.cross_attention_dim)
                + mask_extractor(&cfg.vision),
            llm: llm_shard(l, 0, l.num_hidden_layers),
            diffusion: unet(&d.unet) + vae(&d.vae) + condition(&d.condition, l.hidden_size),
        }
    }

    pub fn total(&self) -> i64 {
        self.vision + self.llm + self.diffusion
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(text: &str) -> DeemConfig {
        toml::from_str(text).expect("preset parses")
    }

    fn deem_7b() -> DeemConfig {
        preset(include_str!("../configs/deem-7b.toml"))
    }

    fn tiny() -> DeemConfig {
        preset(include_str!("../configs/tiny.toml"))
    }

    // Expected totals: `sum(p.numel())` of the reference modules built on the meta device with
    // transformers 5.24.0, diffusers 0.42.1 and timm 1.0.31 (the 7B figures are also the published ones).

    #[test]
    fn llm_matches_hf_llama() {
        for (cfg, expected) in [(deem_7b(), 6_738_415_616), (tiny(), 312_896)] {
            let mut l = cfg.llm.clone();
            l.num_new_tokens = 0;
            // Minus the SoI vector, which HF's LlamaForCausalLM does not have.
            assert_eq!(
                llm_shard(&l, 0, l.num_hidden_layers) - l.hidden_size,
                expected
            );
        }
    }

    #[test]
    fn llm_shards_sum_to_the_whole() {
        let l = deem_7b().llm;
        let parts = llm_shard(&l, 0, 5) + llm_shard(&l, 5, 17) + llm_shard(&l, 17, 32);
        assert_eq!(parts, llm_shard(&l, 0, 32));
        // DEEM adds 6 embedding rows, 6 head_new rows and the SoI vector.
        assert_eq!(llm_shard(&l, 0, 32), 6_738_415_616 + 13 * 4096);
    }

    #[test]
    fn unet_matches_diffusers() {
        assert_eq!(unet(&deem_7b().diffusion.unet), 865_910_724);
        assert_eq!(unet(&tiny().diffusion.unet), 803_204);
    }

    #[test]
    fn vae_matches_diffusers() {
        assert_eq!(vae(&deem_7b().diffusion.vae), 83_653_863);
        assert_eq!(vae(&tiny().diffusion.vae), 242_327);
    }

    #[test]
    fn convnext_matches_timm() {
        assert_eq!(convnext_trunk(&deem_7b().vision), 87_566_464);
    }

    fn count(vs: &tch::nn::VarStore) -> i64 {
        vs.variables().values().map(|t| t.numel() as i64).sum()
    }

    #[test]
    fn formulas_count_the_modules_deem_builds() {
        let cfg = tiny();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let (l, d) = (&cfg.llm, &cfg.diffusion);
        crate::models::vision::VisionEncoder::new(&(vs.root() / "visual"), &cfg.vision);
        assert_eq!(count(&vs), vision(&cfg.vision));
        let vt = vs.root() / "visual_tokenizer";
        crate::models::resampler::Resampler::new(
            &vt,
            &cfg.resampler,
            l.hidden_size,
            d.unet.cross_attention_dim,
        );
        crate::models::region::MaskExtractor::new(
            &vt,
            cfg.vision.dims.len(),
            cfg.vision.adapter_width,
        );
        assert_eq!(count(&vs), ComponentParams::of(&cfg).vision);
        let llama = crate::models::llama::LlamaConfig::from(l);
        for range in [0..1, 1..3, 3..4, 0..4] {
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            crate::models::llama::LlamaShard::new(&vs.root(), &llama, range.clone()).unwrap();
            assert_eq!(
                count(&vs),
                llm_shard(l, range.start, range.end),
                "{range:?}"
            );
        }
    }

    #[test]
    fn components_add_up() {
        let cfg = deem_7b();
        let p = ComponentParams::of(&cfg);
        assert_eq!(p.total(), p.vision + p.llm + p.diffusion);
        assert!(p.vision > convnext_trunk(&cfg.vision));
        assert!(p.diffusion > unet(&cfg.diffusion.unet) + vae(&cfg.diffusion.vae));
    }
}
