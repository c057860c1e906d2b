//! `berth-bench`: runs berth's benchmarks and prints every figure with its
//! same-run baseline and ratio. Needs root, dockerd, the docker CLI,
//! iproute2, nsenter and busybox-static, like the end-to-end tests.
//!
//! ```sh
//! cargo run --release -p berth-tests --bin berth-bench -- all
//! ```

use std::process::ExitCode;

use berth_tests::bench::{self, Scenario, Sizes};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "berth-bench",
    about = "berth's benchmarks, each with a baseline measured in the same run"
)]
struct Args {
    /// Which scenarios to run.
    #[arg(value_enum, default_value = "all")]
    scenarios: Vec<Scenario>,
    /// Tiny sizes (what CI runs): checks that the suite works, not speed.
    #[arg(long, env = "BERTH_BENCH_SMOKE")]
    smoke: bool,
    /// Repeat P1 this many times (overrides the size).
    #[arg(long, env = "BERTH_BENCH_P1_CYCLES")]
    p1_cycles: Option<usize>,
    /// Agent counts for P2, the first being the baseline (e.g. 100,1,10000).
    #[arg(long, env = "BERTH_BENCH_P2_AGENTS", value_delimiter = ',')]
    p2_agents: Option<Vec<usize>>,
    /// Seconds of acquire/release load per P2 run.
    #[arg(long, env = "BERTH_BENCH_P2_SECONDS")]
    p2_seconds: Option<u64>,
    /// Skip P2's extra run with one TCP connection per agent.
    #[arg(long, env = "BERTH_BENCH_P2_NO_CONN_PER_AGENT")]
    p2_no_conn_per_agent: bool,
    /// Runs of P3, P4 and P5 (overrides the sizes).
    #[arg(long, env = "BERTH_BENCH_RUNS")]
    runs: Option<usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !berth_tests::preflight() {
        return ExitCode::SUCCESS;
    }
    let mut sizes = if args.smoke {
        Sizes::smoke()
    } else {
        Sizes::full()
    };
    if let Some(n) = args.p1_cycles {
        sizes.p1_cycles = n;
    }
    if let Some(a) = args.p2_agents {
        sizes.p2_agents = a;
    }
    if let Some(s) = args.p2_seconds {
        sizes.p2_duration = std::time::Duration::from_secs(s);
    }
    if args.p2_no_conn_per_agent {
        sizes.p2_conn_per_agent = false;
    }
    if let Some(r) = args.runs {
        sizes.p3_runs = r;
        sizes.p4_runs = r;
        sizes.p5_runs = r;
    }
    match bench::run(&args.scenarios, &sizes).await {
        Ok(figures) => {
            println!("{}", bench::summary_table(&figures));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth-bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
