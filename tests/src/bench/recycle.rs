//! P5: in `--recycle` mode, from `Release` of a busy host to that host
//! being Ready again. Measured at the client as Release followed at once by
//! an Acquire that waits: with one host in the pool, the Acquire answers
//! when the agent has wiped, verified, reported Ready and accepted the new
//! lease, so the figure is an upper bound on release -> Ready.
//!
//! Baseline, interleaved on the same leased host: P4's docker CLI sequence
//! (`docker rm -f` + `docker system prune -af --volumes`) on the same
//! population. The agent's own wipe duration from its report is shown too.

use std::time::{Duration, Instant};

use super::procs::{Agent, Coordinator, Env};
use super::wipe::{Rootfs, cli_wipe, populate};
use super::{BenchError, Figure, Result, Sizes, ms};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// P5's target (performance round 2; the first round's was 3 s).
const RECYCLE_TARGET_MS: f64 = 1000.0;

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    let env = Env::new(&format!("{}5-", sizes.prefix.trim_end_matches('-')))?;
    let rootfs = Rootfs::make(&env).await?;
    let coordinator = Coordinator::start(&env, "coordinator", &["--recycle".into()])?;
    let mut agent = Agent::spawn(&env, &coordinator, true, "agent-recycle")?;
    agent.wait_ready().await?;
    let host_id = agent.host_id().unwrap_or_default().to_owned();
    let socket = env.docker_socket(&host_id);
    let mut clients = coordinator.clients().await?;
    clients
        .wait_ready_hosts(1, Duration::from_millis(20), READY_TIMEOUT)
        .await?;
    let pop = sizes.p4_population;

    let mut lease = clients.acquire("p5-0", READY_TIMEOUT).await?;
    let (mut recycle, mut cli, mut reported) = (vec![], vec![], vec![]);
    let mut notes = vec![];
    for i in 1..=sizes.p5_runs {
        populate(&rootfs, &socket, pop).await?;
        cli.push(ms(cli_wipe(&rootfs, &socket).await?));
        populate(&rootfs, &socket, pop).await?;
        let t = Instant::now();
        clients.release(&lease.lease_id).await?;
        let next = clients.acquire(&format!("p5-{i}"), READY_TIMEOUT).await?;
        recycle.push(ms(t.elapsed()));
        if next.host_id != host_id {
            return Err(BenchError::step(
                "P5",
                format!(
                    "the next lease went to {} instead of {host_id}",
                    next.host_id
                ),
            ));
        }
        let old = clients.get(&lease.lease_id).await?;
        match old.wipe {
            Some(w) if w.verified => {
                reported.push(w.duration_ms as f64);
                if w.method != berth_agent::docker::reset::METHOD_FRESH {
                    notes.push(format!("wipe through {}", w.method));
                }
            }
            Some(w) => notes.push(format!("wipe not verified: {}", w.error)),
            None => notes.push("no wipe report on the released lease".to_owned()),
        }
        lease = next;
    }
    let _ = clients.release(&lease.lease_id).await;
    drop(agent);
    drop(coordinator);
    drop(env);

    let f = Figure::new(
        "P5",
        "recycle mode: Release of a P4-busy host -> the host Ready and leased again",
        "ms",
    )
    .samples(recycle)
    .baseline(
        "docker rm -f + docker system prune -af --volumes (P4 baseline), same host",
        cli,
    );
    let s = f.summary();
    let mut f = f.check("<= 1 s", s.is_some_and(|s| s.median <= RECYCLE_TARGET_MS));
    for n in notes {
        f = f.note(n);
    }
    let w = Figure::new(
        "P5 wipe (agent report)",
        "the agent's own wipe duration from its WipeReport",
        "ms",
    )
    .samples(reported);
    Ok(vec![f, w])
}
