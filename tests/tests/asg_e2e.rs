//! Elastic capacity on EC2 end to end: moto's server runs an Auto Scaling
//! group (min 1, max 3) that launches its own instances; the test plays
//! each instance's boot (a namespace at the instance's private address, a
//! fake IMDS, a real agent and dockerd), and the real coordinator, with
//! `--asg-name`, is the one party that changes the group's capacity:
//!
//! - a burst of 20 queued acquires raises the desired capacity to the max
//!   (3) and the new instances serve the waiting builds (the builds left
//!   waiting once five were served give up);
//! - leased instances carry scale-in protection;
//! - a released host's agent ends its instance without touching the
//!   desired capacity, and the group replaces it;
//! - idle instances above the target go after the scale-in delay, through
//!   TerminateInstanceInAutoScalingGroup with a decrement, and only idle
//!   ones: the leased, protected instance survives;
//! - every change of the desired capacity is one the coordinator logged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use berth_proto::v1 as pb;
use berth_testkit::*;
use berth_tests::asg::{AsgWorld, Group};
use berth_tests::ec2::Coordinator;

const AGENT_ARGS: &[&str] = &["--lifecycle-poll", "500ms"];
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const MAX: u32 = 3;
/// Builds in the burst; only `MAX` agents boot for them at once.
const BURST: usize = 20;
/// Builds of the burst served before the rest give up: one per instance,
/// then one on each of two replacements.
const SERVED: usize = 5;

/// The world, the coordinator, and every desired capacity seen.
struct Run {
    aw: AsgWorld,
    c: Coordinator,
    seen: Vec<u32>,
}

impl Run {
    /// Boots what the group launched, until `f` holds.
    fn drive<R>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut AsgWorld, &Coordinator, &Group) -> Option<R>,
    ) -> R {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            self.aw.boot_new(&self.c, AGENT_ARGS);
            let g = self.aw.group();
            if self.seen.last() != Some(&g.desired) {
                self.seen.push(g.desired);
            }
            if let Some(v) = f(&mut self.aw, &self.c, &g) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; group {g:?}; coordinator log:\n{}",
                std::fs::read_to_string(&self.c.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn release(&self, lease: &LeaseEnv) {
        ok(
            self.aw
                .w
                .berth(&self.c, &["release", "--lease", lease.lease_id()]),
            "berth release",
        );
    }

    /// The coordinator's log lines of one kind of Auto Scaling change.
    fn changes(&self, message: &str) -> Vec<serde_json::Value> {
        self.c.log_lines(message)
    }

    /// Builds waiting for a host, as `berth status` reports them.
    fn queued(&self) -> usize {
        let out = stdout(&ok(self.aw.w.berth(&self.c, &["status"]), "berth status"));
        out.lines()
            .find_map(|l| {
                l.strip_prefix("queue")?
                    .trim()
                    .strip_suffix("builds waiting")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no queue line in\n{out}"))
    }
}

/// A `berth acquire` waiting in the background.
struct Waiting {
    build: String,
    run: Background,
}

impl Waiting {
    fn spawn(r: &Run, build: &str) -> Self {
        let cmd = r.aw.w.berth_command(
            &r.c,
            &["acquire", "--build", build, "--ttl", "10m", "--wait", "4m"],
        );
        Waiting {
            build: build.to_owned(),
            run: Background::spawn("berth acquire", cmd),
        }
    }

    /// The lease, once the acquire has one.
    fn granted(&mut self) -> Option<LeaseEnv> {
        let out = self.run.try_output()?;
        let what = format!("berth acquire {}", self.build);
        Some(LeaseEnv::parse(&stdout(&ok(out, &what))))
    }
}

fn registered_ready(aw: &AsgWorld, c: &Coordinator, id: &str) -> bool {
    aw.w.hosts(c)
        .iter()
        .any(|h| h.host_id == id && h.connected && h.state == pb::HostState::Ready as i32)
}

#[test]
fn the_group_follows_the_coordinator_out_to_max_and_back_in_through_idle_instances_only() {
    if !preflight() {
        return;
    }
    let mut aw = AsgWorld::start("basg-", 1, MAX);
    let group = aw.group_name.clone();
    let ops_file = aw.w.state_dir.join("ops.addr");
    let ops_file_arg = ops_file.to_string_lossy().into_owned();
    let c = aw.w.start_coordinator(&[
        "--ops-addr-file",
        &ops_file_arg,
        "--max-hosts",
        &MAX.to_string(),
        "--min-hosts",
        "1",
        "--idle-hosts",
        "1",
        "--scale-in-after",
        "3s",
        "--asg-name",
        &group,
        "--asg-interval",
        "1s",
        "--sweep-interval",
        "0",
    ]);
    let mut r = Run {
        aw,
        c,
        seen: Vec::new(),
    };

    // The group's first instance boots and registers; idle, the pool wants
    // just it (min 1, idle target 1).
    let first = r.drive("the first instance to register", |aw, c, g| {
        let id = g.ids().into_iter().next()?;
        registered_ready(aw, c, &id).then_some(id)
    });
    assert_eq!(r.aw.group().desired, 1);

    // A burst of 20 builds: the first takes the idle instance and 19 queue
    // (no instance boots until the test plays it); the coordinator raises
    // the group to its max, and the new instances serve the waiting builds.
    let mut waiting: Vec<Waiting> = (0..BURST)
        .map(|n| Waiting::spawn(&r, &format!("burst-{n}")))
        .collect();
    wait_for("the burst to queue", STEP_TIMEOUT, || {
        (r.queued() == BURST - 1).then_some(())
    });
    wait_for("the group to be raised to its max", STEP_TIMEOUT, || {
        (r.aw.group().desired == MAX).then_some(())
    });
    let mut leases: Vec<LeaseEnv> = Vec::new();
    r.drive("three builds to get a host", |_, _, _| {
        leases.extend(waiting.iter_mut().filter_map(Waiting::granted));
        (leases.len() == 3).then_some(())
    });
    assert_eq!(r.aw.group().desired, MAX);
    let raises = r.changes("Auto Scaling: desired capacity raised");
    assert_eq!(
        raises.last().unwrap()["fields"]["group_desired"].as_u64(),
        Some(u64::from(MAX)),
        "{raises:?}"
    );
    let hosts: Vec<String> = leases
        .iter()
        .map(|l| l.get("BERTH_HOST_ID").to_owned())
        .collect();
    assert!(hosts.contains(&first), "{hosts:?}");
    assert_eq!(r.aw.booted.len(), 3, "one agent per instance");
    // A real host behind each lease.
    ok(run(leases[0].docker().arg("version")), "docker version");

    // Leased instances are protected from scale-in.
    r.drive("the leased instances to be protected", |_, _, g| {
        hosts
            .iter()
            .all(|h| g.member(h).is_some_and(|m| m.protected))
            .then_some(())
    });

    // A released host's agent ends its instance; the desired capacity
    // stays and the group replaces the instance, which serves the next
    // waiting build.
    for n in 1..=2 {
        let done = leases[n].get("BERTH_HOST_ID").to_owned();
        r.release(&leases[n]);
        let next = r.drive(
            "the released host to be replaced and serve a build",
            |aw, _, _| {
                let ended = aw.w.state_of(&done) != "running";
                let granted = waiting.iter_mut().find_map(Waiting::granted);
                match (ended, granted) {
                    (true, Some(l)) => Some(l),
                    (false, Some(l)) => panic!("{} granted before {done} ended", l.lease_id()),
                    (_, None) => None,
                }
            },
        );
        let g = r.aw.group();
        assert_eq!(g.desired, MAX, "the agent's end left the desired capacity");
        let log = r.aw.booted[&done].agent.log_text();
        assert!(log.contains("TerminateInstances accepted"), "{log}");
        assert!(g.member(&done).is_none(), "{done} left the group");
        assert_ne!(next.get("BERTH_HOST_ID"), done);
        leases.push(next);
    }
    // Five builds of the burst were served; the others give up (their
    // acquires end) and leave the queue.
    let (served, gave_up): (Vec<Waiting>, Vec<Waiting>) =
        waiting.into_iter().partition(|w| w.run.taken());
    assert_eq!(served.len(), SERVED);
    drop(gave_up);
    wait_for(
        "the builds that gave up to leave the queue",
        STEP_TIMEOUT,
        || (r.queued() == 0).then_some(()),
    );
    assert!(r.changes("desired capacity decremented").is_empty());

    // The burst is over but for the first build, which holds its host.
    // Idle instances above the target go after the delay, one at a time
    // through the group with a decrement; the leased one stays.
    let held = &leases[0];
    let held_host = held.get("BERTH_HOST_ID").to_owned();
    for l in &leases[3..] {
        r.release(l);
    }
    r.drive(
        "the group to shrink to the held host and one idle",
        |_, _, g| (g.desired == 2 && g.members.len() == 2).then_some(()),
    );
    let g = r.aw.group();
    let kept = g.member(&held_host).expect("the leased instance survives");
    assert!(kept.protected && kept.lifecycle == "InService", "{kept:?}");
    let ins = r.changes("idle instance terminated, desired capacity decremented");
    assert_eq!(ins.len(), 1, "{ins:?}");
    let retired = ins[0]["fields"]["host_id"].as_str().unwrap().to_owned();
    assert_ne!(retired, held_host);
    assert_eq!(r.aw.w.state_of(&retired), "terminated");
    r.drive("the retired host's agent to end", |aw, _, _| {
        (!aw.agent_running(&retired)).then_some(())
    });
    // The held host still serves its build.
    ok(
        run(held.docker().arg("version")),
        "docker version on the held host",
    );

    // The last build ends: its instance is replaced, then the excess idle
    // instance goes; the pool is back to its minimum.
    r.release(held);
    r.drive(
        "the group to shrink back to one idle instance",
        |aw, c, g| {
            (g.desired == 1
                && g.members.len() == 1
                && registered_ready(aw, c, &g.members[0].instance_id))
            .then_some(())
        },
    );
    let ins = r.changes("idle instance terminated, desired capacity decremented");
    assert_eq!(ins.len(), 2, "{ins:?}");
    assert!(
        ins.iter()
            .all(|l| l["fields"]["host_id"].as_str() != Some(held_host.as_str())),
        "{ins:?}"
    );

    // Every change of the desired capacity is one the coordinator made:
    // 1, plus what it raised, minus what it decremented, is what the group
    // has; and the group never went above its max.
    let raised: u64 = r
        .changes("Auto Scaling: desired capacity raised")
        .iter()
        .map(|l| {
            l["fields"]["group_desired"].as_u64().unwrap() - l["fields"]["from"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(
        1 + raised - ins.len() as u64,
        u64::from(r.aw.group().desired)
    );
    assert!(r.seen.iter().all(|d| *d <= MAX), "{:?}", r.seen);
    // And each change is counted.
    let ops: std::net::SocketAddr = std::fs::read_to_string(&ops_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let metrics = berth_tests::ec2::http(ops, "GET", "/metrics").unwrap();
    let sample = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in\n{metrics}"))
    };
    let raises = r.changes("Auto Scaling: desired capacity raised").len() as u64;
    assert!(raises >= 1);
    assert_eq!(sample("berth_ec2_asg_scale_outs_total"), raises);
    assert_eq!(sample("berth_ec2_asg_scale_ins_total"), 2);
    assert!(sample("berth_ec2_asg_instances_protected_total") >= 1);
    assert_eq!(sample("berth_ec2_asg_errors_total"), 0);
    assert_eq!(r.seen.first(), Some(&1));
    assert!(r.seen.contains(&MAX), "{:?}", r.seen);
    eprintln!(
        "desired capacities seen: {:?}; instances booted: {}",
        r.seen,
        r.aw.booted.len()
    );
}
