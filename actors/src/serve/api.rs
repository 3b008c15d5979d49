//! The OpenAI chat-completions wire format: request parsing and validation (every error names its
//! field), the chat template, and the response / chunk bodies.
//!
//! Extensions (documented in the README):
//! - request: `top_k`, `repetition_penalty`, `ddim_steps`, `guidance_scale`, `max_images`, `csr_score`,
//!   `num_beams` (beam search: deterministic, text only, the text sent whole when the search ends);
//!   region input: an image part's `image_url.mask`, a data URL of a PNG/JPEG the image's size whose
//!   bright pixels (luma > 127) mark the region (the paper's referring prompt shows the image whole,
//!   then again with its mask);
//! - response: generated images are content parts `{"type": "image_url", "image_url": {"url":
//!   "data:image/png;base64,…"}}` (in a stream, a chunk whose `delta.content` is a list of such parts);
//!   the consistency scores of input images are in a top-level `deem.input_images` field.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use deem::config::DeemConfig;
use deem::sampling::SamplingParams;
use deem::tokenizer::DeemTokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use tch::Tensor;

use super::engine::{CsrScore, Request};

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

/// A request error: HTTP status, message and the offending field.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        ApiError {
            status: 422,
            kind: "invalid_request_error",
            message: format!("{param}: {}", message.into()),
            param: Some(param),
        }
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}})
    }
}

/// Parses the body; a JSON or shape error names the field path (`messages[0].content`).
pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(
                400,
                "invalid_request_error",
                format!("the body is not valid JSON: {inner}"),
            )
        } else {
            let param = if path == "." {
                "body".to_string()
            } else {
                path
            };
            ApiError::invalid(param, inner.to_string())
        }
    })
}

/// A decoded input image: a base64 `data:` URL of a PNG, JPEG, WebP or (first frame of a) GIF, the
/// formats OpenAI's API takes; `field` names it in errors.
pub fn decode_image(url: &str, field: &str, max_side: u32) -> Result<image::RgbImage, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid(
            field,
            "expected a data: URL (data:image/png;base64,…); the server fetches nothing",
        ));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::invalid(
            field,
            "a data: URL needs a comma before its data",
        ));
    };
    if !meta.ends_with(";base64") {
        return Err(ApiError::invalid(
            field,
            "expected base64 data (data:image/…;base64,…)",
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::invalid(field, format!("invalid base64: {e}")))?;
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(field, format!("cannot read the image: {e}")))?;
    let (w, h) = reader.into_dimensions().map_err(|e| {
        ApiError::invalid(
            field,
            format!("cannot decode the image (PNG, JPEG, WebP or GIF expected): {e}"),
        )
    })?;
    if w.max(h) > max_side || w == 0 || h == 0 {
        return Err(ApiError::invalid(
            field,
            format!(
                "the image is {w}×{h}; expected sides in 1..={max_side} (serve.max_image_side)"
            ),
        ));
    }
    let img = image::load_from_memory(&bytes).map_err(|e| {
        ApiError::invalid(
            field,
            format!("cannot decode the image (PNG, JPEG, WebP or GIF expected): {e}"),
        )
    })?;
    Ok(img.to_rgb8())
}

fn range_f(
    v: Option<f64>,
    field: &str,
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> Result<Option<f64>, ApiError> {
    match v {
        Some(x) if !x.is_finite() || x > hi || x < lo || (lo_open && x == lo) => {
            Err(ApiError::invalid(
                field,
                format!(
                    "expected a number in {}{lo}, {hi}], found {x}",
                    if lo_open { "(" } else { "[" }
                ),
            ))
        }
        other => Ok(other),
    }
}

/// Validates `r` and builds the engine request: the Vicuna chat template with the paper's system
/// prompt, every image as `<|startofimage|>` + its placeholders.
pub fn build(
    r: ChatRequest,
    cfg: &DeemConfig,
    tok: &DeemTokenizer,
    served: &str,
) -> Result<Request, ApiError> {
    let s = &cfg.serve;
    if let Some(m) = &r.model {
        if m != served {
            return Err(ApiError {
                status: 404,
                kind: "invalid_request_error",
                message: format!("model: `{m}` is not served here; this server serves `{served}`"),
                param: Some("model".into()),
            });
        }
    }
    if r.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "expected at least one message",
        ));
    }
    if let Some(n) = r.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("only n = 1 is supported, found {n}"),
            ));
        }
    }
    let max_tokens = match r.max_completion_tokens.or(r.max_tokens) {
        None => s.default_max_tokens,
        Some(n) if n >= 1 && n as usize <= s.max_tokens_limit => n as usize,
        Some(n) => {
            let field = if r.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(ApiError::invalid(
                field,
                format!(
                    "expected an integer in 1..={} (serve.max_tokens_limit), found {n}",
                    s.max_tokens_limit
                ),
            ));
        }
    };
    let temperature = range_f(r.temperature, "temperature", 0.0, 2.0, false)?.unwrap_or(1.0);
    let top_p = range_f(r.top_p, "top_p", 0.0, 1.0, true)?.unwrap_or(1.0);
    let repetition_penalty =
        range_f(r.repetition_penalty, "repetition_penalty", 0.0, 10.0, true)?.unwrap_or(1.0);
    let top_k = match r.top_k {
        None => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("expected an integer >= 0, found {k}"),
            ))
        }
    };
    let vocab = cfg.llm.vocab_size + cfg.llm.num_new_tokens;
    let mut logit_bias = Vec::new();
    for (k, v) in r.logit_bias.unwrap_or_default() {
        let field = format!("logit_bias.{k}");
        let id: i64 = k
            .parse()
            .map_err(|_| ApiError::invalid(&field, "expected a token id as the key"))?;
        if !(0..vocab).contains(&id) {
            return Err(ApiError::invalid(
                &field,
                format!("expected a token id in [0, {vocab})"),
            ));
        }
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::invalid(
                &field,
                format!("expected a bias in [-100, 100], found {v}"),
            ));
        }
        logit_bias.push((id, v));
    }
    let stop = match r.stop {
        None => vec![],
        Some(Stop::One(x)) => vec![x],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(|x| x.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "expected at most 4 non-empty strings",
        ));
    }
    let ddim_steps = match r.ddim_steps {
        None => s.ddim_steps,
        Some(n) if (1..=1000).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::invalid(
                "ddim_steps",
                format!("expected an integer in 1..=1000, found {n}"),
            ))
        }
    };
    let guidance =
        range_f(r.guidance_scale, "guidance_scale", 1.0, 50.0, false)?.unwrap_or(s.guidance_scale);
    let max_images = match r.max_images {
        None => s.max_images_per_response,
        Some(n) if n >= 0 && n as usize <= s.max_images_per_response => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "max_images",
                format!(
                    "expected an integer in 0..={} (serve.max_images_per_response), found {n}",
                    s.max_images_per_response
                ),
            ))
        }
    };
    let num_beams = match r.num_beams {
        None => 1,
        Some(n) if n >= 1 && n as usize <= s.max_running => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "num_beams",
                format!(
                    "expected an integer in 1..={} (serve.max_running: every beam holds a sequence slot), found {n}",
                    s.max_running
                ),
            ))
        }
    };

    // The prompt.
    let enc = |text: &str| -> Result<Vec<i64>, ApiError> {
        tok.encode(text, false)
            .map(|v| v.into_iter().map(i64::from).collect())
            .map_err(|e| ApiError::new(500, "server_error", e.to_string()))
    };
    let k = cfg.resampler.num_query_tokens as usize;
    let placeholder: Vec<i64> = tok
        .image_placeholder(k)
        .into_iter()
        .map(i64::from)
        .collect();
    let size = cfg.diffusion.image_size.max(cfg.vision.image_size) as u32;
    let mut ids = vec![cfg.llm.bos_token_id];
    let mut images: Vec<Tensor> = Vec::new();
    // Per image up to the last one with a mask: its region mask (`None`: the whole image).
    let mut masks: Vec<Option<Tensor>> = Vec::new();
    let system = r
        .messages
        .iter()
        .find(|m| m.role == "system")
        .map(|m| text_of(m, "system"))
        .transpose()?
        .unwrap_or_else(|| s.system_prompt.clone());
    ids.extend(enc(&system)?);
    for (i, m) in r.messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let prefix = match m.role.as_str() {
            "system" => continue,
            "user" => " USER: ",
            "assistant" => " ASSISTANT: ",
            other => {
                return Err(ApiError::invalid(
                    format!("{field}.role"),
                    format!("expected system, user or assistant, found `{other}`"),
                ))
            }
        };
        ids.extend(enc(prefix.trim_end())?);
        match &m.content {
            None if m.role == "assistant" => {}
            None => return Err(ApiError::invalid(format!("{field}.content"), "missing")),
            Some(Content::Text(t)) => ids.extend(enc(&format!(" {t}"))?),
            Some(Content::Parts(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    match p {
                        Part::Text { text } => ids.extend(enc(&format!(" {text}"))?),
                        Part::ImageUrl { image_url } => {
                            let f = format!("{field}.content[{j}].image_url.url");
                            if m.role != "user" {
                                return Err(ApiError::invalid(
                                    f,
                                    "only user messages may carry images",
                                ));
                            }
                            if images.len() >= s.max_images_per_request {
                                return Err(ApiError::invalid(
                                    f,
                                    format!(
                                        "more than {} images (serve.max_images_per_request)",
                                        s.max_images_per_request
                                    ),
                                ));
                            }
                            let img = decode_image(&image_url.url, &f, s.max_image_side)?;
                            if let Some(url) = &image_url.mask {
                                let f = format!("{field}.content[{j}].image_url.mask");
                                let m = decode_image(url, &f, s.max_image_side)?;
                                if m.dimensions() != img.dimensions() {
                                    let ((mw, mh), (w, h)) = (m.dimensions(), img.dimensions());
                                    return Err(ApiError::invalid(
                                        f,
                                        format!("the mask is {mw}×{mh}; its image is {w}×{h}"),
                                    ));
                                }
                                let inside: Vec<bool> = image::DynamicImage::ImageRgb8(m)
                                    .to_luma8()
                                    .pixels()
                                    .map(|p| p.0[0] > 127)
                                    .collect();
                                let (w, h) = img.dimensions();
                                while masks.len() < images.len() {
                                    masks.push(None);
                                }
                                masks.push(deem::region::unit_mask(&inside, w, h, size));
                            }
                            images.push(deem::vision::unit_pixels(&img, size));
                            ids.extend(&placeholder);
                        }
                    }
                }
            }
        }
        if m.role == "assistant" {
            ids.push(cfg.llm.eos_token_id);
        }
    }
    ids.extend(enc(" ASSISTANT:")?);
    let room = cfg.llm.max_position_embeddings as usize;
    if ids.len() + 1 > room {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the prompt is {} tokens (images count {k} each); the model's context is {room} (llm.max_position_embeddings)",
                ids.len()
            ),
        ));
    }
    Ok(Request {
        id: uuid::Uuid::new_v4(),
        prompt: ids,
        masks: (!masks.is_empty()).then(|| {
            let whole = deem::region::whole_image_masks(1, size as i64).get(0);
            let all: Vec<Tensor> = (0..images.len())
                .map(|i| match masks.get(i) {
                    Some(Some(m)) => m.shallow_clone(),
                    _ => whole.shallow_clone(),
                })
                .collect();
            Tensor::stack(&all, 0)
        }),
        images: (!images.is_empty()).then(|| Tensor::stack(&images, 0)),
        params: std::sync::Arc::new(SamplingParams {
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed: r.seed.unwrap_or_else(rand_seed),
            logit_bias,
        }),
        max_tokens,
        stop,
        ddim_steps,
        guidance,
        max_images,
        num_beams,
        csr_score: r.csr_score.unwrap_or(s.csr_score),
        arrived: Instant::now(),
        timeout: Duration::from_secs_f64(s.request_timeout_s),
        events: None,
    })
}

fn text_of(m: &Message, field: &str) -> Result<String, ApiError> {
    match &m.content {
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(p)) => p
            .iter()
            .map(|p| match p {
                Part::Text { text } => Ok(text.as_str()),
                Part::ImageUrl { .. } => Err(ApiError::invalid(
                    format!("{field} message"),
                    "expected text only",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(" ")),
        None => Ok(String::new()),
    }
}

fn rand_seed() -> u64 {
    let u = uuid::Uuid::new_v4();
    u.as_u64_pair().0
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
