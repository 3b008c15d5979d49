//! A pipeline shard of the LLaMA decoder, after transformers' `LlamaForCausalLM` parameter names: layers
//! `[a, b)`, plus the embedding on the first shard and the final norm and heads on the last.

use std::ops::Range;

use tch::nn::{self, Module};
use tch::Tensor;

use super::attention::{Documents, SlotBatch};
use super::cache::{KvCache, KvPool};
use super::config::{LlamaConfig, LlamaError};
use super::layer::{DecoderLayer, RmsNorm};
use super::rope::Rope;

/// Embedding rows: the base vocabulary (HF `model.embed_tokens`) and DEEM's appended tokens.
#[derive(Debug)]
pub(crate) struct Embedding {
    pub(crate) base: Tensor,
    pub(crate) new: Option<Tensor>,
    pub(crate) soi: Tensor,
}

/// LLaMA layers `[start, end)`, with the embedding if `start == 0` and norm + heads if `end == layers`.
#[derive(Debug)]
pub struct LlamaShard {
    pub cfg: LlamaConfig,
    pub range: Range<i64>,
    pub(crate) embed: Option<Embedding>,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: Option<RmsNorm>,
    pub(crate) lm_head: Option<Tensor>,
    pub(crate) lm_head_new: Option<Tensor>,
    pub(crate) rope: Rope,
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
        // Each part draws from its own seed (`crate::init_part`): any shard builds the values the whole
        // model has.
        let embed = (range.start == 0).then(|| {
            crate::init_part("llm.embed");
            Embedding {
                base: (&model / "embed_tokens").var("weight", &[v, h], init),
                new: (n > 0).then(|| (&model / "embed_tokens_new").var("weight", &[n, h], init)),
                soi: model.zeros("soi_embedding", &[h]),
            }
        });
        let layers = range
            .clone()
            .map(|i| {
                crate::init_part(&format!("llm.layers.{i}"));
                DecoderLayer::new(&model / "layers" / i, cfg)
            })
            .collect();
        let last = range.end == cfg.num_hidden_layers;
        if last {
            crate::init_part("llm.head");
        }
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
        self.forward_span(hidden, 0..self.layers.len(), Some(docs))
    }

    /// Training forward of the shard's layers `span` (indices within the shard) from position 0: each
    /// document of `docs` isolated, or one causal sequence per row without. The whole shard's forward
    /// is the composition of its spans (per-layer activation recomputation runs them separately).
    pub fn forward_span(
        &self,
        hidden: &Tensor,
        span: Range<usize>,
        docs: Option<&Documents>,
    ) -> Tensor {
        let mut h = hidden.shallow_clone();
        for layer in &self.layers[span] {
            h = match docs {
                Some(d) => layer.forward(&h, |a, x| a.forward_documents(x, &self.rope, d)),
                None => layer.forward(&h, |a, x| a.forward(x, &self.rope, 0, None)),
            };
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

    /// Checkpoint loading rules for this shard ([`load_spec_of`] for its layers).
    pub fn load_spec(&self) -> crate::checkpoint::LoadSpec {
        load_spec_of(self.cfg.num_hidden_layers, self.range.clone())
    }
}

/// Checkpoint loading rules for the shard of layers `range` out of `num_layers`, over HF names (the
/// module's own; other checkpoints' names are mapped onto them by [`crate::models::pretrained`]): other
/// shards' layers and HF buffers are skipped, and DEEM's additions may be absent from a plain HF
/// checkpoint.
pub fn load_spec_of(num_layers: i64, range: std::ops::Range<i64>) -> crate::checkpoint::LoadSpec {
    let (is_first, is_last) = (range.start == 0, range.end == num_layers);
    let mut ignore: Vec<String> = (0..num_layers)
        .filter(|i| !range.contains(i))
        .map(|i| format!("model.layers.{i}."))
        .collect();
    ignore.push("model.rotary_emb.".into());
    if !is_first {
        ignore.extend(["model.embed_tokens".into(), "model.soi_embedding".into()]);
    }
    if !is_last {
        ignore.extend(["model.norm.".into(), "lm_head".into()]);
    }
    crate::checkpoint::LoadSpec {
        component: format!("llm shard [{}, {})", range.start, range.end),
        namespace: vec!["model.".into(), "lm_head".into()],
        ignore,
        optional: vec![
            "model.embed_tokens_new.".into(),
            "lm_head_new.".into(),
            "model.soi_embedding".into(),
        ],
    }
}
