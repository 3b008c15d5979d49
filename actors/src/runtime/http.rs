//! The observability endpoint: `/metrics` (OpenMetrics or classic Prometheus text) and `/health`, served by axum. Bound to
//! 127.0.0.1 by default; later services (training, generation) mount their routes beside these.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::runtime::metrics::{
    to_classic_text, HttpLabels, Metrics, CLASSIC_CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE,
};

/// Default listen address of the metrics endpoint.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// OpenMetrics when the scraper asks for it (Prometheus does), the classic text format otherwise.
async fn metrics(State(m): State<Arc<Metrics>>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers.get_all(header::ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    let text = m.encode();
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, CLASSIC_CONTENT_TYPE)],
            to_classic_text(&text),
        )
            .into_response()
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "version": deem::VERSION }))
}

async fn count_requests(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    m.http_requests
        .get_or_create(&HttpLabels {
            route,
            status: resp.status().as_u16().to_string(),
        })
        .inc();
    resp
}

/// `/metrics` and `/health`, counting every request in `deem_http_requests_total`.
pub fn router(m: Arc<Metrics>) -> Router {
    instrument(Router::new(), m)
}

/// Adds `/metrics`, `/health` and a 404 fallback to `routes`, and counts every request in
/// `deem_http_requests_total`.
pub fn instrument(routes: Router, m: Arc<Metrics>) -> Router {
    routes
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .route("/health", get(health))
                .with_state(m.clone()),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: try /metrics or /health\n",
            )
        })
        .layer(middleware::from_fn_with_state(m, count_requests))
}

/// A running endpoint; dropping the handle leaves it running until the runtime stops.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and serves `router` in the background.
    pub async fn start(addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
        });
        tracing::info!(%addr, "serving /metrics and /health");
        Ok(Server {
            addr,
            shutdown: tx,
            task,
        })
    }

    /// Stops accepting, finishes in-flight requests and waits for the server to end.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(());
        self.task
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}
