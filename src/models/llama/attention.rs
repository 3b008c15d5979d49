//! Grouped-query attention, after transformers' `LlamaAttention` (SDPA): causal within documents,
//! over a cache or a pool slot. Every path runs libtorch's fused `scaled_dot_product_attention` (flash
//! or memory-efficient kernels on a GPU, the fused kernel or the math path on the CPU), never a
//! materialised [B, H, T, T] score tensor kept for backward; the explicit path survives only as the
//! tests' reference.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::LlamaConfig;
use super::rope::Rope;

/// A linear layer without or with bias, as HF's `nn.Linear(..., bias=...)`.
pub(crate) fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
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

#[derive(Debug)]
pub(crate) struct Attention {
    pub(crate) q_proj: nn::Linear,
    pub(crate) k_proj: nn::Linear,
    pub(crate) v_proj: nn::Linear,
    pub(crate) o_proj: nn::Linear,
    pub(crate) heads: i64,
    pub(crate) kv_heads: i64,
    pub(crate) head_dim: i64,
}

impl Attention {
    pub(crate) fn new(p: nn::Path, cfg: &LlamaConfig) -> Self {
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
    pub(crate) fn project(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t, _) = x.size3().expect("hidden states are [B, T, C]");
        let split = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2); // [B, n, T, D]
        (
            split(self.q_proj.forward(x), self.heads),
            split(self.k_proj.forward(x), self.kv_heads),
            split(self.v_proj.forward(x), self.kv_heads),
        )
    }

    /// Queries, keys and values [B, n, T, D] of `x` [B, T, C] at positions `[start, start + T)`.
    pub(crate) fn qkv(&self, x: &Tensor, rope: &Rope, start: i64) -> (Tensor, Tensor, Tensor) {
        let (q, k, v) = self.project(x);
        (rope.apply(&q, start), rope.apply(&k, start), v)
    }

    /// Causal attention of T queries over `past` earlier positions plus themselves, then `o_proj`.
    pub(crate) fn attend(&self, q: &Tensor, k: Tensor, v: Tensor, past: i64) -> Tensor {
        let t = q.size()[2];
        let total = k.size()[2];
        debug_assert_eq!(total, past + t);
        let out = if past == 0 {
            self.sdpa(q, &k, &v, None, true)
        } else if t == 1 {
            // One new query reads every cached position.
            self.sdpa(q, &k, &v, None, false)
        } else {
            // T new queries after `past` cached positions: [T, total], bottom-right aligned.
            let mask = Tensor::full([t, total], f64::NEG_INFINITY, (Kind::Float, q.device()))
                .triu(past + 1);
            self.sdpa(q, &k, &v, Some(&mask), false)
        };
        self.merge_heads(out)
    }

    /// Attention of `q` [B, H, T, D] over `k`, `v` [B, KV, total, D] with the additive `mask`
    /// (broadcast to [B, H, T, total]), then `o_proj`.
    pub(crate) fn attend_masked(&self, q: &Tensor, k: Tensor, v: Tensor, mask: &Tensor) -> Tensor {
        let out = self.sdpa(q, &k, &v, Some(mask), false);
        self.merge_heads(out)
    }

    /// libtorch's fused attention of `q` [B, H, T, D] over `k`, `v` [B, KV, S, D]: the additive `mask`
    /// (in the queries' dtype, as SDPA wants) or top-left `causal`; query head h reads KV head
    /// h / (H / KV) (grouped-query attention, no repeated keys). Softmax accumulates in f32 inside the
    /// kernel whatever the dtype.
    fn sdpa(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
    ) -> Tensor {
        let mask = mask.map(|m| m.to_kind(q.kind()));
        Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            mask.as_ref(),
            0.0,
            causal,
            None,
            self.heads != self.kv_heads,
        )
    }

    /// [B, H, T, D] → [B, T, H·D], then `o_proj`.
    fn merge_heads(&self, out: Tensor) -> Tensor {
        let (b, _, t, _) = out.size4().expect("[B, H, T, D]");
        let out = out
            .transpose(1, 2)
            .contiguous()
            .view([b, t, self.heads * self.head_dim]);
        self.o_proj.forward(&out)
    }

    /// The explicit path (scores materialised, keys repeated per group): the fused one's reference.
    #[cfg(test)]
    fn attend_explicit(&self, q: &Tensor, k: Tensor, v: Tensor, mask: &Tensor) -> Tensor {
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
        // Scores and softmax in fp32 whatever the model's dtype.
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
    pub(crate) fn forward_documents(&self, x: &Tensor, rope: &Rope, docs: &Documents) -> Tensor {
        let (q, k, v) = self.project(x);
        let q = rope.apply_rows(&q, &docs.positions);
        let k = rope.apply_rows(&k, &docs.positions);
        self.attend_masked(&q, k, v, &docs.mask)
    }

    pub(crate) fn forward(
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
    pub(crate) fn forward_slot(
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
    pub(crate) fn forward_slots(
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
        // [B, H, 1, D] over [B, KV, longest, D], the rows' unused tail masked.
        let out = self.sdpa(&q, &kb, &vb, Some(&batch.mask), false);
        debug_assert_eq!(out.size()[0], b);
        self.merge_heads(out)
    }
}

/// The documents packed into training rows: each begins at a BOS and runs to the next one (ids before
/// a row's first BOS form a document of their own). A document attends only to itself and its positions
/// restart at 0, so a packed row computes what its documents compute alone (Megatron's
/// `reset_position_ids` + `reset_attention_mask`; `train.isolate_documents`).
#[derive(Debug)]
pub struct Documents {
    /// [B, T] int64: the position of each id within its document.
    pub(crate) positions: Tensor,
    /// [B, 1, T, T] f32: 0 where query t may read key s (same document, s ≤ t), −∞ elsewhere.
    pub(crate) mask: Tensor,
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
    pub(crate) slots: Tensor,
    pub(crate) positions: Tensor,
    pub(crate) longest: i64,
    pub(crate) mask: Tensor,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attention(heads: i64, kv_heads: i64) -> Attention {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = LlamaConfig {
            vocab_size: 16,
            num_new_tokens: 0,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: 32 / heads,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
        };
        tch::manual_seed(3);
        Attention::new(vs.root() / "attn", &cfg)
    }

    fn qkv(a: &Attention, b: i64, t: i64, s: i64) -> (Tensor, Tensor, Tensor) {
        let f = (Kind::Float, tch::Device::Cpu);
        (
            Tensor::randn([b, a.heads, t, a.head_dim], f),
            Tensor::randn([b, a.kv_heads, s, a.head_dim], f),
            Tensor::randn([b, a.kv_heads, s, a.head_dim], f),
        )
    }

    fn max_diff(x: &Tensor, y: &Tensor) -> f64 {
        (x - y).abs().max().double_value(&[])
    }

    /// Fused ≡ explicit (≤ 1e-5 in f32: only the summation order inside the kernel differs).
    #[test]
    fn fused_attention_equals_the_explicit_path() {
        for (heads, kv) in [(4, 4), (4, 2), (4, 1)] {
            let a = attention(heads, kv);
            // Causal, no cache.
            let (q, k, v) = qkv(&a, 2, 7, 7);
            let causal = Tensor::full([7, 7], f64::NEG_INFINITY, (Kind::Float, q.device())).triu(1);
            let d = max_diff(
                &a.attend(&q, k.shallow_clone(), v.shallow_clone(), 0),
                &a.attend_explicit(&q, k, v, &causal),
            );
            assert!(d <= 1e-5, "causal, {heads}/{kv} heads: {d}");
            // Several new queries after a cache, and one.
            for t in [3, 1] {
                let (q, k, v) = qkv(&a, 2, t, 9);
                let past = 9 - t;
                let mask = Tensor::full([t, 9], f64::NEG_INFINITY, (Kind::Float, q.device()))
                    .triu(past + 1);
                let d = max_diff(
                    &a.attend(&q, k.shallow_clone(), v.shallow_clone(), past),
                    &a.attend_explicit(&q, k, v, &mask),
                );
                assert!(d <= 1e-5, "cached, t = {t}, {heads}/{kv} heads: {d}");
            }
            // Packed documents: BOS = 1 starts each.
            let ids =
                Tensor::from_slice(&[1i64, 5, 6, 1, 7, 8, 9, 4, 1, 5, 5, 1, 2, 3]).view([2, 7]);
            let docs = Documents::from_ids(&ids, 1);
            let (q, k, v) = qkv(&a, 2, 7, 7);
            let d = max_diff(
                &a.attend_masked(&q, k.shallow_clone(), v.shallow_clone(), &docs.mask),
                &a.attend_explicit(&q, k, v, &docs.mask),
            );
            assert!(d <= 1e-5, "documents, {heads}/{kv} heads: {d}");
        }
    }
}
