//! Data, after the formats DEEM's datasets ship in (image-text pairs and tar shards, MMC4, LLaVA, COCO
//! regions): their readers, the synthetic world and its writer, the mixer that turns records into
//! training sequences, and the built-in batch source the tests train on.

pub mod batches;
pub mod decode;
pub mod mixer;
pub mod readers;
pub mod stream;
pub mod synth;
pub mod world;

/// The data layer's error: a dataset file, record, mask or synthetic-world write that failed; every
/// message names the file (and line, entry or member) and what was expected there.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tokenizer(#[from] crate::text::tokenizer::TokenizerError),
}

impl From<String> for DataError {
    fn from(message: String) -> Self {
        DataError::Invalid(message)
    }
}

impl From<&str> for DataError {
    fn from(message: &str) -> Self {
        DataError::Invalid(message.to_string())
    }
}
