//! `berth-bench`: runs berth's benchmarks and prints every figure with its
//! same-run baseline and ratio. Needs root, dockerd, the docker CLI,
//! iproute2, nsenter and busybox-static, like the end-to-end tests.
//!
//! ```sh
//! cargo run --release -p berth-tests --bin berth-bench -- all
//! cargo run --release -p berth-tests --bin berth-bench -- tls-front --bulk-mib 512
//! cargo run --release -p berth-tests --bin berth-bench -- sync --tree-mib 200
//! cargo run --release -p berth-tests --bin berth-bench -- cache --cache-loop 3000000
//! ```
//!
//! The benchmarks live in `berth_tests::bench`; `tests/bench_smoke.rs` runs
//! them with tiny sizes.

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
    /// Agents (Ready hosts) in P1's pool; with one, every acquire waits
    /// until the host is back from the previous lease's wipe.
    #[arg(long, env = "BERTH_BENCH_P1_AGENTS", value_parser = clap::value_parser!(u16).range(1..))]
    p1_agents: Option<u16>,
    /// P1's hosts keep their directories (data roots, agent state files)
    /// on tmpfs: no host then writes to the store's disk (logs aside), as
    /// when the hosts are other machines. Its figures are named
    /// "... (hosts in memory)".
    #[arg(long, env = "BERTH_BENCH_P1_HOSTS_IN_MEMORY")]
    p1_hosts_in_memory: bool,
    /// Agent counts for P2, the first being the baseline (e.g. 100,1,10000).
    #[arg(long, env = "BERTH_BENCH_P2_AGENTS", value_delimiter = ',')]
    p2_agents: Option<Vec<usize>>,
    /// Seconds of acquire/release load per P2 run.
    #[arg(long, env = "BERTH_BENCH_P2_SECONDS")]
    p2_seconds: Option<u64>,
    /// Skip P2's extra run with one TCP connection per agent.
    #[arg(long, env = "BERTH_BENCH_P2_NO_CONN_PER_AGENT")]
    p2_no_conn_per_agent: bool,
    /// Agent count of P2's run with one TCP (TLS) connection per agent
    /// (default: the largest of --p2-agents).
    #[arg(long, env = "BERTH_BENCH_P2_CONN_PER_AGENT_COUNT")]
    p2_conn_per_agent_count: Option<usize>,
    /// Skip P2's extra run with the coordinator's lease store on tmpfs.
    #[arg(long, env = "BERTH_BENCH_P2_NO_MEMORY_STORE")]
    p2_no_memory_store: bool,
    /// Failover rounds of the pg scenario (overrides the size).
    #[arg(long, env = "BERTH_BENCH_FAILOVER_RUNS")]
    failover_runs: Option<usize>,
    /// Runs of P3, P4 and P5 (overrides the sizes).
    #[arg(long, env = "BERTH_BENCH_RUNS")]
    runs: Option<usize>,
    /// Container counts of P4's growth series (e.g. 1,100); empty for none.
    #[arg(long, env = "BERTH_BENCH_P4_GROWTH", value_delimiter = ',')]
    p4_growth: Option<Vec<usize>>,
    /// Seconds the idle footprint is sampled.
    #[arg(long, env = "BERTH_BENCH_IDLE_SECONDS")]
    idle_seconds: Option<u64>,
    /// TLS front: random image data, MiB.
    #[arg(long, env = "BERTH_BENCH_BULK_MIB")]
    bulk_mib: Option<u64>,
    /// TLS front: layers the image data is split over.
    #[arg(long, env = "BERTH_BENCH_LAYERS")]
    layers: Option<u32>,
    /// TLS front and sync: bulk rounds per path / per tool and direction.
    #[arg(long, env = "BERTH_BENCH_ROUNDS")]
    rounds: Option<usize>,
    /// Sync: size of the random tree, MiB.
    #[arg(long, env = "BERTH_BENCH_TREE_MIB")]
    tree_mib: Option<u64>,
    /// Sync: files in the tree.
    #[arg(long, env = "BERTH_BENCH_FILES")]
    files: Option<usize>,
    /// Build cache: iterations of the costly step's shell loop.
    #[arg(long, env = "BERTH_BENCH_CACHE_LOOP")]
    cache_loop: Option<u64>,
    /// Registry mirror: MiB of each data layer of the image.
    #[arg(long, env = "BERTH_BENCH_MIRROR_LAYER_MIB")]
    mirror_layer_mib: Option<usize>,
    /// Registry mirror: the upstream link's rate (`tc` syntax, e.g. 100mbit).
    #[arg(long, env = "BERTH_BENCH_MIRROR_RATE")]
    mirror_rate: Option<String>,
    /// TLS front: sequential /_ping requests per path.
    #[arg(long, env = "BERTH_BENCH_REQUESTS")]
    requests: Option<usize>,
    /// TLS front: /_ping requests on a fresh connection each, per path.
    #[arg(long, env = "BERTH_BENCH_CONNECTS")]
    connects: Option<usize>,
}

impl Args {
    fn sizes(&self) -> Sizes {
        let mut sizes = if self.smoke {
            Sizes::smoke()
        } else {
            Sizes::full()
        };
        if let Some(n) = self.p1_cycles {
            sizes.p1_cycles = n;
        }
        if let Some(n) = self.p1_agents {
            sizes.p1_agents = usize::from(n);
        }
        sizes.p1_hosts_in_memory |= self.p1_hosts_in_memory;
        if let Some(a) = &self.p2_agents {
            sizes.p2_agents = a.clone();
        }
        if let Some(s) = self.p2_seconds {
            sizes.p2_duration = std::time::Duration::from_secs(s);
        }
        if self.p2_no_conn_per_agent {
            sizes.p2_conn_per_agent = None;
        } else if let Some(n) = self.p2_conn_per_agent_count {
            sizes.p2_conn_per_agent = Some(n);
        } else if sizes.p2_conn_per_agent.is_some() {
            sizes.p2_conn_per_agent = sizes.p2_agents.iter().max().copied();
        }
        if self.p2_no_memory_store {
            sizes.p2_memory_store = false;
        }
        if let Some(r) = self.runs {
            sizes.p3_runs = r;
            sizes.p4_runs = r;
            sizes.p5_runs = r;
        }
        if let Some(r) = self.failover_runs {
            sizes.failover_runs = r;
        }
        if let Some(g) = &self.p4_growth {
            sizes.p4_growth = g.iter().copied().filter(|&c| c > 0).collect();
        }
        if let Some(s) = self.idle_seconds {
            sizes.idle_window = std::time::Duration::from_secs(s);
        }
        let t = &mut sizes.tls_front;
        if let Some(v) = self.bulk_mib {
            t.bulk_mib = v;
        }
        if let Some(v) = self.layers {
            t.layers = v;
        }
        if let Some(v) = self.rounds {
            t.rounds = v;
        }
        if let Some(v) = self.requests {
            t.requests = v;
        }
        if let Some(v) = self.connects {
            t.connects = v;
        }
        if let Some(v) = self.rounds {
            sizes.sync.rounds = v;
        }
        if let Some(v) = self.tree_mib {
            sizes.sync.tree_mib = v;
        }
        if let Some(v) = self.files {
            sizes.sync.files = v;
        }
        if let Some(v) = self.rounds {
            sizes.cache.rounds = v;
        }
        if let Some(v) = self.cache_loop {
            sizes.cache.loop_iterations = v;
        }
        if let Some(v) = self.rounds {
            sizes.mirror.rounds = v;
        }
        if let Some(v) = self.mirror_layer_mib {
            sizes.mirror.layer_mib = v;
        }
        if let Some(v) = &self.mirror_rate {
            sizes.mirror.rate = v.clone();
        }
        sizes
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !berth_testkit::preflight() {
        eprintln!(
            "berth-bench: BERTH_SKIP_E2E=1 is set; the benchmarks need what the end-to-end tests need"
        );
        return ExitCode::FAILURE;
    }
    let sizes = args.sizes();
    println!("machine: {}", bench::machine());
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
