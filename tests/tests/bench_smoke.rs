//! The benchmarks, run with tiny sizes so CI keeps them working. Asserts
//! only that every path produced figures; speed is for `berth-bench`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use berth_tests::bench::tls_front;
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
