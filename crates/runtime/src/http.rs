//! The plain-HTTP side of both daemons (the coordinator's ops endpoint, an
//! agent's status endpoint): the Prometheus text answer of `/metrics` and
//! serving a router until the shutdown token fires. Behind the `http`
//! feature, so the CLI does not link axum.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The answer to `GET /metrics`: the encoded registry, or 500 if encoding failed.
pub fn metrics_response(encoded: Result<String, std::fmt::Error>) -> Response {
    match encoded {
        Ok(text) => ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

/// Serves `router` on `listener` until `stop` fires; a failure is logged
/// naming `what` (the endpoint), since the daemon carries on without it.
pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken, what: &str) {
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "{what} failed");
    }
}
