//! The benchmark suite in smoke mode: the same code as `berth-bench all`
//! with tiny sizes, so the benchmarks never rot. It asserts that every
//! scenario produced exactly its named figures, that they are sane
//! (samples present, finite, ordered, positive where they must be, with a
//! positive baseline and ratio where the figure has one), and that what
//! `berth-bench` prints (each figure and the closing table) shows those
//! same numbers; it makes no timing assertions, since speed is measured by
//! the full run, not by tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use berth_testkit::preflight;
use berth_tests::bench::{self, Scenario, Sizes, cache, mirror, sync, tls_front};

/// Removes the state directories (stores, CA keys, logs) a passing run
/// left under the bench's state root: `berth-bench` keeps them to be read
/// after a run, a test that passed has no use for them, and with a new
/// `BERTH_TEST_TAG` per run nothing else would remove them. Each test that
/// calls this has a prefix of its own, so it removes only its own; that
/// there was something to remove shows the prefix still matches. The
/// removal is the testkit guards' (`remove_dirs_if_passed`): a directory
/// with something still mounted under it stays for the next sweep.
fn remove_state(prefix: &str) {
    let stem = berth_testkit::test_prefix(prefix.trim_end_matches('-'));
    let root = std::path::Path::new(bench::procs::STATE_ROOT);
    let dirs: Vec<std::path::PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&stem))
        .map(|e| e.path())
        .collect();
    assert!(
        !dirs.is_empty(),
        "no {stem}* under {} to remove",
        root.display()
    );
    let dirs: Vec<&std::path::Path> = dirs.iter().map(|d| d.as_path()).collect();
    berth_testkit::remove_dirs_if_passed(&dirs);
}

fn figure<'a>(figures: &'a [bench::Figure], key: &str) -> &'a bench::Figure {
    figures.iter().find(|f| f.key == key).unwrap_or_else(|| {
        panic!(
            "no figure {key}; have {:?}",
            figures.iter().map(|f| &f.key).collect::<Vec<_>>()
        )
    })
}

/// A number as `berth-bench` prints it (`12.3`, `0.95x`, `+0.126`).
fn number(token: &str) -> f64 {
    let v: f64 = token
        .trim_end_matches([',', 'x'])
        .parse()
        .unwrap_or_else(|e| panic!("not a number: {token:?}: {e}"));
    assert!(v.is_finite(), "not finite: {token:?}");
    v
}

/// Whether `shown` is `actual` as the figures print it: 3 significant
/// places below 1, 2 decimals below 100, none above.
fn shown_as(shown: f64, actual: f64) -> bool {
    let tolerance = if actual.abs() >= 100.0 {
        0.5
    } else if actual.abs() >= 1.0 {
        0.005
    } else {
        0.0005
    };
    (shown - actual).abs() <= tolerance + 1e-9
}

/// The summary line of `text` labelled `label`: `n`, min / median / p99 /
/// max, and the unit.
fn summary_line(text: &str, label: &str) -> (usize, [f64; 4], String) {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label) && l.contains(" n="))
        .unwrap_or_else(|| panic!("no line {label:?} in:\n{text}"));
    let rest = &line[line.find(" n=").unwrap() + 1..];
    let mut t = rest.split_whitespace();
    let n = t.next().unwrap().trim_start_matches("n=").parse().unwrap();
    let mut v = [0.0; 4];
    for (i, name) in ["min", "median", "p99", "max"].iter().enumerate() {
        assert_eq!(t.next(), Some(*name), "{line}");
        v[i] = number(t.next().unwrap_or_else(|| panic!("{line}")));
    }
    (n, v, t.collect::<Vec<_>>().join(" "))
}

/// The figure as `berth-bench` prints it holds its own numbers: the
/// measured summary, the baseline's and the ratio of the medians, and
/// every target with its verdict.
fn check_rendered(f: &bench::Figure) {
    let text = f.render();
    assert_eq!(
        text.lines().next(),
        Some(format!("{} {}", f.key, f.what).as_str())
    );
    let lines = [("measured".to_owned(), f.summary(), f.samples.len())]
        .into_iter()
        .chain(f.baseline.as_ref().map(|b| {
            (
                format!("baseline: {}", b.what),
                f.baseline_summary(),
                b.samples.len(),
            )
        }));
    for (label, summary, len) in lines {
        let s = summary.unwrap_or_else(|| panic!("{}: no samples for {label}", f.key));
        let (n, shown, unit) = summary_line(&text, &label);
        assert_eq!(n, len, "{}: n of {label}", f.key);
        assert_eq!(unit, f.unit, "{}: unit of {label}", f.key);
        for (shown, actual) in shown.iter().zip([s.min, s.median, s.p99, s.max]) {
            assert!(
                shown_as(*shown, actual),
                "{}: {label} shows {shown} for {actual}:\n{text}",
                f.key
            );
        }
    }
    let ratio_line = text.lines().find(|l| {
        l.trim_start()
            .starts_with("ratio (median / baseline median)")
    });
    match f.ratio() {
        Some(r) => {
            let line = ratio_line.unwrap_or_else(|| panic!("{}: no ratio:\n{text}", f.key));
            let shown = number(line.split_whitespace().last().unwrap());
            assert!(line.ends_with('x'), "{line}");
            assert!(
                (shown - r).abs() <= 0.005 + 1e-9,
                "{}: ratio {shown} for {r}",
                f.key
            );
        }
        None => assert!(
            ratio_line.is_none(),
            "{}: a ratio without one:\n{text}",
            f.key
        ),
    }
    for c in &f.checks {
        let verdict = if c.met { "MET" } else { "NOT MET" };
        assert!(
            text.lines().any(|l| {
                let l = l.trim();
                l.starts_with(&format!("target {}", c.target))
                    && l.ends_with(&format!(" {verdict}"))
                    && (c.met != l.ends_with("NOT MET"))
            }),
            "{}: target {:?} not shown as {verdict}:\n{text}",
            f.key,
            c.target
        );
    }
}

/// The closing table has a row per figure with its median, its baseline's
/// and the ratio.
fn check_table(figures: &[bench::Figure]) {
    let table = bench::summary_table(figures);
    for f in figures {
        assert!(f.key.len() <= 34, "{} does not fit the table", f.key);
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{:<34} ", f.key)))
            .unwrap_or_else(|| panic!("no row for {} in:\n{table}", f.key));
        let cols: Vec<&str> = [35..47, 48..60, 61..69]
            .into_iter()
            .map(|r| row.get(r).unwrap_or("").trim())
            .collect();
        let median = f.summary().unwrap().median;
        assert!(
            shown_as(number(cols[0].split_whitespace().next().unwrap()), median),
            "{}: median column {:?} for {median}",
            f.key,
            cols[0]
        );
        match (f.baseline_summary(), f.ratio()) {
            (Some(b), r) => {
                assert!(
                    shown_as(number(cols[1].split_whitespace().next().unwrap()), b.median),
                    "{row}"
                );
                match r {
                    Some(r) => assert!((number(cols[2]) - r).abs() <= 0.005 + 1e-9, "{row}"),
                    None => assert_eq!(cols[2], "-", "{row}"),
                }
            }
            (None, _) => assert_eq!((cols[1], cols[2]), ("-", "-"), "{row}"),
        }
    }
}

/// A report's table (`bench::write_table`): each named row with three
/// positive numbers; and its speedup line showing `speedup`.
fn rows_and_speedup(text: &str, names: &[&str], speedup: f64) {
    for name in names {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("  {name:<44} ")))
            .unwrap_or_else(|| panic!("no row {name:?} in\n{text}"));
        let v: Vec<f64> = row[47..].split_whitespace().map(number).collect();
        assert!(v.len() == 3 && v.iter().all(|x| *x > 0.0), "{row}");
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("speedup"))
        .unwrap_or_else(|| panic!("no speedup in\n{text}"));
    let shown = number(line.rsplit(' ').next().unwrap());
    assert!(shown_as(shown, speedup), "{line}");
}

/// Samples present, finite, ordered (and positive if `positive`), and
/// printed as they are.
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
    check_rendered(f);
}

/// [`sane`] and positive, with a positive baseline from the same run and a
/// finite positive ratio of the medians.
fn with_baseline(f: &bench::Figure) {
    sane(f, true);
    let b = f
        .baseline_summary()
        .unwrap_or_else(|| panic!("{}: no baseline", f.key));
    assert!(b.min > 0.0, "{}: baseline {b:?}", f.key);
    let r = f.ratio().unwrap_or_else(|| panic!("{}: no ratio", f.key));
    assert!(r.is_finite() && r > 0.0, "{}: ratio {r}", f.key);
}

#[test]
fn benchmark_suite_smoke() {
    if !preflight() {
        return;
    }
    let sizes = Sizes::smoke();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The TLS front, sync, the build cache and the mirror have tests of their own below.
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
        [
            &scenarios[..],
            &[
                Scenario::TlsFront,
                Scenario::Sync,
                Scenario::Cache,
                Scenario::Mirror,
                Scenario::Capacity,
            ]
        ]
        .concat()
    );
    let figures = rt
        .block_on(bench::run(&scenarios, &sizes))
        .unwrap_or_else(|e| panic!("the benchmark suite failed: {e}"));
    println!("{}", bench::summary_table(&figures));

    // Every scenario's figures, each once, and nothing else.
    let (small, big) = (sizes.p2_agents[0], sizes.p2_agents[1]);
    let mut expected: Vec<String> = vec![
        "P1".into(),
        "P1 release".into(),
        "P1 usable".into(),
        "P1 vs one commit".into(),
    ];
    for n in [small, big] {
        for what in ["cycles/s", "acquire", "release", "rss/agent", "cpu"] {
            expected.push(format!("P2 {what} @{n}"));
        }
    }
    expected.extend([
        format!("P2 cycles/s @{small} tmpfs store"),
        format!("P2 acquire @{small} tmpfs store"),
    ]);
    expected.extend(
        [
            "P3",
            "P3 registered",
            "P4",
            "P4 API wipe",
            "P4 old data root deletion",
            "P5",
            "P5 wipe (agent report)",
            "idle RSS",
            "idle CPU",
        ]
        .map(String::from),
    );
    let mut keys: Vec<String> = figures.iter().map(|f| f.key.clone()).collect();
    keys.sort();
    expected.sort();
    assert_eq!(keys, expected, "the suite's figures");
    for f in &figures {
        check_rendered(f);
    }
    check_table(&figures);

    // P1: every acquire went through the agent; the baseline too.
    let p1 = figure(&figures, "P1");
    with_baseline(p1);
    assert_eq!(p1.samples.len(), sizes.p1_cycles);
    assert_eq!(p1.checks.len(), 2);
    // Its floor: the same cycles, each baseline sample a round trip plus a
    // commit, so above the round trip alone.
    let floor = figure(&figures, "P1 vs one commit");
    with_baseline(floor);
    assert_eq!(floor.samples, p1.samples);
    let (rtt, commit) = (
        &p1.baseline.as_ref().unwrap().samples,
        &floor.baseline.as_ref().unwrap().samples,
    );
    assert!(
        rtt.iter().zip(commit).all(|(r, c)| c > r),
        "round trip {rtt:?} vs round trip + commit {commit:?}"
    );
    // Usable: each cycle's acquire and then the first /_ping, so longer
    // than that acquire alone.
    let usable = figure(&figures, "P1 usable");
    assert!(
        usable.samples.iter().zip(&p1.samples).all(|(u, a)| u > a),
        "usable {:?} vs acquire {:?}",
        usable.samples,
        p1.samples
    );

    // P2: both agent counts ran the load without errors.
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
    // The larger count against the baseline count.
    for what in ["cycles/s", "acquire", "release"] {
        with_baseline(figure(&figures, &format!("P2 {what} @{big}")));
    }
    for what in ["rss/agent", "cpu"] {
        assert!(
            figure(&figures, &format!("P2 {what} @{big}"))
                .baseline
                .is_some(),
            "P2 {what} @{big}: no baseline"
        );
    }
    // The same load with the store on tmpfs, against the disk run.
    let mem = figure(&figures, &format!("P2 cycles/s @{small} tmpfs store"));
    with_baseline(mem);
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

    // P4: the three wipes ran and the agent's verified the host empty.
    let p4 = figure(&figures, "P4");
    with_baseline(p4);
    with_baseline(figure(&figures, "P4 API wipe"));
    sane(figure(&figures, "P4 old data root deletion"), false);
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
    remove_state(sizes.prefix);
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
        [
            tls_front::UNIX,
            tls_front::FRONT,
            tls_front::DOCKERD_TLS,
            tls_front::PLAIN
        ]
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
    // Each path's row in each of the four tables, with positive numbers.
    for p in &report.paths {
        let rows: Vec<Vec<f64>> = text
            .lines()
            .filter(|l| l.starts_with(&format!("  {:<22} ", p.name)))
            .map(|l| l[25..].split_whitespace().map(number).collect())
            .collect();
        assert_eq!(rows.len(), 4, "{}: rows in\n{text}", p.name);
        for r in &rows {
            assert!(
                r.len() == 4 && r.iter().all(|v| *v > 0.0),
                "{}: {r:?}",
                p.name
            );
        }
    }
    // The ratios of the medians, as computed from the report.
    let (u, fr, d, p) = (
        report.path(tls_front::UNIX).unwrap(),
        report.path(tls_front::FRONT).unwrap(),
        report.path(tls_front::DOCKERD_TLS).unwrap(),
        report.path(tls_front::PLAIN).unwrap(),
    );
    for (label, top, base) in [
        ("front / unix socket:", fr, u),
        ("front / dockerd TLS:", fr, d),
        ("front / plain TCP proxy:", fr, p),
        ("plain TCP proxy / unix:", p, u),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} in\n{text}"));
        let shown: Vec<f64> = line
            .split_whitespace()
            .filter(|t| {
                t.trim_end_matches(',')
                    .strip_suffix('x')
                    .is_some_and(|n| n.parse::<f64>().is_ok())
            })
            .map(number)
            .collect();
        let want = [
            top.load.median / base.load.median,
            top.save.median / base.save.median,
        ];
        assert_eq!(shown.len(), 2, "{line}");
        for (s, w) in shown.iter().zip(want) {
            assert!(
                w.is_finite() && w > 0.0 && (s - w).abs() <= 0.005 + 1e-9,
                "{line}: {s} for {w}"
            );
        }
    }

    // The same figures as the suite prints them, each with its baseline.
    let figures = tls_front::figures(&report);
    let keys: Vec<&str> = figures.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "TLS front load vs unix",
            "TLS front load vs dockerd TLS",
            "TLS front load vs plain TCP",
            "TLS front save vs unix",
            "TLS front save vs dockerd TLS",
            "TLS front save vs plain TCP",
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
    for name in [
        "berth sync -> volume",
        "docker cp -> volume",
        "berth sync --from volume ->",
        "docker cp volume ->",
    ] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("  {name:<34} ")))
            .unwrap_or_else(|| panic!("no row {name:?} in\n{text}"));
        let v: Vec<f64> = row[37..].split_whitespace().map(number).collect();
        assert!(v.len() == 3 && v.iter().all(|x| *x > 0.0), "{row}");
    }
    for (label, want) in [
        ("to the volume:", report.ratio_to()),
        ("from the volume:", report.ratio_from()),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} in\n{text}"));
        let shown = number(line.split_whitespace().last().unwrap());
        assert!(
            want.is_finite() && want > 0.0 && (shown - want).abs() <= 0.005 + 1e-9,
            "{line}: {shown} for {want}"
        );
    }
}

#[test]
fn p1_with_the_hosts_in_memory_names_its_figures_so_and_leaves_no_memory_behind() {
    if !preflight() {
        return;
    }
    let sizes = Sizes {
        // Beside benchmark_suite_smoke's P1 (`bns1-`), not in its way.
        prefix: "bnm-",
        p1_hosts_in_memory: true,
        ..Sizes::smoke()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let figures = rt
        .block_on(bench::run(&[Scenario::P1], &sizes))
        .unwrap_or_else(|e| panic!("P1 with the hosts in memory failed: {e}"));
    println!("{}", bench::summary_table(&figures));
    let mut keys: Vec<String> = figures.iter().map(|f| f.key.clone()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "P1 (hosts in memory)",
            "P1 release (hosts in memory)",
            "P1 usable (hosts in memory)",
            "P1 vs one commit (hosts in memory)",
        ]
    );
    let p1 = figure(&figures, "P1 (hosts in memory)");
    with_baseline(p1);
    assert_eq!(p1.samples.len(), sizes.p1_cycles);
    assert!(
        p1.notes.iter().any(|n| n.contains("on tmpfs")),
        "{:?}",
        p1.notes
    );
    // The hosts' directories were on tmpfs, and went with the run.
    let memory =
        std::path::Path::new(bench::procs::MEMORY_ROOT).join(berth_testkit::test_prefix("bnm1"));
    assert!(!memory.exists(), "{} is left", memory.display());
    check_table(&figures);
    remove_state(sizes.prefix);
}

#[test]
fn postgres_store_benchmark_produces_its_figures() {
    if !preflight() {
        return;
    }
    let sizes = Sizes {
        // Its own, so that `remove_state` takes only this test's.
        prefix: "bnq-",
        ..Sizes::smoke()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let figures = rt
        .block_on(bench::run(&[Scenario::Pg], &sizes))
        .unwrap_or_else(|e| panic!("the pg benchmark failed: {e}"));
    println!("{}", bench::summary_table(&figures));
    let n = sizes.p2_agents[0];
    let mut keys: Vec<String> = figures.iter().map(|f| f.key.clone()).collect();
    keys.sort();
    let mut expected = vec![
        "P1 pg".to_owned(),
        format!("P2 cycles/s @{n} pg store"),
        format!("P2 acquire @{n} pg store"),
        "failover".to_owned(),
    ];
    expected.sort();
    assert_eq!(keys, expected, "the pg scenario's figures");
    with_baseline(figure(&figures, "P1 pg"));
    assert_eq!(figure(&figures, "P1 pg").samples.len(), sizes.p1_cycles);
    with_baseline(figure(&figures, &format!("P2 acquire @{n} pg store")));
    sane(
        figure(&figures, &format!("P2 cycles/s @{n} pg store")),
        false,
    );
    let f = figure(&figures, "failover");
    sane(f, true);
    assert_eq!(f.samples.len(), sizes.failover_runs);
    check_table(&figures);
    remove_state(sizes.prefix);
}

#[test]
fn cache_benchmark_reports_builds_with_and_without_the_cache() {
    if !preflight() {
        return;
    }
    let report = cache::run(&cache::Options::smoke()).expect("the benchmark runs");
    println!("{report}");
    for s in [report.cold, report.push, report.warm] {
        assert_eq!(s.n, 1);
        assert!(s.median.is_finite() && s.median > 0.0, "{s:?}");
    }
    // The build with the cache skipped the costly step.
    assert!(report.all_cached, "{report}");
    rows_and_speedup(
        &report.to_string(),
        &[
            "build on a fresh host, no cache",
            "push of the inline cache",
            "build on a fresh host, tenant's cache",
        ],
        report.speedup(),
    );
}

#[test]
fn capacity_benchmark_measures_churn_burst_and_decisions_against_baselines() {
    if !preflight() {
        return;
    }
    let sizes = Sizes {
        // Its own (its P3 baseline would be `bns3`, benchmark_suite_smoke's),
        // so that `remove_state` takes only this test's.
        prefix: "bnc-",
        ..Sizes::smoke()
    };
    let opts = &sizes.capacity;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let figures = rt
        .block_on(bench::run(&[Scenario::Capacity], &sizes))
        .unwrap_or_else(|e| panic!("the capacity benchmark failed: {e}"));
    println!("{}", bench::summary_table(&figures));
    let mut keys: Vec<&str> = figures.iter().map(|f| f.key.as_str()).collect();
    keys.sort_unstable();
    let burst = format!("capacity burst @{}", opts.burst);
    let decide = format!("capacity decide @{}", opts.decide_hosts[1]);
    let mut expected = vec!["capacity churn", burst.as_str(), decide.as_str()];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    check_table(&figures);

    // Every build waited for its host (one per build: single use), against
    // the boots of P3 in the same run.
    let churn = figure(&figures, "capacity churn");
    with_baseline(churn);
    assert_eq!(churn.samples.len(), opts.churn_builds);
    assert_eq!(
        churn.baseline.as_ref().unwrap().samples.len(),
        sizes.p3_runs
    );
    assert!(
        churn
            .notes
            .iter()
            .any(|n| n == &format!("{} distinct hosts served the builds", opts.churn_builds)),
        "{:?}",
        churn.notes
    );
    // A burst per round on each pool.
    let burst = figure(&figures, &burst);
    with_baseline(burst);
    assert_eq!(burst.samples.len(), opts.burst_rounds);
    assert_eq!(
        burst.baseline.as_ref().unwrap().samples.len(),
        opts.burst_rounds
    );
    // Ten windows of decisions with each host count.
    let decide = figure(&figures, &decide);
    with_baseline(decide);
    assert_eq!(decide.samples.len(), 10);
    assert_eq!(decide.checks.len(), 1);
    remove_state(sizes.prefix);
}

#[test]
fn mirror_benchmark_reports_pulls_across_the_link_and_from_the_warm_mirror() {
    if !preflight() {
        return;
    }
    let report = mirror::run(&mirror::Options::smoke()).expect("the benchmark runs");
    println!("{report}");
    // Each round: a direct, a cold and a warm pull, each pulled again.
    assert_eq!(report.noop.n, 3);
    for s in [report.direct, report.cold, report.warm] {
        assert_eq!(s.n, 1);
        assert!(s.median.is_finite() && s.median > 0.0, "{s:?}");
    }
    // The image is what was asked for: two layers of 1 MiB and the busybox.
    assert!(report.image_mib > 2.0, "{report}");
    // The direct pull went straight to the upstream, not through the
    // mirror, and carried the image across the shaped link of its own.
    assert!(report.direct_without_mirror, "{report}");
    assert!(report.direct_link_mib >= report.image_mib, "{report}");
    assert!(report.warm_from_mirror_only, "{report}");
    let text = report.to_string();
    rows_and_speedup(
        &text,
        &[
            "pull straight from the upstream (no mirror)",
            "pull through the cold mirror",
            "pull from the warm mirror",
            "pull of an image already there (fixed cost)",
        ],
        report.speedup(),
    );
    let verdict = if report.target_met() {
        "MET"
    } else {
        "NOT MET"
    };
    assert!(
        text.lines()
            .any(|l| l.starts_with("target: >= 5x") && l.ends_with(&format!(": {verdict}"))),
        "{text}"
    );
    let over_cold = text
        .lines()
        .find(|l| l.starts_with("over the cold mirror"))
        .unwrap_or_else(|| panic!("no ratio over the cold mirror in\n{text}"));
    assert!(
        shown_as(
            number(over_cold.rsplit(' ').next().unwrap()),
            report.speedup_over_cold()
        ),
        "{over_cold}"
    );
}
