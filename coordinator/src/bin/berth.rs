//! `berth`: the CLI that CI and operators run. Parses flags and hands off to
//! `berth_coordinator::cli`; exit codes are documented there.

use berth_coordinator::cli::{self, Cli, Command};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Up(args) => {
            berth_coordinator::telemetry::init(cli.log.log_format, "warn");
            let shutdown = CancellationToken::new();
            tokio::spawn({
                let shutdown = shutdown.clone();
                async move {
                    berth_coordinator::shutdown_signal().await;
                    shutdown.cancel();
                }
            });
            match cli::up::run(args.clone(), &cli.coordinator, shutdown).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("berth up: {e}");
                    1
                }
            }
        }
        Command::Sync(args) => {
            berth_coordinator::telemetry::init(cli.log.log_format, "warn");
            let shutdown = interrupt_token();
            match cli::sync::run(args, &shutdown).await {
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("berth sync: {e}");
                    e.exit_code()
                }
            }
        }
        Command::Forward(args) if args.background => match cli::forward::spawn_background(args) {
            Ok(pid) => {
                println!("{pid}");
                0
            }
            Err(e) => {
                eprintln!("berth forward: {e}");
                e.exit_code()
            }
        },
        Command::Forward(args) => {
            berth_coordinator::telemetry::init(cli.log.log_format, "warn");
            match cli::forward_watch(&cli, &args.lease).await {
                Ok(watch) => match cli::forward::run(args, &watch, interrupt_token()).await {
                    Ok(_) => 0,
                    Err(e) => {
                        eprintln!("berth forward: {e}");
                        e.exit_code()
                    }
                },
                Err(e) => {
                    eprintln!("berth forward: {e}");
                    e.exit_code()
                }
            }
        }
        _ => {
            berth_coordinator::telemetry::init(cli.log.log_format, "warn");
            match cli::run_client(&cli).await {
                Ok(()) => 0,
                Err(e) => {
                    let msg = match &e {
                        cli::CliError::Status(s) => s.message().to_owned(),
                        other => other.to_string(),
                    };
                    eprintln!("berth: {msg}");
                    e.exit_code()
                }
            }
        }
    };
    std::process::exit(code);
}

/// A token cancelled by SIGINT or SIGTERM.
fn interrupt_token() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn({
        let token = token.clone();
        async move {
            berth_coordinator::shutdown_signal().await;
            token.cancel();
        }
    });
    token
}
