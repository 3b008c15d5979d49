//! The text tokenizer: a `tokenizer.json` (HF `tokenizers` format, as LLaMA/Vicuna checkpoints ship it)
//! with DEEM's six special tokens appended after the base vocabulary, so they take the ids
//! `vocab_size .. vocab_size + 6` that the LLM's new embedding rows and `lm_head_new` cover.

use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

/// DEEM's special tokens, in id order after the base vocabulary.
pub const SPECIAL_TOKENS: [&str; 6] = [
    "<|startofimage|>",
    "<|sniffer|>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load the tokenizer: {message}")]
    Load { path: String, message: String },
    #[error("{path}: {token} has id {found}, but the LLM expects it at {expected} (llm.vocab_size {vocab} + {index}); the tokenizer and the checkpoint disagree on the vocabulary")]
    SpecialId {
        path: String,
        token: &'static str,
        found: u32,
        expected: u32,
        vocab: u32,
        index: u32,
    },
    #[error("tokenizer: {0}")]
    Encode(String),
    /// Neither a tokenizer file nor one beside the checkpoint, and the built-in one does not fit.
    #[error("no tokenizer given (--tokenizer, or tokenizer.json beside the checkpoint) and the built-in tiny tokenizer does not fit: {0}")]
    NoneFits(Box<TokenizerError>),
}

/// The tiny model's tokenizer (built by `scripts/make_tiny_tokenizer.py`), used when neither an
/// explicit file nor the checkpoint's directory gives one.
pub const TINY_TOKENIZER: &str = include_str!("../../assets/tiny-tokenizer.json");

/// Finds the tokenizer of a model: `explicit`, else `tokenizer.json` beside the checkpoint (a directory
/// or a file), else the built-in tiny tokenizer (whose base vocabulary must match `llm.vocab_size`).
pub fn load_tokenizer(
    explicit: Option<&Path>,
    checkpoint: Option<&Path>,
    cfg: &crate::config::DeemConfig,
) -> Result<DeemTokenizer, TokenizerError> {
    let vocab = Some(cfg.llm.vocab_size as u32);
    let beside = checkpoint.map(|c| {
        if c.is_dir() {
            c.join("tokenizer.json")
        } else {
            c.with_file_name("tokenizer.json")
        }
    });
    if let Some(p) = explicit
        .map(|p| p.to_path_buf())
        .or(beside.filter(|p| p.exists()))
    {
        return DeemTokenizer::from_file(&p, vocab);
    }
    DeemTokenizer::from_bytes(
        TINY_TOKENIZER.as_bytes(),
        "the built-in tiny tokenizer",
        vocab,
    )
    .map_err(|e| TokenizerError::NoneFits(Box::new(e)))
}

/// A tokenizer with DEEM's special tokens at known ids.
pub struct DeemTokenizer {
    inner: Tokenizer,
    /// Size of the base vocabulary: the first special token's id.
    pub base_vocab: u32,
    special: [u32; 6],
}

impl DeemTokenizer {
    /// Loads `tokenizer.json`, appends the special tokens it lacks, and checks that they sit right after
    /// `vocab_size` (the LLM's base vocabulary; the tokenizer's own size when `None`).
    pub fn from_file(path: &Path, vocab_size: Option<u32>) -> Result<Self, TokenizerError> {
        let p = path.display().to_string();
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: p.clone(),
            message: e.to_string(),
        })?;
        Self::from_tokenizer(inner, p, vocab_size)
    }

    /// [`DeemTokenizer::from_file`] for the bytes of a `tokenizer.json`; `origin` names it in errors.
    pub fn from_bytes(
        json: &[u8],
        origin: &str,
        vocab_size: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_bytes(json).map_err(|e| TokenizerError::Load {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        Self::from_tokenizer(inner, origin.to_string(), vocab_size)
    }

    fn from_tokenizer(
        mut inner: Tokenizer,
        p: String,
        vocab_size: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let own = SPECIAL_TOKENS
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .min();
        let base =
            vocab_size.unwrap_or_else(|| own.unwrap_or_else(|| inner.get_vocab_size(true) as u32));
        let missing: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .filter(|t| inner.token_to_id(t).is_none())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&missing);
        let mut special = [0u32; 6];
        for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
            let found = inner.token_to_id(t).unwrap_or(u32::MAX);
            let expected = base + i as u32;
            if found != expected {
                return Err(TokenizerError::SpecialId {
                    path: p,
                    token: t,
                    found,
                    expected,
                    vocab: base,
                    index: i as u32,
                });
            }
            special[i] = found;
        }
        Ok(DeemTokenizer {
            inner,
            base_vocab: base,
            special,
        })
    }

    /// Token ids of `text`, with the tokenizer's own template (BOS for LLaMA) when `add_special`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn soi_id(&self) -> u32 {
        self.special[0]
    }

    pub fn sniffer_id(&self) -> u32 {
        self.special[1]
    }

    /// The ids of `<|startofimage|>`, `<|sniffer|>`, `<ref>`, `</ref>`, `<box>`, `</box>`.
    pub fn special_ids(&self) -> [u32; 6] {
        self.special
    }

    /// An image's place in the sequence: `<|startofimage|>` and `tokens_per_image` placeholders.
    pub fn image_placeholder(&self, tokens_per_image: usize) -> Vec<u32> {
        std::iter::once(self.soi_id())
            .chain(std::iter::repeat_n(self.sniffer_id(), tokens_per_image))
            .collect()
    }
}
