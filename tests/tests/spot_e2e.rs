//! Spot interruption notices end to end: the real agent on the EC2 path
//! (moto, the fake IMDSv2) reads `spot/instance-action` and
//! `events/recommendations/rebalance`. A leased host keeps serving its
//! build, the lease gets an `interruption-notice` step with the announced
//! time (`berth get`), and the coordinator never offers the host again; an
//! idle host leaves the pool at once. One instance per test (the world's
//! namespace stands for one instance at a time).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use berth_testkit::*;
use berth_tests::ec2::Ec2World;

const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(90);
const NOTICE_TIME: &str = "2030-01-02T03:04:05Z";

#[test]
fn a_spot_notice_on_a_leased_host_reaches_the_build_and_the_host_is_never_offered_again() {
    if !preflight() {
        return;
    }
    let mut w = Ec2World::start("bsp1-");
    let c = w.start_coordinator(&["--sweep-interval", "0s"]);

    // A leased host: the notice arrives in the middle of the build.
    let host = w.launch_host(Some("InService"));
    let agent = w.start_agent(&c, &["--lifecycle-poll", "200ms"]);
    w.wait_registered(&c, &host, REGISTER_TIMEOUT);
    let lease = w.acquire(&c, "ci-spot");
    assert_eq!(lease.get("BERTH_HOST_ID"), host);
    let polled = w.imds.hits("spot/instance-action");
    wait_for(
        "the agent to read spot notices",
        Duration::from_secs(20),
        || (w.imds.hits("spot/instance-action") > polled).then_some(()),
    );
    // No notice yet: nothing on the lease.
    let before = stdout(&ok(
        w.berth(&c, &["get", "--lease", lease.lease_id()]),
        "berth get",
    ));
    assert!(!before.contains("interruption-notice"), "{before}");
    w.imds.set_spot_action("terminate", NOTICE_TIME);
    let got = wait_for("the step on the lease", Duration::from_secs(30), || {
        let out = stdout(&w.berth(&c, &["get", "--lease", lease.lease_id()]));
        out.contains("interruption-notice").then_some(out)
    });
    assert!(
        got.contains("spot-interruption (terminate) at 2030-01-02T03:04:05Z"),
        "{got}"
    );
    // The build goes on: its host still serves it.
    ok(
        run(lease.docker().arg("version")),
        "docker version after the notice",
    );
    let listed = w.hosts(&c);
    let h = listed.iter().find(|h| h.host_id == host).unwrap();
    assert!(h.draining, "{h:?}");
    assert_eq!(h.lease_id, lease.lease_id());
    // Never offered again: another build finds no host.
    let o = w.berth(&c, &["acquire", "--build", "ci-next", "--wait", "1s"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        c.log_lines("interruption notice: the host is never offered again")
            .len(),
        1
    );
    ok(
        w.berth(&c, &["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    assert!(
        w.wait_child(&agent, EXIT_TIMEOUT),
        "the agent failed; log:\n{}",
        agent.log_text()
    );
}

#[test]
fn a_rebalance_recommendation_ends_an_idle_host_at_once() {
    if !preflight() {
        return;
    }
    let mut w = Ec2World::start("bsp2-");
    let c = w.start_coordinator(&["--sweep-interval", "0s"]);
    let idle = w.launch_host(Some("InService"));
    let agent = w.start_agent(&c, &["--lifecycle-poll", "200ms"]);
    w.wait_registered(&c, &idle, REGISTER_TIMEOUT);
    w.imds.set_rebalance(NOTICE_TIME);
    assert!(
        w.wait_child(&agent, EXIT_TIMEOUT),
        "the agent failed; log:\n{}",
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains("drained: rebalance-recommendation notice"),
        "{}",
        agent.log_text()
    );
    wait_for(
        "the idle instance to be terminated",
        Duration::from_secs(30),
        || (w.state_of(&idle) == "terminated").then_some(()),
    );
    assert_eq!(
        c.log_lines("interruption notice: the host is never offered again")
            .len(),
        1
    );
    assert!(w.hosts(&c).iter().all(|h| h.host_id != idle || h.draining));
}
