//! DEEM's NIP condition: the LLM hidden states of an image's context (from the nearest BOS up to its
//! `<|startofimage|>`, reversed so the nearest token comes first) → a projection at the LLM width → 1-D
//! sin-cos positions → a perceiver whose learned queries cross-attend to them → the UNet context
//! `[B, num_queries, width]`. A learned null condition stands in for it in classifier-free guidance.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::config::ConditionConfig;
use crate::models::resampler::sincos_1d;

#[derive(Debug)]
struct PerceiverLayer {
    norm_q: nn::LayerNorm,
    norm_kv: nn::LayerNorm,
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    out: nn::Linear,
    norm_mlp: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl PerceiverLayer {
    fn new(p: nn::Path, w: i64, kv: i64, heads: i64) -> Self {
        let ln = |q: nn::Path, d: i64| nn::layer_norm(q, vec![d], Default::default());
        let lin = |q: nn::Path, i: i64, o: i64| nn::linear(q, i, o, Default::default());
        PerceiverLayer {
            norm_q: ln(&p / "norm_q", w),
            norm_kv: ln(&p / "norm_kv", kv),
            q: lin(&p / "q", w, w),
            k: lin(&p / "k", kv, w),
            v: lin(&p / "v", kv, w),
            out: lin(&p / "out", w, w),
            norm_mlp: ln(&p / "norm_mlp", w),
            fc1: lin(&p / "fc1", w, 4 * w),
            fc2: lin(&p / "fc2", 4 * w, w),
            heads,
        }
    }

    /// Queries `x` [B, Q, W] attend to `kv` [B, N, L], masked by `kv_mask` [B, N] (true = attend).
    fn forward(&self, x: &Tensor, kv: &Tensor, kv_mask: &Tensor) -> Tensor {
        let (b, q, w) = x.size3().expect("[B, Q, W]");
        let n = kv.size()[1];
        let d = w / self.heads;
        let split = |t: Tensor, len: i64| t.view([b, len, self.heads, d]).transpose(1, 2);
        let kvn = self.norm_kv.forward(kv);
        let qh = split(self.q.forward(&self.norm_q.forward(x)), q);
        let (kh, vh) = (
            split(self.k.forward(&kvn), n),
            split(self.v.forward(&kvn), n),
        );
        let mask = kv_mask.view([b, 1, 1, n]);
        let att = Tensor::scaled_dot_product_attention(
            &qh,
            &kh,
            &vh,
            Some(mask),
            0.0,
            false,
            None,
            false,
        );
        let h = x + self
            .out
            .forward(&att.transpose(1, 2).contiguous().view([b, q, w]));
        &h + self
            .fc2
            .forward(&self.fc1.forward(&self.norm_mlp.forward(&h)).gelu("none"))
    }
}

/// LLM context → UNet context.
#[derive(Debug)]
pub struct NipCondition {
    proj: nn::Linear,
    queries: Tensor,
    layers: Vec<PerceiverLayer>,
    norm_out: nn::LayerNorm,
    /// The learned null condition `[1, Q, W]`.
    pub null_condition: Tensor,
    llm_width: i64,
}

impl NipCondition {
    /// Builds under `p` (conventionally `root / "nip_condition"`).
    pub fn new(p: &nn::Path, cfg: &ConditionConfig, llm_width: i64) -> Self {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        NipCondition {
            proj: nn::linear(p / "proj", llm_width, llm_width, Default::default()),
            queries: p.var("queries", &[1, cfg.num_queries, cfg.width], init),
            layers: (0..cfg.num_layers)
                .map(|i| PerceiverLayer::new(p / "layers" / i, cfg.width, llm_width, cfg.num_heads))
                .collect(),
            norm_out: nn::layer_norm(p / "norm_out", vec![cfg.width], Default::default()),
            null_condition: p.var("null_condition", &[1, cfg.num_queries, cfg.width], init),
            llm_width,
        }
    }

    /// `context` [B, N, L]: each row's hidden states from the image's SoI back to its BOS (nearest first),
    /// right-padded; `mask` [B, N] marks the real positions.
    pub fn forward(&self, context: &Tensor, mask: &Tensor) -> Tensor {
        let (b, n, _) = context.size3().expect("[B, N, L]");
        let pos = sincos_1d(
            self.llm_width,
            &Tensor::arange(n, (Kind::Float, context.device())),
        )
        .to_kind(context.kind());
        let kv = self.proj.forward(context) + pos.unsqueeze(0);
        let mask = mask.to_kind(Kind::Bool);
        let mut x = self
            .queries
            .expand([b, -1, -1], false)
            .to_kind(context.kind());
        for l in &self.layers {
            x = l.forward(&x, &kv, &mask);
        }
        self.norm_out.forward(&x)
    }

    /// The null condition for `b` rows.
    pub fn null(&self, b: i64) -> Tensor {
        self.null_condition.expand([b, -1, -1], false)
    }
}

/// Gathers each image's NIP context from the LLM's hidden states.
///
/// For every `<|startofimage|>` at `(row, t)` in `ids` [B, T] the context is `hidden[row, s..=t]` reversed,
/// where `s` is the position of the nearest BOS at or before `t`. Returns `(context [N, maxlen, L],
/// mask [N, maxlen], image index)` — the index of each drawn image among all `<|startofimage|>` tokens,
/// row by row — skipping images whose context is only `[BOS, SoI]` (nothing to condition on, as in the
/// reference).
pub fn gather_contexts(
    hidden: &Tensor,
    ids: &Tensor,
    bos_id: i64,
    soi_id: i64,
) -> Option<(Tensor, Tensor, Vec<i64>)> {
    let (b, t, _) = hidden.size3().expect("[B, T, L]");
    let ids_v: Vec<i64> = Vec::try_from(ids.to_device(tch::Device::Cpu).reshape([-1])).ok()?;
    let mut spans = Vec::new();
    let mut image = 0i64;
    for r in 0..b {
        let row = &ids_v[(r * t) as usize..((r + 1) * t) as usize];
        let mut start = 0i64;
        for (i, &id) in row.iter().enumerate() {
            let i = i as i64;
            if id == bos_id {
                start = i;
            }
            if id == soi_id {
                let only_bos_soi = i - start == 1 && row[start as usize] == bos_id;
                if !only_bos_soi {
                    spans.push((r, start, i, image));
                }
                image += 1;
            }
        }
    }
    if spans.is_empty() {
        return None;
    }
    let maxlen = spans
        .iter()
        .map(|&(_, s, e, _)| e - s + 1)
        .max()
        .unwrap_or(1);
    let mut ctx = Vec::with_capacity(spans.len());
    let mut masks = Vec::with_capacity(spans.len());
    for &(r, s, e, _) in &spans {
        let len = e - s + 1;
        let seg = hidden.get(r).narrow(0, s, len).flip([0]);
        ctx.push(seg.constant_pad_nd([0, 0, 0, maxlen - len]));
        let m = Tensor::cat(
            &[
                Tensor::ones([len], (Kind::Bool, hidden.device())),
                Tensor::zeros([maxlen - len], (Kind::Bool, hidden.device())),
            ],
            0,
        );
        masks.push(m);
    }
    Some((
        Tensor::stack(&ctx, 0),
        Tensor::stack(&masks, 0),
        spans.iter().map(|&(_, _, _, image)| image).collect(),
    ))
}
