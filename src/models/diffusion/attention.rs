//! diffusers `models/attention_processor.py` `Attention`, `models/attention.py` `BasicTransformerBlock`
//! (with GEGLU feed-forward) and `models/transformers/transformer_2d.py` `Transformer2DModel`.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::resnet::{conv1, group_norm};

/// Multi-head attention with diffusers names (`to_q`, `to_k`, `to_v`, `to_out.0`).
#[derive(Debug)]
pub struct Attention {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
}

impl Attention {
    pub fn new(
        p: nn::Path,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        qkv_bias: bool,
    ) -> Self {
        let inner = heads * head_dim;
        let cfg = nn::LinearConfig {
            bias: qkv_bias,
            ..Default::default()
        };
        Attention {
            to_q: nn::linear(&p / "to_q", query_dim, inner, cfg),
            to_k: nn::linear(&p / "to_k", context_dim, inner, cfg),
            to_v: nn::linear(&p / "to_v", context_dim, inner, cfg),
            to_out: nn::linear(&p / "to_out" / 0, inner, query_dim, Default::default()),
            heads,
        }
    }

    /// `x` [B, N, query_dim] attends to `context` [B, M, context_dim] (itself when `None`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(x);
        let (b, n, _) = x.size3().expect("[B, N, C]");
        let m = ctx.size()[1];
        let q = self.to_q.forward(x);
        let inner = q.size()[2];
        let d = inner / self.heads;
        let split = |t: Tensor, len: i64| t.view([b, len, self.heads, d]).transpose(1, 2);
        let (q, k, v) = (
            split(q, n),
            split(self.to_k.forward(ctx), m),
            split(self.to_v.forward(ctx), m),
        );
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, false, None, false,
        );
        self.to_out
            .forward(&out.transpose(1, 2).contiguous().view([b, n, inner]))
    }
}

#[derive(Debug)]
struct GegluFeedForward {
    proj: nn::Linear,
    out: nn::Linear,
}

impl Module for GegluFeedForward {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.proj.forward(x);
        let parts = h.chunk(2, -1);
        self.out.forward(&(&parts[0] * parts[1].gelu("none")))
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: GegluFeedForward,
}

impl BasicTransformerBlock {
    fn new(p: nn::Path, c: i64, cross: i64, heads: i64) -> Self {
        let ln = |q: nn::Path| nn::layer_norm(q, vec![c], Default::default());
        let d = c / heads;
        BasicTransformerBlock {
            norm1: ln(&p / "norm1"),
            attn1: Attention::new(&p / "attn1", c, c, heads, d, false),
            norm2: ln(&p / "norm2"),
            attn2: Attention::new(&p / "attn2", c, cross, heads, d, false),
            norm3: ln(&p / "norm3"),
            ff: GegluFeedForward {
                proj: nn::linear(&p / "ff" / "net" / 0 / "proj", c, 8 * c, Default::default()),
                out: nn::linear(&p / "ff" / "net" / 2, 4 * c, c, Default::default()),
            },
        }
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let h = x + self.attn1.forward(&self.norm1.forward(x), None);
        let h = &h + self.attn2.forward(&self.norm2.forward(&h), Some(context));
        &h + self.ff.forward(&self.norm3.forward(&h))
    }
}

/// Either a linear projection on [B, HW, C] (SD 2.x) or a 1×1 convolution on [B, C, H, W] (SD 1.x).
#[derive(Debug)]
enum Proj {
    Linear(nn::Linear),
    Conv(nn::Conv2D),
}

/// `Transformer2DModel` over a feature map, with cross-attention to the UNet context.
#[derive(Debug)]
pub struct Transformer2D {
    norm: nn::GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    pub fn new(
        p: nn::Path,
        c: i64,
        cross: i64,
        heads: i64,
        layers: i64,
        groups: i64,
        linear: bool,
    ) -> Self {
        let proj = |q: nn::Path| {
            if linear {
                Proj::Linear(nn::linear(q, c, c, Default::default()))
            } else {
                Proj::Conv(conv1(q, c, c))
            }
        };
        Transformer2D {
            norm: group_norm(&p / "norm", groups, c, 1e-6),
            proj_in: proj(&p / "proj_in"),
            blocks: (0..layers)
                .map(|i| BasicTransformerBlock::new(&p / "transformer_blocks" / i, c, cross, heads))
                .collect(),
            proj_out: proj(&p / "proj_out"),
        }
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("[B, C, H, W]");
        let to_seq = |t: Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let to_map = |t: Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
        let n = self.norm.forward(x);
        let mut s = match &self.proj_in {
            Proj::Linear(l) => l.forward(&to_seq(n)),
            Proj::Conv(cv) => to_seq(cv.forward(&n)),
        };
        for blk in &self.blocks {
            s = blk.forward(&s, &context.to_kind(s.kind()));
        }
        let out = match &self.proj_out {
            Proj::Linear(l) => to_map(l.forward(&s)),
            Proj::Conv(cv) => cv.forward(&to_map(s)),
        };
        out + x
    }
}

/// diffusers `get_timestep_embedding` with `flip_sin_to_cos = true` and `downscale_freq_shift = 0`:
/// `[cos(t·ω), sin(t·ω)]`, `ω_i = exp(−ln(10000)·i/half)`.
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    // Same operation order as diffusers (−ln(10000)·i, then / half): at t ≈ 1000 a reordering shows.
    let exponent = Tensor::arange(half, (Kind::Float, t.device())) * -(10000f64.ln()) / half as f64;
    let args = t.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let emb = Tensor::cat(&[args.cos(), args.sin()], -1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}
