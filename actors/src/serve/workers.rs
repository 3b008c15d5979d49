//! The generation workers: one runtime compute actor per topology entry (vision, each LLM shard,
//! diffusion), each reading its own input channel and answering the scheduler's inbox.

pub mod diffusion;
pub mod shard;
pub mod vision;

pub use diffusion::DiffusionWorker;
pub use shard::{ShardDetail, ShardWorker};
pub use vision::VisionWorker;
