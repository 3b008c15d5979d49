//! deem-actors — the deem runtime, after DESIGN.md's layering: `dist/` (c10d: the store, process groups,
//! the launch contract; it imports nothing else here), `runtime/` (the supervised compute actor,
//! topologies, metrics, the observability endpoint), `pipeline/` (training across actors), `serve/` (the
//! generation service, split as a request travels) and `cli/` (the `deem` commands, the only layer that
//! imports both pipeline and serve). Model math lives in the `deem` crate, which never imports this.

pub mod cli;
pub mod dist;
pub mod pipeline;
pub mod runtime;
pub mod serve;
pub mod settings;
