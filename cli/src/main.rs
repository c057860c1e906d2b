//! `berth`: the CLI that CI and operators run. Parses flags and hands off to
//! the `berth_cli` library; exit codes are documented there.

use berth_cli::{self as cli, Cli, Command};
use berth_runtime::telemetry;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Up(args) => {
            telemetry::init(cli.log.log_format, "warn");
            let shutdown = interrupt_token();
            match cli::up::run(args.clone(), &cli.coordinator, shutdown).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("berth up: {e}");
                    1
                }
            }
        }
        Command::Sync(args) => {
            telemetry::init(cli.log.log_format, "warn");
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
            telemetry::init(cli.log.log_format, "warn");
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
            telemetry::init(cli.log.log_format, "warn");
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
    berth_runtime::shutdown::on_signal(|_| {})
}
