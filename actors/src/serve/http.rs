//! The HTTP front, after text-generation-inference's server: axum routes for `POST /v1/chat/completions`
//! (OpenAI format, SSE when `stream: true`), `GET /v1/models`, `/ready`, the playground at `/`, and (from
//! the runtime) `/health` and `/metrics`. A request travels: bearer check → parse → validation →
//! admission → the engine's event stream → SSE or one body. Every refusal maps to a status and a stable
//! `error_type` ([`ServeError`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deem::config::DeemConfig;
use deem::text::tokenizer::DeemTokenizer;
use serde_json::json;

use super::engine::{Engine, EngineError, Weights};
use super::error::ServeError;
use super::sse::{complete_response, json_response, stream_response, ChunkHead};
use super::{openai, validation};
use crate::runtime::metrics::{Metrics, RequestLabels};

const PLAYGROUND: &str = include_str!("playground.html");

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub cfg: Arc<DeemConfig>,
    pub tokenizer: Arc<DeemTokenizer>,
    pub model: String,
    pub api_key: Option<String>,
    /// False while shutting down.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Requests in flight per API key (`serve.max_streams_per_key`).
    pub in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

/// One request's place in its key's count of requests in flight; given back when dropped (a stream
/// dropped when it ends or its client goes).
struct KeySlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl KeySlot {
    /// A place for `key`, or `KeyBusy` when it holds `limit` already (no limit: always).
    fn take(st: &AppState, key: &str) -> Result<Option<Self>, ServeError> {
        let Some(limit) = st.cfg.serve.max_streams_per_key else {
            return Ok(None);
        };
        let mut counts = st
            .in_flight
            .lock()
            .map_err(|_| ServeError::Internal("the per-key counts were poisoned".into()))?;
        let n = counts.entry(key.to_string()).or_default();
        if *n >= limit {
            return Err(ServeError::KeyBusy { limit });
        }
        *n += 1;
        Ok(Some(KeySlot {
            counts: st.in_flight.clone(),
            key: key.to_string(),
        }))
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.lock() {
            if let Some(n) = counts.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&self.key);
                }
            }
        }
    }
}

/// The bearer token of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn count(m: &Metrics, status: &str) {
    m.serve
        .requests
        .get_or_create(&RequestLabels {
            status: status.to_string(),
        })
        .inc();
}

fn error_response(e: &ServeError) -> Response {
    let mut r = json_response(e.status(), e.body());
    match e {
        ServeError::Unauthorized => {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        ServeError::QueueFull { .. } | ServeError::KeyBusy { .. } => {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    r
}

fn authorized(st: &AppState, headers: &HeaderMap) -> bool {
    let Some(key) = &st.api_key else {
        return true;
    };
    bearer(headers).is_some_and(|given| same_key(given.as_bytes(), key.as_bytes()))
}

/// Whether two keys are equal, in a time that depends on their lengths only (not on where they first
/// differ), so response times do not reveal the key a byte at a time.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    let mut diff = given.len() ^ key.len();
    for i in 0..given.len().max(key.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = key.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
    }
    diff == 0
}

/// Parse and validate off the async workers (images are decoded here).
async fn validated(
    st: &AppState,
    body: Bytes,
) -> Result<(validation::ValidRequest, bool, bool), ServeError> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || {
        let r = openai::parse(&body)?;
        let stream = r.stream;
        let usage = r.stream_options.as_ref().is_some_and(|o| o.include_usage);
        validation::validate(r, &st.cfg, &st.tokenizer, &st.model).map(|req| (req, stream, usage))
    })
    .await
    .map_err(|e| ServeError::Internal(e.to_string()))?
}

async fn chat(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&st, &headers) {
        count(&st.metrics, "unauthorized");
        return error_response(&ServeError::Unauthorized);
    }
    if !st.ready.load(Ordering::SeqCst) {
        return error_response(&ServeError::ShuttingDown);
    }
    let (req, stream, include_usage) = match validated(&st, body).await {
        Ok(x) => x,
        Err(e) => {
            count(&st.metrics, "invalid");
            return error_response(&e);
        }
    };
    // The per-key limit counts callers by their token; without one, all of them together.
    let slot = match KeySlot::take(&st, bearer(&headers).unwrap_or("")) {
        Ok(slot) => slot,
        Err(e) => {
            count(&st.metrics, "rejected");
            return error_response(&e);
        }
    };
    let events = match st.engine.generate(req) {
        Ok(events) => events,
        Err(e) => {
            if matches!(e, ServeError::QueueFull { .. }) {
                count(&st.metrics, "rejected");
            }
            return error_response(&e);
        }
    };
    let head = ChunkHead {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        model: st.model.clone(),
        created: openai::now_unix(),
    };
    // The slot lives as long as the events: until the stream ends or its client goes.
    let events = futures_util::StreamExt::map(events, move |e| {
        let _held = &slot;
        e
    });
    if stream {
        stream_response(head, include_usage, events)
    } else {
        match complete_response(head, Box::pin(events)).await {
            Ok(body) => Json(body).into_response(),
            Err(e) => json_response(e.status(), e.body()),
        }
    }
}

async fn models(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if !authorized(&st, &headers) {
        return error_response(&ServeError::Unauthorized);
    }
    Json(json!({"object": "list", "data": [{
        "id": st.model, "object": "model", "created": 0, "owned_by": "deem",
        "max_model_len": st.cfg.llm.max_position_embeddings
    }]}))
    .into_response()
}

/// 200 while every worker's compute thread runs; 503 while shutting down or once one has failed (its
/// supervisor marked it), naming the workers that are down.
async fn ready(State(st): State<AppState>) -> Response {
    if !st.ready.load(Ordering::SeqCst) {
        return json_response(503, json!({"status": "shutting down"}));
    }
    let actors = st.engine.status().await;
    let mut down: Vec<String> = actors
        .iter()
        .filter(|a| a.state != crate::runtime::ComputeState::Running)
        .map(|a| a.name.clone())
        .collect();
    // Failures the supervisor heard of beyond this process's workers (a lost rank).
    for f in st.engine.failed() {
        if !down.contains(&f) {
            down.push(f);
        }
    }
    if down.is_empty() && st.engine.is_healthy() {
        Json(json!({"status": "ready", "model": st.model, "actors": actors})).into_response()
    } else {
        json_response(
            503,
            json!({"status": "actors failed", "failed": down, "actors": actors}),
        )
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
    crate::runtime::http::instrument(routes, metrics)
}

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Server(String),
}

/// A started service: the engine and the HTTP server on `addr`.
pub struct Service {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Service {
    /// Starts the workers and binds `addr` (port 0 picks one).
    pub async fn start(
        addr: SocketAddr,
        cfg: DeemConfig,
        topo: &crate::runtime::topology::Topology,
        weights: &Weights,
        tokenizer: DeemTokenizer,
        api_key: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServiceError> {
        let model = (cfg, topo, weights);
        Self::start_on(addr, model, tokenizer, api_key, metrics, None).await
    }

    /// [`Self::start`] as rank 0 of a multi-process service (`world`).
    pub async fn start_on(
        addr: SocketAddr,
        (cfg, topo, weights): (DeemConfig, &crate::runtime::topology::Topology, &Weights),
        tokenizer: DeemTokenizer,
        api_key: Option<String>,
        metrics: Arc<Metrics>,
        world: Option<crate::serve::remote::ServeWorld>,
    ) -> Result<Self, ServiceError> {
        let tokenizer = Arc::new(tokenizer);
        // Validation sees the sequence slots the KV budget leaves (serve.kv_cache_bytes).
        let cfg = crate::serve::engine::budgeted(&cfg, topo)?;
        let engine = Engine::start_on(
            &cfg,
            topo,
            weights,
            tokenizer.clone(),
            metrics.clone(),
            world,
        )
        .await?;
        let state = AppState {
            engine: Arc::new(engine),
            model: cfg.model.name.clone(),
            cfg: Arc::new(cfg),
            tokenizer,
            api_key,
            ready: Arc::new(AtomicBool::new(true)),
            metrics,
            in_flight: Arc::default(),
        };
        let bind = |source| ServiceError::Bind { addr, source };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
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
    /// workers stop.
    pub async fn stop(self) -> Result<(), ServiceError> {
        self.state.ready.store(false, Ordering::SeqCst);
        let _ = self.shutdown.send(());
        self.task
            .await
            .map_err(|e| ServiceError::Server(e.to_string()))?
            .map_err(|e| ServiceError::Server(e.to_string()))?;
        let engine = self.state.engine.clone();
        drop(self.state);
        match Arc::try_unwrap(engine) {
            Ok(e) => e.shutdown().await,
            Err(_) => {
                tracing::warn!("the engine is still shared; its workers stop with the process")
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
