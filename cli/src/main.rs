//! `berth`: the CLI that CI and operators run. Parses flags and hands off to
//! the `berth_cli` library; exit codes are [`berth_cli::Exit`].

use berth_cli::{self as cli, Cli, Command, Exit};
use berth_runtime::telemetry;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // `forward --background` re-executes itself; its child sets up logging.
    if !matches!(&cli.command, Command::Forward(a) if a.background) {
        telemetry::init(cli.log.log_format, "warn");
    }
    let exit = match &cli.command {
        Command::Up(args) => report(
            "berth up",
            cli::up::run(args.clone(), &cli.coordinator, interrupt_token()).await,
            |_| Exit::Failure,
        ),
        Command::Sync(args) => report(
            "berth sync",
            cli::sync::run(args, &interrupt_token()).await,
            cli::sync::SyncError::exit_code,
        ),
        Command::Forward(args) if args.background => match cli::forward::spawn_background(args) {
            Ok(pid) => {
                println!("{pid}");
                Exit::Success
            }
            Err(e) => report::<(), _>(
                "berth forward",
                Err(e),
                cli::forward::ForwardError::exit_code,
            ),
        },
        Command::Forward(args) => match cli::forward_watch(&cli, &args.lease).await {
            Ok(watch) => report(
                "berth forward",
                cli::forward::run(args, &watch, interrupt_token()).await,
                cli::forward::ForwardError::exit_code,
            ),
            Err(e) => report::<(), _>("berth forward", Err(e), cli::CliError::exit_code),
        },
        _ => match cli::run_client(&cli).await {
            Ok(()) => Exit::Success,
            Err(e) => {
                let msg = match &e {
                    cli::CliError::Status(s) => s.message().to_owned(),
                    other => other.to_string(),
                };
                eprintln!("berth: {msg}");
                e.exit_code()
            }
        },
    };
    std::process::exit(exit.code());
}

/// Prints a failure as `WHAT: ERROR` on stderr and maps it to its exit code.
fn report<T, E: std::fmt::Display>(
    what: &str,
    result: Result<T, E>,
    code: impl Fn(&E) -> Exit,
) -> Exit {
    match result {
        Ok(_) => Exit::Success,
        Err(e) => {
            eprintln!("{what}: {e}");
            code(&e)
        }
    }
}

/// A token cancelled by SIGINT or SIGTERM.
fn interrupt_token() -> CancellationToken {
    berth_runtime::shutdown::on_signal(|_| {})
}
