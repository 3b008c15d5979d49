//! DEEM's visual tokenizer: the image tokens go through a projection, a LayerNorm and 2-D sin-cos
//! positions, then a Q-Former-style Perceiver Resampler (HF transformers `Blip2QFormerModel`, query path
//! only, under `qformer.`) turns them into `num_query_tokens` (77) queries; `proj_t` maps those to the LLM
//! width (the visual tokens) and `proj_i` to the UNet context width (the CSR condition).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::config::ResamplerConfig;

fn ln(p: nn::Path, d: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![d],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// BERT-style multi-head attention (`query`/`key`/`value`) with a post-LN output block
/// (`output.dense`, `output.LayerNorm`), as HF `Blip2QFormerAttention`.
#[derive(Debug)]
struct QfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    dense: nn::Linear,
    norm: nn::LayerNorm,
    heads: i64,
}

impl QfAttention {
    fn new(p: nn::Path, h: i64, kv_width: i64, heads: i64, eps: f64) -> Self {
        let a = &p / "attention";
        QfAttention {
            query: nn::linear(&a / "query", h, h, Default::default()),
            key: nn::linear(&a / "key", kv_width, h, Default::default()),
            value: nn::linear(&a / "value", kv_width, h, Default::default()),
            dense: nn::linear(&p / "output" / "dense", h, h, Default::default()),
            norm: ln(&p / "output" / "LayerNorm", h, eps),
            heads,
        }
    }

    /// `x` [B, Q, h] attends to `kv` [B, N, kv_width].
    fn forward(&self, x: &Tensor, kv: &Tensor) -> Tensor {
        let (b, q, h) = x.size3().expect("[B, Q, h]");
        let n = kv.size()[1];
        let d = h / self.heads;
        let split = |y: Tensor, len: i64| y.view([b, len, self.heads, d]).transpose(1, 2);
        let qh = split(self.query.forward(x), q);
        let kh = split(self.key.forward(kv), n);
        let vh = split(self.value.forward(kv), n);
        // libtorch's fused attention (no mask: every query reads every visual token).
        let ctx = Tensor::scaled_dot_product_attention::<Tensor>(
            &qh, &kh, &vh, None, 0.0, false, None, false,
        )
        .transpose(1, 2)
        .contiguous()
        .view([b, q, h]);
        self.norm.forward(&(self.dense.forward(&ctx) + x))
    }
}

#[derive(Debug)]
struct QfLayer {
    attention: QfAttention,
    crossattention: Option<QfAttention>,
    intermediate: nn::Linear,
    output: nn::Linear,
    output_norm: nn::LayerNorm,
}

/// The resampler with its input and output projections.
#[derive(Debug)]
pub struct Resampler {
    input_proj: nn::Linear,
    input_norm: nn::LayerNorm,
    query_tokens: Tensor,
    layernorm: nn::LayerNorm,
    layers: Vec<QfLayer>,
    proj_t: nn::Linear,
    proj_i: nn::Linear,
    encoder_width: i64,
}

/// What the resampler computes for a batch of images.
#[derive(Debug)]
pub struct ResamplerOutput {
    /// `[B, 77, llm_width]`: the image's tokens in the LLM sequence.
    pub visual_tokens: Tensor,
    /// `[B, 77, unet_context]`: the CSR condition for the UNet.
    pub csr_condition: Tensor,
}

/// 1-D sin-cos embedding of `pos` (float, any shape) into `dim` channels: `[sin(p·ω), cos(p·ω)]` with
/// `ω_i = 10000^(-i / (dim/2))`.
pub fn sincos_1d(dim: i64, pos: &Tensor) -> Tensor {
    let omega = Tensor::arange(dim / 2, (Kind::Double, pos.device())) / (dim as f64 / 2.0);
    let omega = (omega * -(10000f64.ln())).exp();
    let out = pos.to_kind(Kind::Double).reshape([-1]).outer(&omega);
    Tensor::cat(&[out.sin(), out.cos()], 1).to_kind(Kind::Float)
}

/// 2-D sin-cos positions for an `h × w` grid in row-major order, `[h·w, dim]`: the first half of the
/// channels encodes the column, the second half the row (the MAE convention).
pub fn sincos_2d(dim: i64, h: i64, w: i64, device: tch::Device) -> Tensor {
    let rows = Tensor::arange(h, (Kind::Double, device))
        .view([h, 1])
        .expand([h, w], false);
    let cols = Tensor::arange(w, (Kind::Double, device))
        .view([1, w])
        .expand([h, w], false);
    Tensor::cat(&[sincos_1d(dim / 2, &cols), sincos_1d(dim / 2, &rows)], 1)
}

impl Resampler {
    /// Builds under `p` (conventionally `root / "visual_tokenizer"`).
    pub fn new(p: &nn::Path, cfg: &ResamplerConfig, llm_width: i64, unet_context: i64) -> Self {
        let (h, e, eps) = (cfg.hidden_size, cfg.encoder_hidden_size, cfg.layer_norm_eps);
        let q = p / "qformer";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let lp = &q / "encoder" / "layer" / i;
                QfLayer {
                    attention: QfAttention::new(
                        &lp / "attention",
                        h,
                        h,
                        cfg.num_attention_heads,
                        eps,
                    ),
                    crossattention: (i % cfg.cross_attention_frequency == 0).then(|| {
                        QfAttention::new(&lp / "crossattention", h, e, cfg.num_attention_heads, eps)
                    }),
                    intermediate: nn::linear(
                        &lp / "intermediate_query" / "dense",
                        h,
                        cfg.intermediate_size,
                        Default::default(),
                    ),
                    output: nn::linear(
                        &lp / "output_query" / "dense",
                        cfg.intermediate_size,
                        h,
                        Default::default(),
                    ),
                    output_norm: ln(&lp / "output_query" / "LayerNorm", h, eps),
                }
            })
            .collect();
        Resampler {
            input_proj: nn::linear(p / "input_proj", e, e, Default::default()),
            input_norm: ln(p / "input_norm", e, 1e-6),
            query_tokens: p.var(
                "query_tokens",
                &[1, cfg.num_query_tokens, h],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            layernorm: ln(&q / "layernorm", h, eps),
            layers,
            proj_t: nn::linear(p / "proj_t", h, llm_width, Default::default()),
            proj_i: nn::linear(p / "proj_i", h, unet_context, Default::default()),
            encoder_width: e,
        }
    }

    /// Position embeddings for `n` image tokens: zeros for the leading pooled token, 2-D sin-cos for the
    /// square grid after it.
    fn positions(&self, n: i64, device: tch::Device) -> Tensor {
        let side = ((n - 1) as f64).sqrt().round() as i64;
        assert_eq!(
            side * side,
            n - 1,
            "image tokens are one pooled token plus a square grid, got {n}"
        );
        let grid = sincos_2d(self.encoder_width, side, side, device);
        Tensor::cat(
            &[
                &Tensor::zeros([1, self.encoder_width], (Kind::Float, device)),
                &grid,
            ],
            0,
        )
    }

    /// `image_tokens` [B, N, encoder_width] (N = 1 + a square grid, plus any prepended region tokens
    /// given in `prefix`) → visual tokens and CSR condition.
    pub fn forward(&self, image_tokens: &Tensor, prefix: Option<&Tensor>) -> ResamplerOutput {
        let (b, n, _) = image_tokens.size3().expect("[B, N, C]");
        let pos = self
            .positions(n, image_tokens.device())
            .to_kind(image_tokens.kind());
        let mut kv = self
            .input_norm
            .forward(&self.input_proj.forward(image_tokens))
            + pos;
        if let Some(pre) = prefix {
            kv = Tensor::cat(&[pre, &kv], 1);
        }
        let mut x = self
            .layernorm
            .forward(&self.query_tokens.expand([b, -1, -1], false));
        for l in &self.layers {
            x = l.attention.forward(&x, &x);
            if let Some(c) = &l.crossattention {
                x = c.forward(&x, &kv);
            }
            let ff = l.output.forward(&l.intermediate.forward(&x).gelu("none"));
            x = l.output_norm.forward(&(ff + &x));
        }
        ResamplerOutput {
            visual_tokens: self.proj_t.forward(&x),
            csr_condition: self.proj_i.forward(&x),
        }
    }

    /// Checkpoint rules over DEEM's names (`visual_tokenizer.qformer.…`; a plain HF `Blip2QFormerModel`
    /// file's root names and a BLIP-2 one's `qformer.` are mapped onto them by
    /// [`crate::models::pretrained`]).
    pub fn load_spec() -> crate::checkpoint::LoadSpec {
        crate::checkpoint::LoadSpec {
            component: "resampler".into(),
            namespace: vec!["visual_tokenizer.".into()],
            // The encoder and the mask-aware extractor live under the same prefix in DEEM checkpoints.
            ignore: [
                vec!["visual_tokenizer.encoder.".into()],
                crate::models::region::key_prefixes(),
            ]
            .concat(),
            optional: vec![],
        }
    }
}
