//! The pipeline layer's one error type (thiserror, as STYLE.md asks of every layer): starting stages,
//! running steps across them, and writing or reading their checkpoints. Every variant names the stage,
//! file or step it is about.

use std::path::PathBuf;

use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A compute actor could not be called, or its supervisor refused a restart.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A channel between two stages of this process closed.
    #[error("the channel closed (a neighbour stopped)")]
    ChannelClosed,
    /// A c10d call or the world failed (a peer gone, a timeout).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// The topology cannot be run as a pipeline.
    #[error("topology {origin}: {problem}")]
    Topology { origin: String, problem: String },
    /// The planner predicts that devices cannot hold their actors: one line per device.
    #[error("the placement does not fit: {}; deem plan prints the breakdown (add devices or shards, more microbatches, or train.recompute)", .0.join("; "))]
    DoesNotFit(Vec<String>),
    /// A stage's actor did not start (its modules could not be built, …).
    #[error("cannot start actor {actor}: {source}")]
    Start {
        actor: String,
        #[source]
        source: RuntimeError,
    },
    /// A stage's work failed: a channel closed, a message out of order, an input missing, a model error.
    #[error("{stage}: {message}")]
    Stage { stage: String, message: String },
    /// One or more stages failed during a step.
    #[error("step {step} failed: {failures}")]
    Step { step: u64, failures: String },
    /// The batch cannot be split into the configured microbatches.
    #[error(transparent)]
    Batch(#[from] deem::models::ModelError),
    /// A checkpoint directory or manifest is missing, unreadable or of another configuration.
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// A run directory without a checkpoint (its `latest` pointer cannot be read).
    #[error("{}: no checkpoint to resume from", path.display())]
    NoCheckpoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing a checkpoint failed (a full disk, an I/O error, another rank's failure): nothing of it
    /// was kept, and `kept` says which checkpoint is still the latest.
    #[error("writing checkpoint step-{step} into {} failed: {message}; its partial files were removed and {kept}", dir.display())]
    CheckpointWrite {
        step: u64,
        dir: PathBuf,
        message: String,
        kept: String,
    },
    /// Reading or writing a checkpoint file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl PipelineError {
    pub(crate) fn stage(stage: &str, message: impl Into<String>) -> Self {
        PipelineError::Stage {
            stage: stage.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| PipelineError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: &std::path::Path, message: impl Into<String>) -> Self {
        PipelineError::Checkpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
