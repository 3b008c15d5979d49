//! The actor pipeline, after GPipe and 1F1B: DEEM training across devices. Separate compute actors own
//! the vision encoder, the LLM shards and the diffusion decoder; a driver runs a schedule (GPipe or 1F1B)
//! over microbatches and a synchronous optimizer step. Same seed, same data → the same losses and weights
//! as `deem::train::Trainer`. Built on `runtime/` (compute actors, their supervisor); imports nothing
//! from `serve/` or `cli/`.

pub mod checkpoint;
pub mod costs;
pub mod distributed;
pub mod driver;
pub mod edge;
pub mod error;
pub mod forward;
pub mod modules;
pub mod plan;
pub mod schedule;
pub mod stage;

pub use driver::PipelineTrainer;
pub use error::PipelineError;
