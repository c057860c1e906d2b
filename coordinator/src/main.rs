//! `berth-coordinator`: parses flags (merged with `--config FILE`), starts
//! tracing and runs the coordinator. Under systemd (`Type=notify`) the
//! library reports READY=1 once gRPC serves; this binary reports STOPPING=1
//! when a signal starts the shutdown and pings the watchdog when the unit
//! sets `WatchdogSec=`. A bad configuration exits with status 2 and one
//! line on stderr naming the setting.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_coordinator::config::CoordinatorConfig;
use berth_runtime::telemetry::{self, LogConfig};
use clap::Parser;

/// berth's control plane: hands out pool hosts to CI builds as leases.
#[derive(Debug, Parser)]
#[command(name = "berth-coordinator", version)]
struct Cli {
    #[command(flatten)]
    coordinator: CoordinatorConfig,
    #[command(flatten)]
    log: LogConfig,
    /// TOML file of settings; its keys are these long flag names. A flag or
    /// its BERTH_* twin overrides the file.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
}

/// Bad configuration: one line on stderr, exit status 2.
fn bad_config(what: impl std::fmt::Display) -> ExitCode {
    berth_runtime::config_file::bad_config("berth-coordinator", what)
}

/// The command line merged with `--config FILE` (flags and BERTH_* win).
fn parse_cli() -> Result<Cli, ExitCode> {
    berth_runtime::config_file::parse("berth-coordinator")
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Err(e) = cli.coordinator.validate() {
        return bad_config(format!("invalid configuration: {e}"));
    }
    telemetry::init(cli.log.log_format, "info");
    let shutdown = berth_runtime::shutdown::on_signal(|signal| {
        tracing::info!("{signal}: shutting down");
        berth_runtime::systemd::stopping("shutting down");
    });
    let _watchdog = berth_runtime::systemd::spawn_watchdog(shutdown.clone());
    let result = berth_coordinator::run(cli.coordinator, shutdown.clone()).await;
    if !shutdown.is_cancelled() {
        berth_runtime::systemd::stopping("stopped");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
