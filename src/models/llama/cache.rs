//! The KV cache, after transformers' `DynamicCache`: one sequence's keys and values per layer, and a
//! pool of slots that serving's continuous batching gives each running sequence.

use tch::Tensor;

/// The KV cache of one shard for one batch of sequences: per layer `[B, kv_heads, T, head_dim]` keys and
/// values. Owned by whoever owns the sequences.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
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
    pub(crate) layers: Vec<(Tensor, Tensor)>,
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
