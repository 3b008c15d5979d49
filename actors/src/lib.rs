//! deem-actors — the deem runtime: topologies that place the vision encoder, LLM shards and diffusion
//! decoder on devices, layered configuration, observability (tracing, Prometheus metrics, the HTTP
//! endpoint) and the `deem` command line. Model math lives in the `deem` crate, which never imports this.

pub mod bench_cmd;
pub mod cli;
pub mod data_cmd;
pub mod eval_cmd;
pub mod experiment;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod pretrain_cmd;
pub mod report;
pub mod serve;
pub mod settings;
pub mod telemetry;
pub mod topology;
pub mod train_cmd;
