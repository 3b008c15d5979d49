//! What a request's stream carries, in order, after the OpenAI stream's shape: the input images'
//! consistency scores, text as it is sampled, each image the model draws, and the end — or an
//! [`InferError`] in its place. Up to the HTTP layer the stream is
//! `impl Stream<Item = Result<Event, InferError>>`.

use super::error::InferError;

/// One input image's consistency score.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CsrScore {
    pub index: usize,
    pub csr_loss: f64,
    /// Above `serve.ood_threshold` (absent when no threshold is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_of_distribution: Option<bool>,
}

/// One item of a request's stream.
#[derive(Debug)]
pub enum Event {
    Csr(Vec<CsrScore>),
    Text(String),
    Image(Vec<u8>),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// The receiving end of a request's stream.
pub type Events = flume::Receiver<Result<Event, InferError>>;
