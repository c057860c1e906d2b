//! The benchmarks, run with tiny sizes so CI keeps them working. Asserts
//! only that every path produced figures; speed is for `berth-bench`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use berth_tests::bench::{sync, tls_front};
use berth_tests::preflight;

#[test]
fn tls_front_benchmark_produces_figures_for_every_path() {
    if !preflight() {
        return;
    }
    let opts = tls_front::Options {
        bulk_mib: 4,
        layers: 2,
        rounds: 1,
        requests: 50,
        connects: 5,
    };
    let report = tls_front::run(&opts).expect("the benchmark runs");
    println!("{report}");
    let names: Vec<&str> = report.paths.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [tls_front::UNIX, tls_front::FRONT, tls_front::DOCKERD_TLS]
    );
    for p in &report.paths {
        assert_eq!(p.load.n, 1, "{}", p.name);
        assert_eq!(p.ping.n, 50, "{}", p.name);
        assert_eq!(p.connect_ping.n, 5, "{}", p.name);
        for v in [
            p.load.median,
            p.save.median,
            p.ping.median,
            p.connect_ping.median,
        ] {
            assert!(v.is_finite() && v > 0.0, "{}: {v}", p.name);
        }
    }
    assert!(report.image_bytes >= 4 * 1024 * 1024);
    assert!(!report.docker_version.is_empty());
    let text = report.to_string();
    assert!(text.contains("ratios"), "{text}");
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
