//! The distributed engine, after PyTorch's `torch.distributed`: c10d itself (TCPStore, Gloo, NCCL) through
//! a small C++ bridge against the libtorch tch links ([`c10d`]), the torchrun / Slurm launch contract and
//! the rendezvous that forms the world ([`world`]), and the framed tensor messages pipeline edges send
//! across processes ([`wire`]). It is the bottom layer: it imports nothing else of this crate.

pub mod c10d;
pub mod liveness;
pub mod wire;
pub mod world;

pub use c10d::{Backend, Group, Pending, Store};
pub use world::{LaunchEnv, World};

/// Everything that can go wrong forming or using the world; each names the rank and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A c10d call failed (a C++ exception, a timeout, a peer gone).
    #[error("rank {rank}: {op}: {message}")]
    C10d {
        rank: i64,
        op: String,
        message: String,
    },
    /// A launch variable is missing or malformed.
    #[error("{var}={value:?}: {expected}")]
    Env {
        var: String,
        value: String,
        expected: String,
    },
    /// Some ranks never wrote their join key.
    #[error("rank {rank}: rank(s) {missing} of WORLD_SIZE={world} never joined the rendezvous at {addr} within {secs} s (are all {world} processes started, with the same MASTER_ADDR and MASTER_PORT?)")]
    NeverJoined {
        rank: i64,
        missing: String,
        world: i64,
        addr: String,
        secs: u64,
    },
    /// Processes of one world were started with different world sizes.
    #[error("rank {rank}: this process has WORLD_SIZE={ours} but rank {other} was started with WORLD_SIZE={theirs}")]
    WorldMismatch {
        rank: i64,
        ours: i64,
        other: i64,
        theirs: i64,
    },
    /// A header that cannot be encoded or decoded.
    #[error("message header: {problem}")]
    Header { problem: String },
    /// A message frame that does not decode, or is not the one expected.
    #[error("rank {rank}: message from rank {peer} on {edge}: {problem}")]
    Frame {
        rank: i64,
        peer: i64,
        edge: String,
        problem: String,
    },
}
