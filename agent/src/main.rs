//! The `berth-agent` binary: parses the configuration, sets up tracing and
//! signal handling, and hands over to [`berth_agent::run`] (or, for
//! `berth-agent sweep`, to [`berth_agent::sweep`]). Exit status 0 means the
//! host was terminated and cleaned up as intended (or the sweep finished).

use std::process::ExitCode;

use berth_agent::{Cli, Command, LogFormat};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// SIGTERM or SIGINT cancel `token`: one shutdown path for the whole agent.
fn watch_signals(token: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let Cli { command, config } = Cli::parse();
    init_tracing(config.log_format);
    if command == Some(Command::Sweep) {
        let result = match config.validate() {
            Ok(()) => berth_agent::sweep_config(&config)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        return match result {
            Ok(report) => {
                tracing::info!(?report, prefix = %config.prefix, "sweep done");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("sweep failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let shutdown = CancellationToken::new();
    if let Err(e) = watch_signals(shutdown.clone()) {
        tracing::error!("installing signal handlers: {e:#}");
        return ExitCode::FAILURE;
    }
    match berth_agent::run(config, shutdown)
        .await
        .map_err(anyhow::Error::from)
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our error messages already include their causes.
            tracing::error!("berth-agent failed: {e}");
            ExitCode::FAILURE
        }
    }
}
