//! The runtime layer every other layer builds on, after ractor's supervision model: one compute actor
//! (a ractor actor in front of a named compute thread) used by every training stage and serving worker,
//! the supervisor that spawns them linked and owns the restart policy, the topology helpers that order
//! placements and split CPU threads, and observability (metrics, the HTTP endpoint, logging). It imports
//! nothing from `pipeline/`, `serve/` or `cli/`.

pub mod compute;
pub mod error;
pub mod http;
pub mod metrics;
pub mod supervisor;
pub mod telemetry;
pub mod topology;

pub use compute::{ComputeCtx, ComputeHandle, ComputeSpec, ComputeState, ComputeStatus, Work};
pub use error::RuntimeError;
pub use supervisor::{Failure, OnReport, Policy, Report, Restartable, Restarted, Supervisor};
