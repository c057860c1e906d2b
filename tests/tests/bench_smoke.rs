//! The benchmark suite in smoke mode: the same code as `berth-bench all`
//! with tiny sizes, so the benchmarks never rot. It asserts that every
//! figure was produced and is sane (samples present, finite, ordered, with
//! their baselines); it makes no timing assertions, since speed is measured
//! by the full run, not by tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use berth_testkit::preflight;
use berth_tests::bench::{self, Scenario, Sizes, sync, tls_front};

fn figure<'a>(figures: &'a [bench::Figure], key: &str) -> &'a bench::Figure {
    figures.iter().find(|f| f.key == key).unwrap_or_else(|| {
        panic!(
            "no figure {key}; have {:?}",
            figures.iter().map(|f| &f.key).collect::<Vec<_>>()
        )
    })
}

fn sane(f: &bench::Figure, positive: bool) {
    let s = f
        .summary()
        .unwrap_or_else(|| panic!("{}: no samples", f.key));
    for v in &f.samples {
        assert!(v.is_finite() && *v >= 0.0, "{}: sample {v}", f.key);
    }
    assert!(
        s.min <= s.median && s.median <= s.p99 && s.p99 <= s.max,
        "{}: {s:?}",
        f.key
    );
    if positive {
        assert!(s.min > 0.0, "{}: a zero sample {s:?}", f.key);
    }
    assert!(!f.render().is_empty());
}

fn with_baseline(f: &bench::Figure) {
    sane(f, true);
    let b = f
        .baseline_summary()
        .unwrap_or_else(|| panic!("{}: no baseline", f.key));
    assert!(b.min > 0.0, "{}: baseline {b:?}", f.key);
    let r = f.ratio().unwrap();
    assert!(r.is_finite() && r > 0.0, "{}: ratio {r}", f.key);
}

#[test]
fn benchmark_suite_smoke() {
    if !preflight() {
        return;
    }
    let sizes = Sizes::smoke();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The TLS front and sync have tests of their own below.
    let scenarios = [
        Scenario::P1,
        Scenario::P2,
        Scenario::P3,
        Scenario::P4,
        Scenario::P5,
        Scenario::Idle,
    ];
    assert_eq!(
        Scenario::All.expand(),
        [&scenarios[..], &[Scenario::TlsFront, Scenario::Sync]].concat()
    );
    let figures = rt
        .block_on(bench::run(&scenarios, &sizes))
        .unwrap_or_else(|e| panic!("the benchmark suite failed: {e}"));
    println!("{}", bench::summary_table(&figures));

    // P1: every acquire went through the agent; the baseline too.
    let p1 = figure(&figures, "P1");
    with_baseline(p1);
    assert_eq!(p1.samples.len(), sizes.p1_cycles);
    assert_eq!(p1.checks.len(), 2);

    // P2: both agent counts ran the load without errors.
    let (small, big) = (sizes.p2_agents[0], sizes.p2_agents[1]);
    for n in [small, big] {
        let rate = figure(&figures, &format!("P2 cycles/s @{n}"));
        sane(rate, false);
        assert!(
            rate.samples.iter().sum::<f64>() > 0.0,
            "no cycle completed with {n} agents"
        );
        assert!(
            rate.notes.iter().any(|n| n.contains(" 0 errors")),
            "P2 with {n} agents had errors: {:?}",
            rate.notes
        );
        sane(figure(&figures, &format!("P2 acquire @{n}")), true);
        sane(figure(&figures, &format!("P2 release @{n}")), true);
        sane(figure(&figures, &format!("P2 cpu @{n}")), false);
        let rss = figure(&figures, &format!("P2 rss/agent @{n}"));
        assert!(
            rss.samples.iter().all(|v| v.is_finite()),
            "{:?}",
            rss.samples
        );
    }
    assert!(
        figure(&figures, &format!("P2 acquire @{big}"))
            .baseline
            .is_some()
    );
    // The same load with the store on tmpfs, against the disk run.
    let mem = figure(&figures, &format!("P2 cycles/s @{small} tmpfs store"));
    sane(mem, false);
    assert!(mem.baseline.is_some());
    assert!(
        mem.notes.iter().any(|n| n.contains(" 0 errors")),
        "{:?}",
        mem.notes
    );
    with_baseline(figure(
        &figures,
        &format!("P2 acquire @{small} tmpfs store"),
    ));

    // P3: the agent booted; dockerd alone booted.
    with_baseline(figure(&figures, "P3"));
    with_baseline(figure(&figures, "P3 registered"));

    // P4: both wipes ran and the agent's verified the host empty.
    let p4 = figure(&figures, "P4");
    with_baseline(p4);
    assert!(
        p4.checks
            .iter()
            .any(|c| c.target.starts_with("verified") && c.met),
        "{p4:?}"
    );

    // P5: the host came back and its wipe report was read.
    with_baseline(figure(&figures, "P5"));
    sane(figure(&figures, "P5 wipe (agent report)"), false);

    // Idle footprint: an RSS that a real process has.
    let rss = figure(&figures, "idle RSS");
    sane(rss, true);
    assert!(
        rss.samples.iter().all(|m| *m > 1.0 && *m < 4096.0),
        "{:?}",
        rss.samples
    );
    sane(figure(&figures, "idle CPU"), false);
}

#[test]
fn tls_front_benchmark_produces_figures_for_every_path() {
    if !preflight() {
        return;
    }
    let opts = tls_front::Options::smoke();
    let report = tls_front::run(&opts).expect("the benchmark runs");
    println!("{report}");
    let names: Vec<&str> = report.paths.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [tls_front::UNIX, tls_front::FRONT, tls_front::DOCKERD_TLS]
    );
    for p in &report.paths {
        assert_eq!(p.load.n, opts.rounds, "{}", p.name);
        assert_eq!(p.ping.n, opts.requests, "{}", p.name);
        assert_eq!(p.connect_ping.n, opts.connects, "{}", p.name);
        for v in [
            p.load.median,
            p.save.median,
            p.ping.median,
            p.connect_ping.median,
        ] {
            assert!(v.is_finite() && v > 0.0, "{}: {v}", p.name);
        }
    }
    assert!(report.image_bytes >= opts.bulk_mib * 1024 * 1024);
    assert!(!report.docker_version.is_empty());
    let text = report.to_string();
    assert!(text.contains("ratios"), "{text}");

    // The same figures as the suite prints them, each with its baseline.
    let figures = tls_front::figures(&report);
    let keys: Vec<&str> = figures.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "TLS front load vs unix",
            "TLS front load vs dockerd TLS",
            "TLS front save vs unix",
            "TLS front save vs dockerd TLS",
            "TLS front /_ping",
            "TLS front connect+/_ping",
        ]
    );
    for f in &figures {
        with_baseline(f);
    }
    println!("{}", bench::summary_table(&figures));
}

#[test]
fn sync_benchmark_produces_figures_for_both_tools() {
    if !preflight() {
        return;
    }
    let opts = sync::Options {
        tree_mib: 4,
        files: 40,
        large_files: 2,
        rounds: 1,
    };
    let report = sync::run(&opts).expect("the benchmark runs");
    println!("{report}");
    assert_eq!(report.files, 40);
    assert!(
        report.tree_bytes >= 4 * 1024 * 1024 - 4096,
        "{}",
        report.tree_bytes
    );
    for s in [
        report.berth_to,
        report.docker_cp_to,
        report.berth_from,
        report.docker_cp_from,
    ] {
        assert_eq!(s.n, 1);
        assert!(s.median.is_finite() && s.median > 0.0, "{s:?}");
    }
    let text = report.to_string();
    assert!(text.contains("to the volume:"), "{text}");
}
