//! The `berth-agent` binary: parses the configuration, sets up tracing and
//! signal handling, and hands over to [`berth_agent::run`] (or, for
//! `berth-agent sweep`, to [`berth_agent::sweep`]). Exit status 0 means the
//! host was terminated and cleaned up as intended (or the sweep finished);
//! 2 means a bad configuration (one line on stderr names the setting).
//!
//! Under systemd (`Type=notify`) the agent reports READY=1 once its host
//! is ready (from the library), STOPPING=1 when a signal starts the
//! shutdown, and pings the watchdog when the unit sets `WatchdogSec=`.

use std::process::ExitCode;

use berth_agent::{Cli, Command, LogFormat};
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
        berth_daemon::systemd::stopping("shutting down: destroying the host");
        token.cancel();
    });
    Ok(())
}

/// Bad configuration: one line on stderr, exit status 2.
fn bad_config(what: impl std::fmt::Display) -> ExitCode {
    berth_daemon::config_file::bad_config("berth-agent", what)
}

/// The command line merged with `--config FILE` (flags and BERTH_* win).
fn parse_cli() -> Result<Cli, ExitCode> {
    berth_daemon::config_file::parse("berth-agent")
}

#[tokio::main]
async fn main() -> ExitCode {
    let Cli { command, config } = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_tracing(config.log_format);
    if let Err(e) = config.validate() {
        return bad_config(format!("invalid configuration: {e}"));
    }
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
    let watchdog_stop = CancellationToken::new();
    let _watchdog = berth_daemon::systemd::spawn_watchdog(watchdog_stop.clone());
    let result = berth_agent::run(config, shutdown.clone()).await;
    watchdog_stop.cancel();
    if !shutdown.is_cancelled() {
        // Ended on its own (host terminated, boot failed): tell systemd
        // before the process goes.
        berth_daemon::systemd::stopping("host ended");
    }
    match result.map_err(anyhow::Error::from) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our error messages already include their causes.
            tracing::error!("berth-agent failed: {e}");
            ExitCode::FAILURE
        }
    }
}
