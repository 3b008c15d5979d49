//! Rotary position embeddings, after transformers' `LlamaRotaryEmbedding` and its RoPE scaling types
//! (linear, dynamic, llama3, yarn).

use tch::{Kind, Tensor};

use crate::config::RopeScaling;

use super::config::LlamaConfig;

/// Rotary embedding tables for positions `[0, max)`.
#[derive(Debug)]
pub(crate) struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl Rope {
    pub(crate) fn new(cfg: &LlamaConfig, device: tch::Device) -> Self {
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
    pub(crate) fn apply_rows(&self, x: &Tensor, positions: &Tensor) -> Tensor {
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
    pub(crate) fn apply(&self, x: &Tensor, start: i64) -> Tensor {
        let t = x.size()[2];
        let cos = self.cos.narrow(0, start, t).to_kind(x.kind());
        let sin = self.sin.narrow(0, start, t).to_kind(x.kind());
        rotate(x, &cos, &sin)
    }
}

/// The inverse frequencies of scaled RoPE and the factor on cos/sin, as transformers'
/// `ROPE_INIT_FUNCTIONS` compute them (`inv_freq`: plain RoPE's for base `theta`, head size `dim`).
pub(crate) fn scale_inv_freq(
    inv_freq: &Tensor,
    scaling: RopeScaling,
    theta: f64,
    dim: i64,
) -> (Tensor, f64) {
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
pub(crate) fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let rotated = Tensor::cat(&[&-x.narrow(3, half, half), &x.narrow(3, 0, half)], -1);
    x * cos + rotated * sin
}
