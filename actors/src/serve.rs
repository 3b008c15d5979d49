//! `deem serve`: the streaming generation service. An axum server in front of the [`engine::Engine`]:
//! `POST /v1/chat/completions` (OpenAI format, SSE when `stream: true`), `GET /v1/models`, `/health`,
//! `/ready`, `/metrics`, and the playground page at `/`.

pub mod api;
pub mod engine;
pub mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deem::config::DeemConfig;
use deem::tokenizer::DeemTokenizer;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::metrics::{Metrics, RequestLabels};
use api::ApiError;
use engine::{Engine, Event, Rejected};

/// The tiny model's tokenizer (built by `scripts/make_tiny_tokenizer.py`), used when neither
/// `--tokenizer` nor the checkpoint directory gives one.
pub const TINY_TOKENIZER: &str = include_str!("../../assets/tiny-tokenizer.json");

const PLAYGROUND: &str = include_str!("serve/playground.html");

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub cfg: Arc<DeemConfig>,
    pub tokenizer: Arc<DeemTokenizer>,
    pub model: String,
    pub api_key: Option<String>,
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

fn count(m: &Metrics, status: &str) {
    m.serve
        .requests
        .get_or_create(&RequestLabels {
            status: status.to_string(),
        })
        .inc();
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

fn authorized(st: &AppState, headers: &HeaderMap) -> bool {
    let Some(key) = &st.api_key else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given.trim() == key)
}

fn unauthorized() -> Response {
    let e = ApiError::new(
        401,
        "authentication_error",
        "missing or wrong bearer token (Authorization: Bearer <key>)",
    );
    let mut r = error_response(&e);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn chat(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&st, &headers) {
        count(&st.metrics, "unauthorized");
        return unauthorized();
    }
    if !st.ready.load(Ordering::SeqCst) {
        return error_response(&ApiError::new(
            503,
            "server_error",
            "the server is shutting down",
        ));
    }
    let parsed = {
        let st = st.clone();
        tokio::task::spawn_blocking(move || {
            let r = api::parse(&body)?;
            let stream = r.stream;
            let usage = r.stream_options.as_ref().is_some_and(|o| o.include_usage);
            api::build(r, &st.cfg, &st.tokenizer, &st.model).map(|req| (req, stream, usage))
        })
        .await
    };
    let (req, stream, include_usage) = match parsed {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            count(&st.metrics, "invalid");
            return error_response(&e);
        }
        Err(e) => {
            return error_response(&ApiError::new(500, "server_error", e.to_string()));
        }
    };
    let prompt_len = req.prompt.len();
    let events = match st.engine.submit(req) {
        Ok(rx) => rx,
        Err(Rejected::QueueFull) => {
            count(&st.metrics, "rejected");
            let mut r = error_response(&ApiError::new(
                429,
                "rate_limit_error",
                format!(
                    "the admission queue is full ({} waiting, serve.queue_capacity); retry later",
                    st.cfg.serve.queue_capacity
                ),
            ));
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Err(Rejected::ShuttingDown) => {
            return error_response(&ApiError::new(
                503,
                "server_error",
                "the server is shutting down",
            ))
        }
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = api::now_unix();
    if stream {
        stream_response(st.model.clone(), id, created, include_usage, events).into_response()
    } else {
        complete_response(&st.model, id, created, prompt_len, events).await
    }
}

fn chunk(id: &str, model: &str, created: u64, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]
    })
}

fn sse(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// The SSE stream: a role chunk, then text and image chunks as they come, a finish chunk, the usage
/// chunk when asked for, and `[DONE]`. A failure becomes an `error` payload before `[DONE]`.
fn stream_response(
    model: String,
    id: String,
    created: u64,
    include_usage: bool,
    events: flume::Receiver<Event>,
) -> impl IntoResponse {
    let first = futures_util::stream::iter(vec![sse(&chunk(
        &id,
        &model,
        created,
        json!({"role": "assistant", "content": ""}),
        None,
    ))]);
    let rest = events.into_stream().flat_map(move |ev| {
        let mut out = Vec::new();
        match ev {
            Event::Text(t) => out.push(sse(&chunk(&id, &model, created, json!({"content": t}), None))),
            Event::Image(png) => out.push(sse(&chunk(
                &id,
                &model,
                created,
                json!({"content": [api::png_part(&png)]}),
                None,
            ))),
            Event::Csr(scores) => {
                let mut c = chunk(&id, &model, created, json!({}), None);
                c["deem"] = api::csr_field(&scores);
                out.push(sse(&c));
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                out.push(sse(&chunk(&id, &model, created, json!({}), Some(finish_reason))));
                if include_usage {
                    out.push(sse(&json!({
                        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}
                    })));
                }
                out.push(Ok(SseEvent::default().data("[DONE]")));
            }
            Event::Error { timeout, message } => {
                let kind = if timeout { "timeout" } else { "server_error" };
                let code = if timeout { 504 } else { 500 };
                out.push(sse(&json!({"error": {"message": message, "type": kind, "param": null, "code": code}})));
                out.push(Ok(SseEvent::default().data("[DONE]")));
            }
        }
        futures_util::stream::iter(out)
    });
    let mut r = Sse::new(first.chain(rest)).into_response();
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

async fn complete_response(
    model: &str,
    id: String,
    created: u64,
    prompt_len: usize,
    events: flume::Receiver<Event>,
) -> Response {
    let mut parts: Vec<Value> = Vec::new();
    let mut text = String::new();
    let mut csr = None;
    let mut has_image = false;
    while let Ok(ev) = events.recv_async().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Image(png) => {
                if !text.is_empty() {
                    parts.push(json!({"type": "text", "text": std::mem::take(&mut text)}));
                }
                parts.push(api::png_part(&png));
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
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": finish_reason, "logprobs": null}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
                });
                if let Some(s) = csr {
                    body["deem"] = api::csr_field(&s);
                }
                return Json(body).into_response();
            }
            Event::Error { timeout, message } => {
                let (status, kind) = if timeout {
                    (504, "timeout")
                } else {
                    (500, "server_error")
                };
                return error_response(&ApiError::new(status, kind, message));
            }
        }
    }
    let _ = prompt_len;
    error_response(&ApiError::new(
        500,
        "server_error",
        "the generation engine stopped before the response was complete",
    ))
}

async fn models(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if !authorized(&st, &headers) {
        return unauthorized();
    }
    Json(json!({"object": "list", "data": [{
        "id": st.model, "object": "model", "created": 0, "owned_by": "deem",
        "max_model_len": st.cfg.llm.max_position_embeddings
    }]}))
    .into_response()
}

async fn ready(State(st): State<AppState>) -> Response {
    if !st.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    let actors = st.engine.status().await;
    let stopped: Vec<&str> = actors
        .iter()
        .filter(|a| a.device == "stopped")
        .map(|a| a.name.as_str())
        .collect();
    if stopped.is_empty() {
        Json(json!({"status": "ready", "model": st.model, "actors": actors})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "actors stopped", "stopped": stopped})),
        )
            .into_response()
    }
}

async fn playground() -> Html<&'static str> {
    Html(PLAYGROUND)
}

/// Every route of the service, with `/metrics`, `/health` and request counting.
pub fn router(st: AppState) -> Router {
    let limit = st.cfg.serve.max_body_bytes;
    let metrics = st.metrics.clone();
    let routes = Router::new()
        .route("/", get(playground))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/ready", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(st);
    crate::http::instrument(routes, metrics)
}

/// Loads the tokenizer: `explicit`, else `tokenizer.json` beside the checkpoint, else the built-in
/// tiny tokenizer (whose base vocabulary must match `llm.vocab_size`).
pub fn load_tokenizer(
    explicit: Option<&std::path::Path>,
    checkpoint: Option<&std::path::Path>,
    cfg: &DeemConfig,
) -> anyhow::Result<DeemTokenizer> {
    let vocab = Some(cfg.llm.vocab_size as u32);
    let beside = checkpoint.map(|c| {
        if c.is_dir() {
            c.join("tokenizer.json")
        } else {
            c.with_file_name("tokenizer.json")
        }
    });
    if let Some(p) = explicit
        .map(|p| p.to_path_buf())
        .or(beside.filter(|p| p.exists()))
    {
        return Ok(DeemTokenizer::from_file(&p, vocab)?);
    }
    DeemTokenizer::from_bytes(TINY_TOKENIZER.as_bytes(), "the built-in tiny tokenizer", vocab).map_err(|e| {
        anyhow::anyhow!(
            "no tokenizer given (--tokenizer, or tokenizer.json beside the checkpoint) and the built-in tiny tokenizer does not fit: {e}"
        )
    })
}

/// A started service: the engine and the HTTP server on `addr`.
pub struct Service {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Service {
    /// Starts the actors and binds `addr` (port 0 picks one).
    pub async fn start(
        addr: SocketAddr,
        cfg: DeemConfig,
        topo: &crate::topology::Topology,
        weights: &engine::Weights,
        tokenizer: DeemTokenizer,
        api_key: Option<String>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let tokenizer = Arc::new(tokenizer);
        let engine = Engine::start(&cfg, topo, weights, tokenizer.clone(), metrics.clone()).await?;
        let state = AppState {
            engine: Arc::new(engine),
            model: cfg.model.name.clone(),
            cfg: Arc::new(cfg),
            tokenizer,
            api_key,
            ready: Arc::new(AtomicBool::new(true)),
            metrics,
        };
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
        });
        tracing::info!(%addr, model = %state.model, "serving /v1/chat/completions, /v1/models, /ready, /metrics and the playground at /");
        Ok(Service {
            addr,
            state,
            shutdown: tx,
            task,
        })
    }

    /// Graceful shutdown: not ready, no new connections, in-flight streams run to their end, then the
    /// actors stop.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.state.ready.store(false, Ordering::SeqCst);
        let _ = self.shutdown.send(());
        self.task.await??;
        let engine = self.state.engine.clone();
        drop(self.state);
        match Arc::try_unwrap(engine) {
            Ok(e) => e.shutdown().await,
            Err(_) => {
                tracing::warn!("the engine is still shared; its actors stop with the process")
            }
        }
        Ok(())
    }
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
