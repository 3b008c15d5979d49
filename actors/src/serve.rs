//! `deem serve`: the streaming generation service, split as a request travels (text-generation-inference's
//! router is the model): `http` (routes, bearer check, error → status) → `openai` (wire types, parsing)
//! → `validation` (into a `ValidRequest`, every error naming its field) → `admission` (the bounded queue:
//! where a request waits, the 429 path) → `scheduler` (sequence state machine, ticks, continuous
//! batching; `beam` for beam search) ⇄ `messages` ⇄ `workers` (the compute loops of vision, the LLM
//! shards and diffusion, each a runtime compute actor) → `events` → `sse` (chunks, keep-alive).
//! `engine` starts it all under a supervisor. Built on `runtime/`; imports nothing from `pipeline/` or
//! `cli/`.

pub mod admission;
pub mod beam;
pub mod engine;
pub mod error;
pub mod events;
pub mod http;
pub mod messages;
pub mod openai;
pub mod remote;
pub mod scheduler;
pub mod slot;
pub mod sse;
pub mod validation;
pub mod workers;

pub use engine::{Engine, Weights};
pub use error::{InferError, ServeError};
pub use events::{CsrScore, Event};
pub use http::{router, shutdown_signal, AppState, Service};
pub use validation::ValidRequest;
