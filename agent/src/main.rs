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

use berth_agent::{Cli, Command};
use tokio_util::sync::CancellationToken;

/// Bad configuration: one line on stderr, exit status 2.
fn bad_config(what: impl std::fmt::Display) -> ExitCode {
    berth_runtime::config_file::bad_config("berth-agent", what)
}

/// The command line merged with `--config FILE` (flags and BERTH_* win).
fn parse_cli() -> Result<Cli, ExitCode> {
    berth_runtime::config_file::parse("berth-agent")
}

#[tokio::main]
async fn main() -> ExitCode {
    let Cli { command, config } = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    berth_runtime::telemetry::init(config.log_format, "info");
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
    // SIGTERM or SIGINT: one shutdown path for the whole agent.
    let shutdown = berth_runtime::shutdown::on_signal(|signal| {
        tracing::info!("{signal}: shutting down");
        berth_runtime::systemd::stopping("shutting down: destroying the host");
    });
    let watchdog_stop = CancellationToken::new();
    let _watchdog = berth_runtime::systemd::spawn_watchdog(watchdog_stop.clone());
    let result = berth_agent::run(config, shutdown.clone()).await;
    watchdog_stop.cancel();
    if !shutdown.is_cancelled() {
        // Ended on its own (host terminated, boot failed): tell systemd
        // before the process goes.
        berth_runtime::systemd::stopping("host ended");
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
