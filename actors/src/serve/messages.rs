//! The messages between the scheduler and the generation workers, after text-generation-inference's
//! router ⇄ shard protocol: decode ticks down the LLM shards (`ShardIn`), jobs for the vision and
//! diffusion workers, and every result back in the scheduler's `Inbox` — a worker's failure included,
//! from its supervisor. Every message serializes (serde; tensors as slots, [`super::slot`]), so a
//! worker can sit in another process.

use std::sync::Arc;

use deem::text::sampling::SamplingParams;
use flume::Sender;
use serde::{Deserialize, Serialize};
use tch::Tensor;
use uuid::Uuid;

use crate::runtime::{Failure, Restarted};
use crate::serve::error::InferError;
use crate::serve::slot;

/// How the next token of a row is drawn (last shard).
#[derive(Serialize, Deserialize)]
pub struct SampleSpec {
    pub params: Arc<SamplingParams>,
    /// Ids in the context, for the repetition penalty.
    pub seen: Vec<i64>,
    /// Ids that may not be sampled.
    pub banned: Vec<i64>,
    /// Index of the token in the response (keys the random draw).
    pub index: u64,
    /// Beam search: instead of drawing, return this many most likely ids with their log-probabilities
    /// (0 = draw).
    pub beam: usize,
}

/// One sequence's part of a decode tick.
#[derive(Serialize, Deserialize)]
pub struct RowMeta {
    pub seq: Uuid,
    /// Position of the row's first input (the sequence's cached length).
    pub start: i64,
    pub sample: Option<SampleSpec>,
    /// Return the NIP context: the last shard's hidden states from this position to the row's last,
    /// nearest first (the row feeds `<|startofimage|>`).
    pub context_from: Option<i64>,
}

/// What the first shard embeds for a row.
#[derive(Serialize, Deserialize)]
pub enum RowInput {
    /// Token ids, with the visual tokens [N, K, L] of the images whose placeholders they hold.
    Ids {
        ids: Vec<i64>,
        #[serde(with = "slot::opt")]
        visual: Option<Tensor>,
    },
    /// Ready embeddings [T, L]: the visual tokens of an image the model just drew.
    Embeds(#[serde(with = "slot::one")] Tensor),
}

#[derive(Serialize, Deserialize)]
pub enum ShardIn {
    Tick {
        group: usize,
        /// The scheduler's epoch when it sent the tick (a worker failure starts a new one).
        epoch: u64,
        rows: Vec<RowMeta>,
        /// First shard only.
        inputs: Vec<RowInput>,
        /// Later shards: the rows' hidden states.
        hidden: Hidden,
        /// An earlier shard failed this tick; pass it on.
        error: Option<InferError>,
    },
    /// Drop these sequences' caches (passed down the pipeline, after any tick that used them).
    Free(Vec<Uuid>),
    /// Copy each `(from, to)`: `to` starts with `from`'s cache (a beam hypothesis forking; passed down
    /// the pipeline before the next tick).
    Fork(Vec<(Uuid, Uuid)>),
}

/// A tick's hidden states between shards: the single-token rows as one batch, the others one by one.
#[derive(Default, Serialize, Deserialize)]
pub struct Hidden {
    /// Row indices of the batched rows, and their states [B, 1, L].
    #[serde(with = "slot::batch")]
    pub batch: Option<(Vec<usize>, Tensor)>,
    /// The other rows' states [1, T, L], by row index.
    #[serde(with = "slot::rows")]
    pub rows: Vec<(usize, Tensor)>,
}

#[derive(Serialize, Deserialize)]
pub struct RowOut {
    pub seq: Uuid,
    pub token: Option<i64>,
    /// Beam rows: the most likely next ids with their log-probabilities, best first.
    pub top: Vec<(i64, f64)>,
    #[serde(with = "slot::opt")]
    pub context: Option<Tensor>,
}

/// Results coming back to the scheduler.
#[derive(Serialize, Deserialize)]
pub enum Inbox {
    Tick {
        group: usize,
        epoch: u64,
        out: Result<Vec<RowOut>, InferError>,
    },
    Encoded {
        seq: Uuid,
        generated: bool,
        /// Visual tokens [N, K, L] and CSR conditions [N, Q, C].
        #[serde(with = "slot::pair")]
        out: Result<(Tensor, Tensor), InferError>,
    },
    Drawn {
        seq: Uuid,
        /// Pixels [3, H, W] in [0, 1] and their PNG.
        #[serde(with = "slot::image")]
        out: Result<(Tensor, Vec<u8>), InferError>,
    },
    Scored {
        seq: Uuid,
        out: Result<Vec<f64>, InferError>,
    },
    /// A worker's compute thread died (from its supervisor): every request in flight fails.
    WorkerFailed(Failure),
    /// The supervisor rebuilt a failed worker in place: admission resumes once none is down.
    WorkerRestarted(Restarted),
}

#[derive(Serialize, Deserialize)]
pub struct VisionJob {
    pub seq: Uuid,
    /// [N, 3, H, W] in [0, 1].
    #[serde(with = "slot::one")]
    pub pixels: Tensor,
    /// Region input: [N, 1, H, W] in [0, 1] (see [`deem::models::deem::Batch::masks`]).
    #[serde(with = "slot::opt")]
    pub masks: Option<Tensor>,
    pub generated: bool,
}

#[derive(Serialize, Deserialize)]
pub enum DiffusionJob {
    Draw {
        seq: Uuid,
        /// NIP context [N, L], nearest position first.
        #[serde(with = "slot::one")]
        context: Tensor,
        steps: i64,
        sampler: deem::config::SamplerKind,
        guidance: f64,
        seed: u64,
        /// The image's index in its response (keys the initial noise).
        image: u64,
    },
    Score {
        seq: Uuid,
        #[serde(with = "slot::one")]
        cond: Tensor,
        #[serde(with = "slot::one")]
        pixels: Tensor,
        #[serde(with = "slot::opt")]
        masks: Option<Tensor>,
        timesteps: Vec<i64>,
    },
}

#[derive(Clone)]
pub enum ShardNext {
    Shard(Sender<ShardIn>),
    Scheduler(Sender<Inbox>),
}
