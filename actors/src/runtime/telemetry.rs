//! Logging through `tracing`: an env filter (`DEEM_LOG`, default `info`) and text or JSON lines on stderr,
//! so stdout stays for command output.

use tracing_subscriber::EnvFilter;

use super::error::RuntimeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `filter` uses `EnvFilter` syntax (`info`, `deem_actors=debug,warn`).
pub fn init(filter: &str, format: LogFormat) -> Result<(), RuntimeError> {
    let filter = EnvFilter::try_new(filter).map_err(|e| {
        RuntimeError::Logging(format!(
            "--log {filter:?}: expected a tracing filter such as `info` or `deem_actors=debug`: {e}"
        ))
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| RuntimeError::Logging(format!("cannot install the log subscriber: {e}")))
}
