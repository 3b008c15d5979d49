//! The response bodies, after OpenAI's chat-completions stream: a request's event stream becomes an SSE
//! stream of `chat.completion.chunk` objects (role chunk, text and image chunks as they come, the finish
//! chunk, the usage chunk when asked for, `[DONE]`; a failure becomes an `error` object before `[DONE]`),
//! or one `chat.completion` body. Keep-alive comments hold idle connections open through proxies.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};

use super::error::InferError;
use super::events::Event;
use super::openai;

/// How often an idle stream sends an SSE comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What every chunk of one response shares.
#[derive(Clone)]
pub struct ChunkHead {
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl ChunkHead {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]
        })
    }
}

fn sse(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn done() -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data("[DONE]"))
}

/// The SSE chunks of one item of the event stream.
fn chunks_of(
    head: &ChunkHead,
    include_usage: bool,
    item: Result<Event, InferError>,
) -> Vec<Result<SseEvent, Infallible>> {
    let mut out = Vec::new();
    match item {
        Ok(Event::Text(t)) => out.push(sse(&head.chunk(json!({"content": t}), None))),
        Ok(Event::Image(png)) => out.push(sse(
            &head.chunk(json!({"content": [openai::png_part(&png)]}), None)
        )),
        Ok(Event::Csr(scores)) => {
            let mut c = head.chunk(json!({}), None);
            c["deem"] = openai::csr_field(&scores);
            out.push(sse(&c));
        }
        Ok(Event::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
        }) => {
            out.push(sse(&head.chunk(json!({}), Some(finish_reason))));
            if include_usage {
                out.push(sse(&json!({
                    "id": head.id, "object": "chat.completion.chunk", "created": head.created,
                    "model": head.model, "choices": [],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
                })));
            }
            out.push(done());
        }
        Err(e) => {
            out.push(sse(&e.body()));
            out.push(done());
        }
    }
    out
}

/// The streaming response.
pub fn stream_response(
    head: ChunkHead,
    include_usage: bool,
    events: impl Stream<Item = Result<Event, InferError>> + Send + 'static,
) -> Response {
    let first = futures_util::stream::iter(vec![sse(
        &head.chunk(json!({"role": "assistant", "content": ""}), None)
    )]);
    let rest = events
        .flat_map(move |item| futures_util::stream::iter(chunks_of(&head, include_usage, item)));
    let mut r = Sse::new(first.chain(rest))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// The non-streaming response: the whole completion once the stream ends.
pub async fn complete_response(
    head: ChunkHead,
    mut events: impl Stream<Item = Result<Event, InferError>> + Unpin,
) -> Result<Value, InferError> {
    let mut parts: Vec<Value> = Vec::new();
    let mut text = String::new();
    let mut csr = None;
    let mut has_image = false;
    while let Some(item) = events.next().await {
        match item? {
            Event::Text(t) => text.push_str(&t),
            Event::Image(png) => {
                if !text.is_empty() {
                    parts.push(json!({"type": "text", "text": std::mem::take(&mut text)}));
                }
                parts.push(openai::png_part(&png));
                has_image = true;
            }
            Event::Csr(s) => csr = Some(s),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let content = if has_image {
                    if !text.is_empty() {
                        parts.push(json!({"type": "text", "text": text}));
                    }
                    Value::Array(parts)
                } else {
                    Value::String(text)
                };
                let mut body = json!({
                    "id": head.id, "object": "chat.completion", "created": head.created, "model": head.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": finish_reason, "logprobs": null}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
                });
                if let Some(s) = csr {
                    body["deem"] = openai::csr_field(&s);
                }
                return Ok(body);
            }
        }
    }
    Err(InferError::EngineStopped)
}

/// A JSON body with its status.
pub fn json_response(status: u16, body: Value) -> Response {
    let status = axum::http::StatusCode::from_u16(status)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}
