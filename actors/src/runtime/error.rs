//! The runtime layer's one error type (thiserror, as STYLE.md asks of every layer): what can go wrong
//! spawning, calling and supervising compute actors.

/// Errors of compute actors and their supervisor; each names the actor.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The work could not be built on its compute thread (modules, weights).
    #[error("actor {actor}: {message}")]
    Build { actor: String, message: String },
    /// The compute thread ended (a panic, or its loop returned) while it was being built.
    #[error("actor {actor}: the compute thread died while building")]
    DiedBuilding { actor: String },
    /// The OS refused the compute thread.
    #[error("actor {actor}: cannot start its compute thread: {source}")]
    Thread {
        actor: String,
        #[source]
        source: std::io::Error,
    },
    /// ractor refused to spawn the actor.
    #[error("actor {actor}: cannot spawn: {message}")]
    Spawn { actor: String, message: String },
    /// A message to the actor, or its reply, was lost: the actor or its compute thread has stopped.
    #[error("actor {actor}: {message}")]
    Call { actor: String, message: String },
    /// The work ran and reported a failure.
    #[error("actor {actor}: {message}")]
    Work { actor: String, message: String },
    /// The supervisor's restart budget is spent.
    #[error("{failed}; not restarting: all {max} restarts allowed (train.max_restarts) are used")]
    RestartsExhausted { max: u32, failed: String },
    /// The log filter or subscriber could not be set up.
    #[error("{0}")]
    Logging(String),
    /// The supervisor itself is gone.
    #[error("the supervisor has stopped: {0}")]
    Supervisor(String),
}
