//! `berth-bench`: runs berth's benchmarks and prints their figures.
//!
//!     cargo build --release --bins && sudo target/release/berth-bench tls-front
//!     sudo target/release/berth-bench sync
//!
//! Needs what the end-to-end tests need (root, dockerd, the docker CLI,
//! iproute2, nsenter, busybox-static). Benchmarks live in
//! `berth_tests::bench`; each has a smoke run in `tests/bench_smoke.rs`.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "berth-bench",
    about = "berth's benchmarks (figures, not pass/fail)"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The agent's mutual-TLS Docker front against dockerd's unix socket and
    /// dockerd's own --tlsverify TCP listener.
    TlsFront {
        /// Random image data, MiB.
        #[arg(long, env = "BERTH_BENCH_BULK_MIB", default_value_t = 512)]
        bulk_mib: u64,
        /// Layers the image data is split over.
        #[arg(long, env = "BERTH_BENCH_LAYERS", default_value_t = 4)]
        layers: u32,
        /// Bulk rounds per path.
        #[arg(long, env = "BERTH_BENCH_ROUNDS", default_value_t = 3)]
        rounds: usize,
        /// Sequential /_ping requests per path.
        #[arg(long, env = "BERTH_BENCH_REQUESTS", default_value_t = 1000)]
        requests: usize,
        /// /_ping requests on a fresh connection each, per path.
        #[arg(long, env = "BERTH_BENCH_CONNECTS", default_value_t = 100)]
        connects: usize,
    },
    /// `berth sync` against `docker cp` of the same tree into (and out of)
    /// a named volume on a leased host.
    Sync {
        /// Size of the random tree, MiB.
        #[arg(long, env = "BERTH_BENCH_TREE_MIB", default_value_t = 200)]
        tree_mib: u64,
        /// Files in the tree.
        #[arg(long, env = "BERTH_BENCH_FILES", default_value_t = 2000)]
        files: usize,
        /// Of which large (half the bytes).
        #[arg(long, env = "BERTH_BENCH_LARGE_FILES", default_value_t = 20)]
        large_files: usize,
        /// Rounds per tool and direction.
        #[arg(long, env = "BERTH_BENCH_ROUNDS", default_value_t = 3)]
        rounds: usize,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.bench {
        Bench::TlsFront {
            bulk_mib,
            layers,
            rounds,
            requests,
            connects,
        } => {
            let opts = berth_tests::bench::tls_front::Options {
                bulk_mib,
                layers,
                rounds,
                requests,
                connects,
            };
            match berth_tests::bench::tls_front::run(&opts) {
                Ok(report) => {
                    println!("{report}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("berth-bench tls-front: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Bench::Sync {
            tree_mib,
            files,
            large_files,
            rounds,
        } => {
            let opts = berth_tests::bench::sync::Options {
                tree_mib,
                files,
                large_files,
                rounds,
            };
            match berth_tests::bench::sync::run(&opts) {
                Ok(report) => {
                    println!("{report}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("berth-bench sync: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
