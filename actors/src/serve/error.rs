//! The serving layer's two error types, after OpenAI's error object and text-generation-inference's
//! split: [`ServeError`] for a request refused before it runs (validation, authentication, admission),
//! each mapped to an HTTP status and a stable `error_type`; [`InferError`] for a request that fails while
//! it runs, carried in its event stream up to the HTTP layer.

use serde_json::{json, Value};

/// Why a request failed while it ran (sent in its stream; the HTTP layer maps it).
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum InferError {
    /// A worker's computation failed for this request (a full KV pool, a context out of range, …).
    #[error("{actor}: {message}")]
    Worker { actor: String, message: String },
    /// A worker's compute thread died; its supervisor failed every request in flight.
    #[error("actor {actor} failed ({error}); {}", if *restarting { "it is being rebuilt: retry shortly" } else { "the service is not ready until it is restarted" })]
    WorkerDied {
        actor: String,
        error: String,
        /// Its supervisor is rebuilding it (a retry soon will be served).
        #[serde(default)]
        restarting: bool,
    },
    /// The request ran past `serve.request_timeout_s`.
    #[error("the request ran past its timeout of {seconds} s")]
    Timeout { seconds: f64 },
    /// The engine stopped before the response was complete.
    #[error("the generation engine stopped before the response was complete")]
    EngineStopped,
}

impl InferError {
    /// The HTTP status of a non-streaming response that failed so.
    pub fn status(&self) -> u16 {
        match self {
            InferError::Timeout { .. } => 504,
            InferError::WorkerDied { .. } => 503,
            InferError::Worker { .. } | InferError::EngineStopped => 500,
        }
    }

    /// The OpenAI-style `error.type`, stable across versions.
    pub fn error_type(&self) -> &'static str {
        match self {
            InferError::Timeout { .. } => "timeout",
            InferError::Worker { .. }
            | InferError::WorkerDied { .. }
            | InferError::EngineStopped => "server_error",
        }
    }

    /// The OpenAI error object (`{"error": {...}}`), as sent in a stream or a response body.
    pub fn body(&self) -> Value {
        error_body(&self.to_string(), self.error_type(), None, self.status())
    }
}

/// Why a request was refused before it ran.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// A field of the request is wrong; `param` names it (`messages[0].content[1].image_url.url`).
    #[error("{param}: {message}")]
    Invalid { param: String, message: String },
    /// The body is not JSON at all.
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    /// The request names a model this server does not serve.
    #[error("model: `{requested}` is not served here; this server serves `{served}`")]
    UnknownModel { requested: String, served: String },
    #[error("missing or wrong bearer token (Authorization: Bearer <key>)")]
    Unauthorized,
    /// The admission queue is full (`serve.queue_capacity`).
    #[error("the admission queue is full ({capacity} waiting, serve.queue_capacity); retry later")]
    QueueFull { capacity: usize },
    /// The caller's key already has `serve.max_streams_per_key` requests in flight.
    #[error("this API key already has {limit} requests in flight (serve.max_streams_per_key); retry when one ends")]
    KeyBusy { limit: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A worker failed and the service is not ready.
    #[error("the service is not ready: {0}")]
    Unavailable(String),
    /// Something on the server's side (tokenising the prompt, a task that panicked).
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ServeError::Invalid {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ServeError::Invalid { .. } => 422,
            ServeError::NotJson(_) => 400,
            ServeError::UnknownModel { .. } => 404,
            ServeError::Unauthorized => 401,
            ServeError::QueueFull { .. } | ServeError::KeyBusy { .. } => 429,
            ServeError::ShuttingDown | ServeError::Unavailable(_) => 503,
            ServeError::Internal(_) => 500,
        }
    }

    /// The OpenAI-style `error.type`, stable across versions.
    pub fn error_type(&self) -> &'static str {
        match self {
            ServeError::Invalid { .. }
            | ServeError::NotJson(_)
            | ServeError::UnknownModel { .. } => "invalid_request_error",
            ServeError::Unauthorized => "authentication_error",
            ServeError::QueueFull { .. } | ServeError::KeyBusy { .. } => "rate_limit_error",
            ServeError::ShuttingDown | ServeError::Unavailable(_) | ServeError::Internal(_) => {
                "server_error"
            }
        }
    }

    /// The field the error is about.
    pub fn param(&self) -> Option<&str> {
        match self {
            ServeError::Invalid { param, .. } => Some(param),
            ServeError::UnknownModel { .. } => Some("model"),
            _ => None,
        }
    }

    /// The OpenAI error object (`{"error": {...}}`).
    pub fn body(&self) -> Value {
        error_body(
            &self.to_string(),
            self.error_type(),
            self.param(),
            self.status(),
        )
    }
}

fn error_body(message: &str, kind: &str, param: Option<&str>, code: u16) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}
