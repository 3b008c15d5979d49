//! The actor pipeline runtime: DEEM training across devices. Separate actors own the vision encoder, the
//! LLM shards and the diffusion decoder; a driver runs a schedule (GPipe or 1F1B) over microbatches and a
//! synchronous optimizer step. Same seed, same data → the same losses and weights as
//! `deem::train::Trainer`.

pub mod checkpoint;
pub mod driver;
pub mod schedule;
pub mod stage;

pub use driver::PipelineTrainer;
