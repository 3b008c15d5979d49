//! Training, after PyTorch's AdamW and the paper's three stages: the optimizer and its schedules
//! (`optimizer.rs`), the single-process reference trainer and the weight plumbing both trainers share
//! (`trainer.rs`), and the pretraining of the tiny components that have no public checkpoint: a CLIP
//! encoder (`clip.rs`) and a Stable-Diffusion decoder (`sd.rs`).

pub mod clip;
pub mod optimizer;
pub mod sd;
pub mod trainer;

pub use optimizer::{
    group_of, is_base_llm, lr_factor, master_key, moment_keys, update_plan, AdamW, Group,
    LossScaler, Param, StepReport,
};
pub use trainer::{
    cpu_weights, load_shard, optimizer_in_dtype, save_shard, set_dtype, set_variables, Trainer,
};

/// The training layer's error: a trainer, an optimizer state or a pretraining run that cannot go on;
/// lower layers' errors chain in.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Llama(#[from] crate::models::llama::LlamaError),
    #[error(transparent)]
    Tensor(#[from] tch::TchError),
}

impl From<String> for TrainError {
    fn from(message: String) -> Self {
        TrainError::Invalid(message)
    }
}

impl From<&str> for TrainError {
    fn from(message: &str) -> Self {
        TrainError::Invalid(message.to_string())
    }
}
