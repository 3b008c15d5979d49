//! LLaMA / Vicuna decoder with HF `LlamaForCausalLM` parameter names (transformers
//! `models/llama/modeling_llama.py`): RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU
//! MLP, an explicit KV cache. A [`LlamaShard`] builds only layers `[a, b)`, plus the embedding when it is
//! the first shard and the final norm and heads when it is the last, so pipeline actors own slices.
//!
//! DEEM's additions live beside the HF names so a plain HF checkpoint loads unchanged: the rows of the
//! appended special tokens (`model.embed_tokens_new`), their head (`lm_head_new`, trainable while the
//! original `lm_head` stays frozen) and the learnable start-of-image vector (`model.soi_embedding`).

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::config::RopeScaling;

#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("layer range [{start}, {end}) does not fit a model with {layers} layers; expected 0 <= start < end <= {layers}")]
    Range { start: i64, end: i64, layers: i64 },
    #[error("llm.tie_word_embeddings = true: the last shard [{start}, {end}) would need the first shard's embedding; untie the head or place the LLM in one shard")]
    TiedAcrossShards { start: i64, end: i64 },
}

/// HF `config.json` of a LLaMA-family model (fields deem uses; others are ignored, as transformers does).
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x: `rope_theta` and `rope_scaling` at the top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x: `rope_parameters: {rope_theta, rope_type, …}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> i64 {
    2048
}

/// Validated runtime configuration of the decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    /// DEEM's appended special tokens (0 for a plain LLaMA).
    pub num_new_tokens: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

impl LlamaConfig {
    /// Reads an HF `config.json`, rejecting what this implementation does not compute.
    pub fn from_hf_file(path: &Path, num_new_tokens: i64) -> Result<Self, LlamaError> {
        let p = path.display().to_string();
        let err = |message: String| LlamaError::Config {
            path: p.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let hf: HfLlamaConfig = serde_json::from_str(&text)
            .map_err(|e| err(format!("not a LLaMA config.json: {e}")))?;
        Self::from_hf(&hf, num_new_tokens).map_err(err)
    }

    pub fn from_hf(hf: &HfLlamaConfig, num_new_tokens: i64) -> Result<Self, String> {
        if let Some(act) = hf.hidden_act.as_deref() {
            if act != "silu" {
                return Err(format!("hidden_act: expected \"silu\", found {act:?}"));
            }
        }
        let partial = hf.partial_rotary_factor.or_else(|| {
            hf.rope_parameters
                .as_ref()
                .and_then(|p| p.get("partial_rotary_factor"))
                .and_then(|f| f.as_f64())
        });
        if let Some(f) = partial.filter(|&f| f != 1.0) {
            return Err(format!(
                "partial_rotary_factor: expected 1 (rotary embeddings on the whole head), found {f}"
            ));
        }
        let mut rope_theta = hf.rope_theta.unwrap_or(10000.0);
        let mut rope_scaling = None;
        if let Some(s) = hf.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            rope_scaling = rope_scaling_from_hf("rope_scaling", s, hf.max_position_embeddings)?;
        }
        if let Some(params) = hf.rope_parameters.as_ref().filter(|s| !s.is_null()) {
            rope_scaling =
                rope_scaling_from_hf("rope_parameters", params, hf.max_position_embeddings)?;
            if let Some(t) = params.get("rope_theta").and_then(|t| t.as_f64()) {
                rope_theta = t;
            }
        }
        let kv = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if hf.num_attention_heads <= 0 || kv <= 0 || hf.num_attention_heads % kv != 0 {
            return Err(format!(
                "num_key_value_heads: expected a positive divisor of num_attention_heads ({}), found {kv}",
                hf.num_attention_heads
            ));
        }
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(format!(
                "head_dim: expected a positive even number, found {head_dim}"
            ));
        }
        Ok(LlamaConfig {
            vocab_size: hf.vocab_size,
            num_new_tokens,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: hf.attention_bias,
            mlp_bias: hf.mlp_bias,
        })
    }
}

/// Reads HF's scaled-RoPE object (`rope_scaling` in transformers 4.x, `rope_parameters` in 5.x; the type
/// under `rope_type`, or `type` in older files): `None` for plain RoPE. A missing
/// `original_max_position_embeddings` is the model's `max_position_embeddings`, as in transformers.
fn rope_scaling_from_hf(
    field: &str,
    v: &serde_json::Value,
    max_position_embeddings: i64,
) -> Result<Option<RopeScaling>, String> {
    let type_value = v.get("rope_type").or_else(|| v.get("type"));
    let number = |name: &str| {
        v.get(name).and_then(|x| x.as_f64()).ok_or_else(|| {
            format!(
                "{field}.{name}: expected a number, found {}",
                v.get(name).map_or("nothing".to_string(), |x| x.to_string())
            )
        })
    };
    let original = || match v.get("original_max_position_embeddings") {
        None => Ok(max_position_embeddings),
        Some(_) => number("original_max_position_embeddings").map(|n| n as i64),
    };
    let scaling = match type_value.map_or(Some("default"), |t| t.as_str()) {
        Some("default") => return Ok(None),
        Some("linear") => RopeScaling::Linear {
            factor: number("factor")?,
        },
        Some("dynamic") => RopeScaling::Dynamic {
            factor: number("factor")?,
        },
        Some("llama3") => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: original()?,
        },
        Some("yarn") => {
            let optional = |name: &str| match v.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(_) => number(name).map(Some),
            };
            RopeScaling::Yarn {
                factor: number("factor")?,
                original_max_position_embeddings: original()?,
                beta_fast: optional("beta_fast")?,
                beta_slow: optional("beta_slow")?,
                attention_factor: optional("attention_factor")?,
                mscale: optional("mscale")?,
                mscale_all_dim: optional("mscale_all_dim")?,
                truncate: match v.get("truncate") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::Bool(b)) => Some(*b),
                    Some(x) => return Err(format!("{field}.truncate: expected true or false, found {x}")),
                },
            }
        }
        _ => {
            return Err(format!(
                "{field}.rope_type: expected \"default\", \"linear\", \"dynamic\", \"llama3\" or \"yarn\" (other scaled RoPE types are not supported yet), found {}",
                type_value.map_or("nothing".to_string(), |t| t.to_string())
            ))
        }
    };
    match scaling.problem() {
        Some((name, message)) => Err(format!("{field}.{name}: {message}")),
        None => Ok(Some(scaling)),
    }
}

impl From<&crate::config::LlmConfig> for LlamaConfig {
    fn from(l: &crate::config::LlmConfig) -> Self {
        LlamaConfig {
            vocab_size: l.vocab_size,
            num_new_tokens: l.num_new_tokens,
            hidden_size: l.hidden_size,
            intermediate_size: l.intermediate_size,
            num_hidden_layers: l.num_hidden_layers,
            num_attention_heads: l.num_attention_heads,
            num_key_value_heads: l.num_key_value_heads,
            head_dim: l.hidden_size / l.num_attention_heads,
            rms_norm_eps: l.rms_norm_eps,
            rope_theta: l.rope_theta,
            rope_scaling: l.rope_scaling,
            max_position_embeddings: l.max_position_embeddings,
            tie_word_embeddings: l.tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
        }
    }
}

/// RMSNorm computed in f32 and cast back, as HF does.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(p: nn::Path, size: i64, eps: f64) -> Self {
        RmsNorm {
            weight: p.ones("weight", &[size]),
            eps,
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

/// Rotary embedding tables for positions `[0, max)`.
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: tch::Device) -> Self {
        let d = cfg.head_dim;
        let inv_freq = Tensor::arange_start_step(0, d, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / d as f64;
        let inv_freq = (inv_freq * cfg.rope_theta.ln()).exp().reciprocal();
        let (inv_freq, attention_factor) = match cfg.rope_scaling {
            None => (inv_freq, 1.0),
            Some(s) => scale_inv_freq(&inv_freq, s, cfg.rope_theta, d),
        };
        let pos = Tensor::arange(cfg.max_position_embeddings, (Kind::Float, device));
        let freqs = pos.outer(&inv_freq); // [P, D/2]
        let emb = Tensor::cat(&[&freqs, &freqs], -1); // [P, D]
                                                      // YaRN scales cos and sin; every other kind has factor 1 (an exact multiplication).
        Rope {
            cos: emb.cos() * attention_factor,
            sin: emb.sin() * attention_factor,
        }
    }

    /// Rotates `x` [B, H, T, D], row `b`'s token `t` at position `positions[b, t]` (`positions` holds
    /// B × T ids in any shape: [B] for a batched decode, [B, T] for packed documents).
    fn apply_rows(&self, x: &Tensor, positions: &Tensor) -> Tensor {
        let (b, _, t, d) = x.size4().expect("[B, H, T, D]");
        let at = |table: &Tensor| {
            table
                .index_select(0, &positions.reshape([-1]))
                .to_kind(x.kind())
                .view([b, 1, t, d])
        };
        rotate(x, &at(&self.cos), &at(&self.sin))
    }

    /// Rotates `x` [B, H, T, D] at positions `[start, start + T)`.
    fn apply(&self, x: &Tensor, start: i64) -> Tensor {
        let t = x.size()[2];
        let cos = self.cos.narrow(0, start, t).to_kind(x.kind());
        let sin = self.sin.narrow(0, start, t).to_kind(x.kind());
        rotate(x, &cos, &sin)
    }
}

/// The inverse frequencies of scaled RoPE and the factor on cos/sin, as transformers'
/// `ROPE_INIT_FUNCTIONS` compute them (`inv_freq`: plain RoPE's for base `theta`, head size `dim`).
fn scale_inv_freq(inv_freq: &Tensor, scaling: RopeScaling, theta: f64, dim: i64) -> (Tensor, f64) {
    match scaling {
        RopeScaling::Linear { factor } => (inv_freq / factor, 1.0),
        RopeScaling::Dynamic { .. } => (inv_freq.shallow_clone(), 1.0),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let get_mscale = |m: f64| {
                if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * m * factor.ln() + 1.0
                }
            };
            let attention = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                (Some(m), Some(a)) if m != 0.0 && a != 0.0 => get_mscale(m) / get_mscale(a),
                _ => get_mscale(1.0),
            });
            // The dimension that turns `rotations` times over the original context.
            let d = dim as f64;
            let correction = |rotations: f64| {
                d * (original_max_position_embeddings as f64
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                    / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (
                correction(beta_fast.unwrap_or(32.0)),
                correction(beta_slow.unwrap_or(1.0)),
            );
            if truncate.unwrap_or(true) {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
            if low == high {
                high += 0.001;
            }
            let ramp = ((Tensor::arange(dim / 2, (Kind::Float, inv_freq.device())) - low)
                / (high - low))
                .clamp(0.0, 1.0);
            // 1 keeps the original frequency (extrapolation), 0 interpolates it.
            let keep = -ramp + 1.0;
            let interpolated = inv_freq / factor;
            (&interpolated * (-&keep + 1.0) + inv_freq * &keep, attention)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            // Long wavelengths are interpolated, short ones kept, the band between blended.
            let long = wavelen.gt(low_wavelen);
            let scaled = (inv_freq / factor).where_self(&long, inv_freq);
            let smooth = ((wavelen.reciprocal() * old) - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let blended = (-&smooth + 1.0) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen
                .lt(high_wavelen)
                .logical_not()
                .logical_and(&long.logical_not());
            (blended.where_self(&medium, &scaled), 1.0)
        }
    }
}

/// HF's `apply_rotary_pos_emb` on `x` [B, H, T, D] with `cos`, `sin` broadcast to it.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let rotated = Tensor::cat(&[&-x.narrow(3, half, half), &x.narrow(3, 0, half)], -1);
    x * cos + rotated * sin
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &LlamaConfig) -> Self {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let b = cfg.attention_bias;
        Attention {
            q_proj: linear(&p / "q_proj", h, cfg.num_attention_heads * d, b),
            k_proj: linear(&p / "k_proj", h, cfg.num_key_value_heads * d, b),
            v_proj: linear(&p / "v_proj", h, cfg.num_key_value_heads * d, b),
            o_proj: linear(&p / "o_proj", cfg.num_attention_heads * d, h, b),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        }
    }

    /// Queries, keys and values [B, n, T, D] of `x` [B, T, C], before the rotary embedding.
    fn project(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t, _) = x.size3().expect("hidden states are [B, T, C]");
        let split = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2); // [B, n, T, D]
        (
            split(self.q_proj.forward(x), self.heads),
            split(self.k_proj.forward(x), self.kv_heads),
            split(self.v_proj.forward(x), self.kv_heads),
        )
    }

    /// Queries, keys and values [B, n, T, D] of `x` [B, T, C] at positions `[start, start + T)`.
    fn qkv(&self, x: &Tensor, rope: &Rope, start: i64) -> (Tensor, Tensor, Tensor) {
        let (q, k, v) = self.project(x);
        (rope.apply(&q, start), rope.apply(&k, start), v)
    }

    /// Causal attention of T queries over `past` earlier positions plus themselves, then `o_proj`.
    fn attend(&self, q: &Tensor, k: Tensor, v: Tensor, past: i64) -> Tensor {
        let t = q.size()[2];
        let total = k.size()[2];
        debug_assert_eq!(total, past + t);
        // Causal mask for T new queries after `past` cached positions: [T, total].
        let mask =
            Tensor::full([t, total], f64::NEG_INFINITY, (Kind::Float, q.device())).triu(past + 1);
        self.attend_masked(q, k, v, &mask)
    }

    /// Attention of `q` [B, H, T, D] over `k`, `v` [B, KV, total, D] with the additive `mask`
    /// (broadcast to [B, H, T, total]), then `o_proj`.
    fn attend_masked(&self, q: &Tensor, k: Tensor, v: Tensor, mask: &Tensor) -> Tensor {
        let (b, _, t, _) = q.size4().expect("[B, H, T, D]");
        let groups = self.heads / self.kv_heads;
        let (k, v) = if groups > 1 {
            (
                k.repeat_interleave_self_int(groups, 1, None),
                v.repeat_interleave_self_int(groups, 1, None),
            )
        } else {
            (k, v)
        };
        let scores = q.matmul(&k.transpose(-2, -1)).to_kind(Kind::Float)
            / (self.head_dim as f64).sqrt()
            + mask;
        let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
        let out =
            probs
                .matmul(&v)
                .transpose(1, 2)
                .contiguous()
                .view([b, t, self.heads * self.head_dim]);
        self.o_proj.forward(&out)
    }

    /// Packed rows (`x` [B, T, C]): each document attends only to itself, at its own positions.
    fn forward_documents(&self, x: &Tensor, rope: &Rope, docs: &Documents) -> Tensor {
        let (q, k, v) = self.project(x);
        let q = rope.apply_rows(&q, &docs.positions);
        let k = rope.apply_rows(&k, &docs.positions);
        self.attend_masked(&q, k, v, &docs.mask)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        start: i64,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (q, mut k, mut v) = self.qkv(x, rope, start);
        let t = k.size()[2];
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let past = k.size()[2] - t;
        self.attend(&q, k, v, past)
    }

    /// One sequence (`x` [1, T, C]) in pool slot `slot`, continuing at `start`: its keys and values
    /// are written into the pool, attention reads the slot's first `start + T` positions.
    fn forward_slot(
        &self,
        x: &Tensor,
        rope: &Rope,
        start: i64,
        pool: &(Tensor, Tensor),
        slot: i64,
    ) -> Tensor {
        let (q, k, v) = self.qkv(x, rope, start);
        let t = k.size()[2];
        let (pk, pv) = (pool.0.narrow(0, slot, 1), pool.1.narrow(0, slot, 1));
        pk.narrow(2, start, t).copy_(&k);
        pv.narrow(2, start, t).copy_(&v);
        self.attend(
            &q,
            pk.narrow(2, 0, start + t),
            pv.narrow(2, 0, start + t),
            start,
        )
    }

    /// Batched decode: one new token per row (`x` [B, 1, C]); row `b` lives in pool slot `slots[b]` at
    /// position `positions[b]`. Keys and values are scattered into the pool in one write and read back
    /// as one batch up to the longest row (`longest` = max position + 1), the rest masked (`mask`
    /// [B, 1, 1, longest]), so the op count does not grow with the batch.
    fn forward_slots(
        &self,
        x: &Tensor,
        rope: &Rope,
        batch: &SlotBatch,
        pool: &mut (Tensor, Tensor),
    ) -> Tensor {
        let b = x.size()[0];
        let (q, k, v) = self.project(x); // [B, n, 1, D]
        let q = rope.apply_rows(&q, &batch.positions);
        let k = rope.apply_rows(&k, &batch.positions);
        let at = [
            Some(batch.slots.shallow_clone()),
            None,
            Some(batch.positions.shallow_clone()),
        ];
        let _ = pool.0.index_put_(&at, &k.squeeze_dim(2), false);
        let _ = pool.1.index_put_(&at, &v.squeeze_dim(2), false);
        let kb = pool
            .0
            .narrow(2, 0, batch.longest)
            .index_select(0, &batch.slots); // [B, KV, T, D]
        let vb = pool
            .1
            .narrow(2, 0, batch.longest)
            .index_select(0, &batch.slots);
        // Grouped-query attention without repeating keys: the G query heads of a KV head share it.
        let groups = self.heads / self.kv_heads;
        let qg = q.reshape([b, self.kv_heads, groups, self.head_dim]);
        let scores = qg.matmul(&kb.transpose(-2, -1)).to_kind(Kind::Float)
            / (self.head_dim as f64).sqrt()
            + &batch.mask;
        let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
        let out = probs
            .matmul(&vb) // [B, KV, G, D]
            .reshape([b, 1, self.heads * self.head_dim]);
        self.o_proj.forward(&out)
    }
}

/// The documents packed into training rows: each begins at a BOS and runs to the next one (ids before
/// a row's first BOS form a document of their own). A document attends only to itself and its positions
/// restart at 0, so a packed row computes what its documents compute alone (Megatron's
/// `reset_position_ids` + `reset_attention_mask`; `train.isolate_documents`).
#[derive(Debug)]
pub struct Documents {
    /// [B, T] int64: the position of each id within its document.
    positions: Tensor,
    /// [B, 1, T, T] f32: 0 where query t may read key s (same document, s ≤ t), −∞ elsewhere.
    mask: Tensor,
}

impl Documents {
    /// The documents of `ids` [B, T].
    pub fn from_ids(ids: &Tensor, bos: i64) -> Self {
        let (b, t) = ids.size2().expect("ids are [B, T]");
        let dev = ids.device();
        let starts = ids.eq(bos).to_kind(Kind::Int64);
        let doc = starts.cumsum(1, Kind::Int64); // [B, T]: which document each id belongs to
        let index = Tensor::arange(t, (Kind::Int64, dev))
            .unsqueeze(0)
            .expand([b, t], false);
        // The latest BOS at or before each id (0 before the first).
        let (start, _) = (&index * &starts).cummax(1);
        let same = doc.unsqueeze(2).eq_tensor(&doc.unsqueeze(1)); // [B, T, T]
        let causal = Tensor::ones([t, t], (Kind::Bool, dev)).tril(0);
        let mask = Tensor::zeros([b, t, t], (Kind::Float, dev))
            .masked_fill(&same.logical_and(&causal).logical_not(), f64::NEG_INFINITY)
            .unsqueeze(1);
        Documents {
            positions: index - start,
            mask,
        }
    }

    /// Each id's position within its document, [B, T].
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }
}

/// Where the rows of a batched decode live in a [`KvPool`].
pub struct SlotBatch {
    slots: Tensor,
    positions: Tensor,
    longest: i64,
    mask: Tensor,
}

#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, cfg: &LlamaConfig) -> Self {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Mlp {
            gate_proj: linear(&p / "gate_proj", h, i, b),
            up_proj: linear(&p / "up_proj", h, i, b),
            down_proj: linear(&p / "down_proj", i, h, b),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(p: nn::Path, cfg: &LlamaConfig) -> Self {
        DecoderLayer {
            self_attn: Attention::new(&p / "self_attn", cfg),
            mlp: Mlp::new(&p / "mlp", cfg),
            input_layernorm: RmsNorm::new(
                &p / "input_layernorm",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            ),
            post_attention_layernorm: RmsNorm::new(
                &p / "post_attention_layernorm",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            ),
        }
    }

    /// The pre-norm residual block; `attend` is the attention variant (full sequence with a cache,
    /// one pool slot, or a batch of pool slots) applied to the normed input.
    fn forward(&self, x: &Tensor, attend: impl FnOnce(&Attention, &Tensor) -> Tensor) -> Tensor {
        let h = x + attend(&self.self_attn, &self.input_layernorm.forward(x));
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }
}

/// The KV cache of one shard for one batch of sequences: per layer `[B, kv_heads, T, head_dim]` keys and
/// values. Owned by whoever owns the sequences.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Preallocated keys and values of a shard's layers for a fixed number of sequence slots:
/// per layer `[slots, kv_heads, max_position_embeddings, head_dim]`. The generation service gives each
/// running sequence a slot; which positions are valid is the caller's bookkeeping.
#[derive(Debug)]
pub struct KvPool {
    layers: Vec<(Tensor, Tensor)>,
    /// Bytes one position takes across the shard's layers (keys and values).
    pub bytes_per_position: u64,
}

impl KvPool {
    /// Copies the first `len` cached positions of slot `from` into slot `to` (every layer): a beam
    /// hypothesis forking from its parent.
    pub fn copy_slot(&mut self, from: i64, to: i64, len: i64) {
        if from == to || len <= 0 {
            return;
        }
        tch::no_grad(|| {
            for (k, v) in &mut self.layers {
                for t in [k, v] {
                    let src = t.narrow(0, from, 1).narrow(2, 0, len);
                    t.narrow(0, to, 1).narrow(2, 0, len).copy_(&src);
                }
            }
        });
    }
}

/// Embedding rows: the base vocabulary (HF `model.embed_tokens`) and DEEM's appended tokens.
#[derive(Debug)]
struct Embedding {
    base: Tensor,
    new: Option<Tensor>,
    soi: Tensor,
}

/// Where a checkpoint may keep the decoder: plain HF names, a multimodal wrapper's `language_model.`,
/// and DEEM's whole-model `mm_decoder.`; the HF name is the module's own.
const MODEL_PREFIXES: [&str; 3] = ["model.", "language_model.model.", "mm_decoder."];
const HEAD_PREFIXES: [&str; 3] = ["lm_head", "language_model.lm_head", "mm_decoder.lm_head"];

/// LLaMA layers `[start, end)`, with the embedding if `start == 0` and norm + heads if `end == layers`.
#[derive(Debug)]
pub struct LlamaShard {
    pub cfg: LlamaConfig,
    pub range: Range<i64>,
    embed: Option<Embedding>,
    layers: Vec<DecoderLayer>,
    norm: Option<RmsNorm>,
    lm_head: Option<Tensor>,
    lm_head_new: Option<Tensor>,
    rope: Rope,
}

impl LlamaShard {
    /// Builds the shard's modules under `root` (the VarStore root: names are `model.…`, `lm_head`).
    pub fn new(root: &nn::Path, cfg: &LlamaConfig, range: Range<i64>) -> Result<Self, LlamaError> {
        if range.start < 0 || range.start >= range.end || range.end > cfg.num_hidden_layers {
            return Err(LlamaError::Range {
                start: range.start,
                end: range.end,
                layers: cfg.num_hidden_layers,
            });
        }
        if cfg.tie_word_embeddings && range.start > 0 && range.end == cfg.num_hidden_layers {
            return Err(LlamaError::TiedAcrossShards {
                start: range.start,
                end: range.end,
            });
        }
        let model = root / "model";
        let (h, v, n) = (cfg.hidden_size, cfg.vocab_size, cfg.num_new_tokens);
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let embed = (range.start == 0).then(|| Embedding {
            base: (&model / "embed_tokens").var("weight", &[v, h], init),
            new: (n > 0).then(|| (&model / "embed_tokens_new").var("weight", &[n, h], init)),
            soi: model.zeros("soi_embedding", &[h]),
        });
        let layers = range
            .clone()
            .map(|i| DecoderLayer::new(&model / "layers" / i, cfg))
            .collect();
        let last = range.end == cfg.num_hidden_layers;
        let norm = last.then(|| RmsNorm::new(&model / "norm", h, cfg.rms_norm_eps));
        let lm_head = (last && !cfg.tie_word_embeddings)
            .then(|| (root / "lm_head").var("weight", &[v, h], init));
        let lm_head_new =
            (last && n > 0).then(|| (root / "lm_head_new").var("weight", &[n, h], init));
        let rope = Rope::new(cfg, root.device());
        Ok(LlamaShard {
            cfg: cfg.clone(),
            range,
            embed,
            layers,
            norm,
            lm_head,
            lm_head_new,
            rope,
        })
    }

    pub fn is_first(&self) -> bool {
        self.range.start == 0
    }

    pub fn is_last(&self) -> bool {
        self.range.end == self.cfg.num_hidden_layers
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Token embeddings [B, T, C] of ids [B, T]; ids at or above `vocab_size` are DEEM's new tokens.
    /// First shard only.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let e = self
            .embed
            .as_ref()
            .expect("embed() is called on the first shard only");
        match &e.new {
            None => Tensor::embedding(&e.base, ids, -1, false, false),
            Some(new) => {
                // Two lookups joined row by row: concatenating the tables would copy the whole
                // vocabulary's embedding on every call.
                let v = e.base.size()[0];
                let is_new = ids.ge(v);
                let zero = Tensor::zeros_like(ids);
                let base_ids = ids.where_self(&is_new.logical_not(), &zero);
                let new_ids = (ids - v).where_self(&is_new, &zero);
                let eb = Tensor::embedding(&e.base, &base_ids, -1, false, false);
                let en = Tensor::embedding(new, &new_ids, -1, false, false);
                en.where_self(&is_new.unsqueeze(-1), &eb)
            }
        }
    }

    /// The learnable vector added to the embedding of `<|startofimage|>` (first shard only).
    pub fn soi_embedding(&self) -> Option<&Tensor> {
        self.embed.as_ref().map(|e| &e.soi)
    }

    /// Runs this shard's layers on hidden states [B, T, C] at positions `[start, start + T)`, appending
    /// to `cache` when given.
    pub fn forward_layers(
        &self,
        hidden: &Tensor,
        start: i64,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut h = hidden.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(&h, |a, x| a.forward(x, &self.rope, start, slot));
        }
        h
    }

    /// Runs this shard's layers on packed training rows [B, T, C], each document isolated (no cache).
    pub fn forward_documents(&self, hidden: &Tensor, docs: &Documents) -> Tensor {
        let mut h = hidden.shallow_clone();
        for layer in &self.layers {
            h = layer.forward(&h, |a, x| a.forward_documents(x, &self.rope, docs));
        }
        h
    }

    /// A KV pool of `slots` sequences of up to `max_position_embeddings` positions each, for this
    /// shard's layers, in the dtype of its weights.
    pub fn new_pool(&self, slots: i64) -> KvPool {
        let kind = self.layers[0].self_attn.k_proj.ws.kind();
        let device = self.layers[0].self_attn.k_proj.ws.device();
        let shape = [
            slots,
            self.cfg.num_key_value_heads,
            self.cfg.max_position_embeddings,
            self.cfg.head_dim,
        ];
        KvPool {
            layers: self
                .layers
                .iter()
                .map(|_| {
                    (
                        Tensor::zeros(shape, (kind, device)),
                        Tensor::zeros(shape, (kind, device)),
                    )
                })
                .collect(),
            bytes_per_position: (self.layers.len() as i64 * 2 * shape[1] * shape[3]) as u64
                * kind.elt_size_in_bytes() as u64,
        }
    }

    /// Runs this shard's layers for one sequence in pool slot `slot`: `hidden` [1, T, C] continues at
    /// position `start` (a prompt, or an image's visual tokens). Inference only.
    pub fn forward_slot(
        &self,
        hidden: &Tensor,
        slot: i64,
        start: i64,
        pool: &mut KvPool,
    ) -> Tensor {
        let mut h = hidden.shallow_clone();
        for (layer, kv) in self.layers.iter().zip(&pool.layers) {
            h = layer.forward(&h, |a, x| a.forward_slot(x, &self.rope, start, kv, slot));
        }
        h
    }

    /// Batched decode over sequences of different lengths: `hidden` [B, 1, C] holds one new position
    /// per row; row `b` sits in pool slot `slots[b]` at position `positions[b]`. Gives each row what
    /// [`LlamaShard::forward_slot`] gives it alone (up to the rounding of batched products).
    pub fn forward_slots(
        &self,
        hidden: &Tensor,
        slots: &[i64],
        positions: &[i64],
        pool: &mut KvPool,
    ) -> Tensor {
        let dev = hidden.device();
        let longest = positions.iter().copied().max().unwrap_or(0) + 1;
        let mask: Vec<f32> = positions
            .iter()
            .flat_map(|&p| (0..longest).map(move |j| if j <= p { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let batch = SlotBatch {
            slots: Tensor::from_slice(slots).to_device(dev),
            positions: Tensor::from_slice(positions).to_device(dev),
            longest,
            mask: Tensor::from_slice(&mask).to_device(dev).view([
                slots.len() as i64,
                1,
                1,
                longest,
            ]),
        };
        let mut h = hidden.shallow_clone();
        for (layer, kv) in self.layers.iter().zip(pool.layers.iter_mut()) {
            h = layer.forward(&h, |a, x| a.forward_slots(x, &self.rope, &batch, kv));
        }
        h
    }

    /// Final norm (last shard only).
    pub fn norm(&self, hidden: &Tensor) -> Tensor {
        self.norm
            .as_ref()
            .expect("norm() is called on the last shard only")
            .forward(hidden)
    }

    /// Logits [B, T, vocab + new tokens] of already normed hidden states (last shard only).
    pub fn logits(&self, normed: &Tensor) -> Tensor {
        let head = match (&self.lm_head, &self.embed) {
            (Some(w), _) => w.shallow_clone(),
            (None, Some(e)) => e.base.shallow_clone(),
            (None, None) => panic!("tied embeddings need the embedding on the last shard"),
        };
        let base = normed.matmul(&head.tr());
        match &self.lm_head_new {
            Some(new) => Tensor::cat(&[base, normed.matmul(&new.tr())], -1),
            None => base,
        }
    }

    /// Whole-model convenience: ids → logits, for a shard that is both first and last.
    pub fn forward_ids(&self, ids: &Tensor, start: i64, cache: Option<&mut KvCache>) -> Tensor {
        let h = self.forward_layers(&self.embed(ids), start, cache);
        self.logits(&self.norm(&h))
    }

    /// Checkpoint loading rules for this shard: other shards' layers and HF buffers are skipped, DEEM's
    /// additions may be absent from a plain HF checkpoint, and DEEM whole-model names map onto HF names.
    pub fn load_spec(&self) -> crate::checkpoint::LoadSpec {
        let mut ignore = Vec::new();
        for p in MODEL_PREFIXES {
            ignore.extend(
                (0..self.cfg.num_hidden_layers)
                    .filter(|i| !self.range.contains(i))
                    .map(|i| format!("{p}layers.{i}.")),
            );
            ignore.push(format!("{p}rotary_emb."));
            if !self.is_first() {
                ignore.extend([format!("{p}embed_tokens"), format!("{p}soi_embedding")]);
            }
            if !self.is_last() {
                ignore.push(format!("{p}norm."));
            }
        }
        if !self.is_last() {
            ignore.extend(HEAD_PREFIXES.map(String::from));
        }
        crate::checkpoint::LoadSpec {
            component: format!("llm shard [{}, {})", self.range.start, self.range.end),
            prefix_map: MODEL_PREFIXES[1..]
                .iter()
                .map(|p| ("model.".to_string(), p.to_string()))
                .chain(
                    HEAD_PREFIXES[1..]
                        .iter()
                        .map(|p| ("lm_head".to_string(), p.to_string())),
                )
                .collect(),
            namespace: MODEL_PREFIXES
                .iter()
                .chain(&HEAD_PREFIXES)
                .map(|p| p.to_string())
                .collect(),
            ignore,
            optional: vec![
                "model.embed_tokens_new.".into(),
                "lm_head_new.".into(),
                "model.soi_embedding".into(),
            ],
        }
    }
}
