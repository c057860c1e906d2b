//! `berth-coordinator`: parses flags, starts tracing and runs the coordinator.

use berth_coordinator::config::{CoordinatorConfig, LogConfig};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// berth's control plane: hands out pool hosts to CI builds as leases.
#[derive(Debug, Parser)]
#[command(name = "berth-coordinator", version)]
struct Cli {
    #[command(flatten)]
    coordinator: CoordinatorConfig,
    #[command(flatten)]
    log: LogConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    berth_coordinator::telemetry::init(cli.log.log_format, "info");
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            berth_coordinator::shutdown_signal().await;
            shutdown.cancel();
        }
    });
    berth_coordinator::run(cli.coordinator, shutdown).await?;
    Ok(())
}
