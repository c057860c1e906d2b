//! The coordinator's ops endpoint: plain HTTP on `--ops-listen` (default
//! 127.0.0.1:9101) with `GET /metrics` (Prometheus text format, see
//! [`crate::ops::metrics`]) and `GET /healthz` (200 `ok`, or 503 with the
//! reason while the lease store fails and no host is offered). gRPC health
//! and reflection stay on the gRPC port. Nothing here needs or shows a
//! credential.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pool::Pool;

pub mod metrics;
pub mod registries;

/// Default address of the ops endpoint.
pub const DEFAULT_OPS_LISTEN: &str = berth_proto::ports::COORDINATOR_OPS_LOCAL;

#[derive(Clone)]
struct Ops {
    registry: Arc<Registry>,
    pool: Arc<Pool>,
}

fn router(registry: Arc<Registry>, pool: Arc<Pool>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(Ops { registry, pool })
}

async fn healthz(State(ops): State<Ops>) -> Response {
    match ops.pool.store_failing() {
        None => "ok\n".into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("lease store failing, no host is offered: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(ops): State<Ops>) -> Response {
    berth_runtime::http::metrics_response(crate::ops::metrics::encode(&ops.registry))
}

/// Serves the ops endpoint on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    pool: Arc<Pool>,
    stop: CancellationToken,
) {
    berth_runtime::http::serve(
        listener,
        router(Arc::new(registry), pool),
        stop,
        "ops endpoint",
    )
    .await;
}
