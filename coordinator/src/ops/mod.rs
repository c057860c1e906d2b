//! The coordinator's ops endpoint: plain HTTP on `--ops-listen` (default
//! 127.0.0.1:9101) with `GET /metrics` (Prometheus text format, see
//! [`crate::ops::metrics`]) and `GET /healthz`. gRPC health and reflection stay
//! on the gRPC port. Nothing here needs or shows a credential.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod metrics;
pub mod registries;

/// Default address of the ops endpoint.
pub const DEFAULT_OPS_LISTEN: &str = berth_proto::ports::COORDINATOR_OPS_LOCAL;

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(registry)
}

async fn metrics(State(registry): State<Arc<Registry>>) -> Response {
    berth_runtime::http::metrics_response(crate::ops::metrics::encode(&registry))
}

/// Serves the ops endpoint on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, registry: Registry, stop: CancellationToken) {
    berth_runtime::http::serve(listener, router(Arc::new(registry)), stop, "ops endpoint").await;
}
