//! One decoder layer, after transformers' `LlamaDecoderLayer`: RMSNorm, attention, SwiGLU MLP.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::attention::{linear, Attention};
use super::config::LlamaConfig;

/// RMSNorm computed in f32 and cast back, as HF does.
#[derive(Debug)]
pub struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
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
        // fp32 whatever the model's dtype (as transformers' LlamaRMSNorm): a bf16 mean of squares
        // loses the small components.
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

#[derive(Debug)]
pub(crate) struct Mlp {
    pub(crate) gate_proj: nn::Linear,
    pub(crate) up_proj: nn::Linear,
    pub(crate) down_proj: nn::Linear,
}

impl Mlp {
    pub(crate) fn new(p: nn::Path, cfg: &LlamaConfig) -> Self {
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
pub(crate) struct DecoderLayer {
    pub(crate) self_attn: Attention,
    pub(crate) mlp: Mlp,
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub(crate) fn new(p: nn::Path, cfg: &LlamaConfig) -> Self {
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
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Attention, &Tensor) -> Tensor,
    ) -> Tensor {
        let h = x + attend(&self.self_attn, &self.input_layernorm.forward(x));
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }
}
