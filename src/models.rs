//! The model library's layers, after the reference implementations each one follows (`../shared/
//! REFERENCE.md`): the LLaMA decoder (transformers), the ConvNeXt encoder (open_clip), the Perceiver
//! Resampler, the region extractor, the Stable-Diffusion UNet and VAE (diffusers), and their DEEM
//! composition (`deem.rs`) with its losses (`losses.rs`).

pub mod deem;
pub mod diffusion;
pub mod llama;
pub mod losses;
pub mod pretrained;
pub mod region;
pub mod resampler;
pub mod vision;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Llama(#[from] llama::LlamaError),
    #[error("batch: {0}")]
    Sequence(#[from] crate::text::sequence::SequenceError),
    #[error("batch: {0}")]
    Batch(String),
    /// A config file, an image or a tensor that is not as expected; the message names it.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tensor(#[from] tch::TchError),
}

impl From<String> for ModelError {
    fn from(message: String) -> Self {
        ModelError::Invalid(message)
    }
}

impl From<&str> for ModelError {
    fn from(message: &str) -> Self {
        ModelError::Invalid(message.to_string())
    }
}
