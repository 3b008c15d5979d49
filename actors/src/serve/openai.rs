//! The OpenAI chat-completions wire format: the request body's types and parsing (a JSON or shape error
//! names the field path), and the pieces of response and chunk bodies.
//!
//! Extensions (documented in the README):
//! - request: `top_k`, `repetition_penalty`, `scheduler`, `ddim_steps`, `guidance_scale`, `max_images`,
//!   `csr_score`,
//!   `num_beams` (beam search: deterministic, text only, the text sent whole when the search ends);
//!   region input: an image part's `image_url.mask`, a data URL of a PNG/JPEG the image's size whose
//!   bright pixels (luma > 127) mark the region (the paper's referring prompt shows the image whole,
//!   then again with its mask);
//! - response: generated images are content parts `{"type": "image_url", "image_url": {"url":
//!   "data:image/png;base64,…"}}` (in a stream, a chunk whose `delta.content` is a list of such parts);
//!   the consistency scores of input images are in a top-level `deem.input_images` field.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ServeError;
use super::events::CsrScore;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ddim_steps: Option<i64>,
    /// The sampling loop of drawn images: `ddim`, `ddpm` or `dpmsolver++` (default `serve.scheduler`).
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub max_images: Option<i64>,
    #[serde(default)]
    pub csr_score: Option<bool>,
    #[serde(default)]
    pub num_beams: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default)]
    pub detail: Option<String>,
    /// deem's region input: the region's mask as a data URL (bright pixels inside).
    #[serde(default)]
    pub mask: Option<String>,
}

/// Parses the body; a JSON or shape error names the field path (`messages[0].content`).
pub fn parse(body: &[u8]) -> Result<ChatRequest, ServeError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ServeError::NotJson(inner.to_string())
        } else {
            let param = if path == "." {
                "body".to_string()
            } else {
                path
            };
            ServeError::invalid(param, inner.to_string())
        }
    })
}

/// PNG bytes as a `data:image/png;base64,…` URL.
pub fn png_data_url(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

pub fn png_part(png: &[u8]) -> Value {
    json!({"type": "image_url", "image_url": {"url": png_data_url(png)}})
}

pub fn csr_field(scores: &[CsrScore]) -> Value {
    json!({"input_images": scores})
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
