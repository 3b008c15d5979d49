//! Text, after the HF tokenizers and transformers' generation utilities: the tokenizer with DEEM's
//! special tokens, interleaved sequences (text with image placeholders), and sampling and beam search.

pub mod sampling;
pub mod sequence;
pub mod tokenizer;
