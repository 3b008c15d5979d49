//! LLaMA / Vicuna decoder with HF `LlamaForCausalLM` parameter names (transformers
//! `models/llama/modeling_llama.py`): RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU
//! MLP, an explicit KV cache. A [`LlamaShard`] builds only layers `[a, b)`, plus the embedding when it is
//! the first shard and the final norm and heads when it is the last, so pipeline actors own slices.
//!
//! DEEM's additions live beside the HF names so a plain HF checkpoint loads unchanged: the rows of the
//! appended special tokens (`model.embed_tokens_new`), their head (`lm_head_new`, trainable while the
//! original `lm_head` stays frozen) and the learnable start-of-image vector (`model.soi_embedding`).

mod attention;
mod cache;
mod config;
mod layer;
mod rope;
mod shard;

pub use attention::{Documents, SlotBatch};
pub use cache::{KvCache, KvPool};
pub use config::{HfLlamaConfig, LlamaConfig, LlamaError};
pub use layer::RmsNorm;
pub use shard::{load_spec_of, LlamaShard};
