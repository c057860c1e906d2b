//! The tenants' build cache end to end: `berth up` runs a registry (CNCF
//! distribution) with token authentication whose tokens only the
//! coordinator signs; `berth acquire` exports `BERTH_CACHE_REPO` (the
//! tenant's namespace) and `DOCKER_CONFIG` (the lease directory, holding the
//! lease's login). Tenant A builds with BuildKit's inline cache and pushes
//! it; tenant B's lease can neither pull nor push A's repository (while its
//! own works); A's login opens nothing once A's lease ended, and nothing of
//! it is left in the lease directory; a later lease of A on a fresh host
//! builds with every step cached.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use berth_testkit::*;

/// BuildKit (Debian's 20.10 CLI has it built in) on `lease`, with the
/// lease's docker configuration (its cache login). BuildKit's client
/// fetches registry tokens itself (Go's default roots): the pool CA in
/// the lease directory is added to them the documented way.
fn docker(lease: &LeaseEnv) -> Command {
    let mut c = lease.docker_at(Path::new(DEBIAN_DOCKER_CLI));
    c.env("DOCKER_BUILDKIT", "1")
        .env("DOCKER_CONFIG", lease.get("DOCKER_CONFIG"))
        .env(
            "SSL_CERT_DIR",
            format!("/etc/ssl/certs:{}", lease.cert_dir().display()),
        )
        .env_remove("SSL_CERT_FILE");
    c
}

/// A context with a costly, deterministic step.
fn context(dir: &Path) {
    busybox_context(dir, "cached\n");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         RUN sh -c 'i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo berth-costly $i > /costly.txt'\n\
         COPY index.html /www/index.html\n\
         CMD [\"cat\", \"/costly.txt\"]\n",
    )
    .unwrap();
}

/// Builds `ctx` as `image` with the inline cache from `image`; returns
/// BuildKit's plain progress output.
fn build(lease: &LeaseEnv, ctx: &Path, image: &str) -> String {
    let o = ok(
        run(docker(lease)
            .args([
                "build",
                "--progress=plain",
                "--build-arg",
                "BUILDKIT_INLINE_CACHE=1",
                "--cache-from",
                image,
                "-t",
                image,
            ])
            .arg(ctx)),
        "docker build with the inline cache",
    );
    format!("{}{}", stdout(&o), stderr(&o))
}

/// Whether BuildKit's step whose header contains `marker` was CACHED.
fn step_cached(progress: &str, marker: &str) -> bool {
    let Some(id) = progress
        .lines()
        .find(|l| l.contains(marker) && l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
    else {
        return false;
    };
    progress.lines().any(|l| l.trim() == format!("{id} CACHED"))
}

/// `curl` at the coordinator's token endpoint with a login; the HTTP
/// status code.
fn token_status(pool: &Pool, endpoint: &str, login: &str, scope: &str) -> String {
    let o = run(Command::new("curl")
        .env_remove("CURL_CA_BUNDLE")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(pool.ca_pem_path())
        .args(["-u", login])
        .arg(format!(
            "https://{endpoint}/token?service=berth-cache&scope={scope}"
        )));
    stdout(&o)
}

/// The lease's login from its docker configuration.
fn login(lease: &LeaseEnv, registry: &str) -> String {
    let config = Path::new(lease.get("DOCKER_CONFIG")).join("config.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let auth = v["auths"][registry]["auth"].as_str().unwrap();
    String::from_utf8(STANDARD.decode(auth).unwrap()).unwrap()
}

#[test]
fn a_tenants_cache_serves_its_next_fresh_host_and_no_other_tenant() {
    if !preflight() {
        return;
    }
    let b_token = berth_tls::token::generate();
    let pool = Pool::start_with("cch-", 2, &[], |state| {
        std::fs::write(
            state.join("tenants"),
            berth_tls::Tenants::line("teamb", &b_token, false),
        )
        .unwrap();
    });
    let b_token_file = pool.state_dir.join("teamb-token");
    std::fs::write(&b_token_file, &b_token).unwrap();

    // Tenant A (`local`): its namespace, its login in the lease directory.
    let a1 = pool.acquire("cache-a1", "10m", "1m");
    let repo_a = a1.get("BERTH_CACHE_REPO").to_owned();
    let (registry, ns_a) = repo_a.split_once('/').unwrap();
    assert_eq!(ns_a, "local");
    assert_eq!(a1.get("DOCKER_CONFIG"), a1.cert_dir());
    let config = Path::new(a1.get("DOCKER_CONFIG")).join("config.json");
    let mode = std::fs::metadata(&config).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let endpoint = {
        let (host, _) = registry.rsplit_once(':').unwrap();
        format!("{host}:5002")
    };
    let a1_login = login(&a1, registry);
    let image_a = format!("{repo_a}/app:cache");

    let ctx = pool.state_dir.join("ctx");
    context(&ctx);
    let first = build(&a1, &ctx, &image_a);
    assert!(
        !step_cached(&first, "berth-costly"),
        "a first build on a fresh host found a cache:\n{first}"
    );
    ok(
        run(docker(&a1).args(["push", &image_a])),
        "push of A's cache",
    );

    // Tenant B: a lease of its own, its own namespace.
    let b = {
        let o = ok(
            pool.berth_as(
                &b_token_file,
                &[
                    "acquire", "--build", "cache-b", "--ttl", "10m", "--wait", "1m",
                ],
            ),
            "acquire as teamb",
        );
        LeaseEnv::parse(&stdout(&o))
    };
    let repo_b = b.get("BERTH_CACHE_REPO").to_owned();
    assert_eq!(repo_b, format!("{registry}/teamb"));
    // B cannot read A's cache...
    let o = run(docker(&b).args(["pull", &image_a]));
    assert!(!o.status.success(), "B pulled A's cache");
    let why = stderr(&o).to_lowercase();
    assert!(
        why.contains("unauthorized") || why.contains("denied"),
        "{why}"
    );
    // ... nor poison it: a push into A's namespace is refused.
    let ctx_b = pool.state_dir.join("ctx-b");
    busybox_context(&ctx_b, "poison\n");
    let poison = format!("{repo_a}/app:cache");
    ok(
        run(docker(&b).args(["build", "-q", "-t", &poison]).arg(&ctx_b)),
        "B's build",
    );
    let o = run(docker(&b).args(["push", &poison]));
    assert!(!o.status.success(), "B pushed into A's namespace");
    // B's own namespace works, with the same client and login.
    let own = format!("{repo_b}/app:cache");
    ok(run(docker(&b).args(["tag", &poison, &own])), "tag");
    ok(
        run(docker(&b).args(["push", &own])),
        "B's push to its own namespace",
    );
    // The token endpoint grants B nothing of A's, and A what is A's.
    let b_login = login(&b, registry);
    let o = run(Command::new("curl")
        .env_remove("CURL_CA_BUNDLE")
        .args(["-s", "--cacert"])
        .arg(pool.ca_pem_path())
        .args(["-u", &b_login])
        .arg(format!(
            "https://{endpoint}/token?service=berth-cache&scope=repository:local/app:pull,push"
        )));
    let body: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let claims = body["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token for B: {body}"))
        .split('.')
        .nth(1)
        .unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!(claims["access"], serde_json::json!([]), "{claims}");
    assert_eq!(
        token_status(&pool, &endpoint, &a1_login, "repository:local/app:pull"),
        "200"
    );
    // A wrong password is refused.
    let forged = format!("{}:{}", a1.lease_id(), "00".repeat(32));
    assert_eq!(
        token_status(&pool, &endpoint, &forged, "repository:local/app:pull"),
        "401"
    );
    // A's cache in the registry holds A's push only.
    let tags = pool
        .state_dir
        .join("registries/cache/data/docker/registry/v2/repositories/local/app/_manifests/tags/cache/index/sha256");
    assert_eq!(
        std::fs::read_dir(&tags).unwrap().count(),
        1,
        "A's tag was overwritten"
    );

    // A's lease ends: its login opens nothing, and nothing of it is left.
    let host_a1 = a1.get("BERTH_HOST_ID").to_owned();
    let a1_dir = a1.cert_dir().to_owned();
    ok(
        pool.berth(&["release", "--lease", a1.lease_id()]),
        "release a1",
    );
    assert!(
        !Path::new(&a1_dir).join("config.json").exists(),
        "the cache login outlived the lease"
    );
    assert_eq!(
        token_status(&pool, &endpoint, &a1_login, "repository:local/app:pull"),
        "401"
    );

    // A later lease of A on a fresh host: every step comes from the cache.
    let a2 = pool.acquire("cache-a2", "10m", "1m");
    assert_ne!(a2.get("BERTH_HOST_ID"), host_a1);
    assert_eq!(a2.get("BERTH_CACHE_REPO"), repo_a);
    let images = stdout(&ok(run(docker(&a2).args(["images", "-q"])), "images"));
    assert!(
        images.trim().is_empty(),
        "a fresh host holds images: {images}"
    );
    let second = build(&a2, &ctx, &image_a);
    assert!(
        step_cached(&second, "berth-costly"),
        "the costly step was not cached on the fresh host:\n{second}"
    );
    assert!(
        step_cached(&second, "COPY index.html"),
        "the last step was not cached:\n{second}"
    );
    let out = stdout(&ok(
        run(docker(&a2).args(["run", "--rm", &image_a])),
        "run of the cached image",
    ));
    assert_eq!(out, "berth-costly 300000\n");
    ok(
        pool.berth(&["release", "--lease", a2.lease_id()]),
        "release a2",
    );
    ok(
        pool.berth_as(&b_token_file, &["release", "--lease", b.lease_id()]),
        "release b",
    );
}

/// The build cache's retention: tenants A and B push three tags of
/// ~512 KiB of distinct data each; with a pool-wide cap of 1100 KiB, and
/// B's own of 2 MiB in the tenants file (`cache-cap=2MiB`), a retention
/// pass (SIGUSR1 to `berth up`) removes A's least recently pushed tag alone,
/// garbage-collects, and the store shrinks; A's other tags and all of B's
/// still pull.
#[test]
fn a_tenant_over_its_cache_cap_loses_its_oldest_tags_and_no_other_tenant_anything() {
    if !preflight() {
        return;
    }
    let b_token = berth_tls::token::generate();
    let pool = Pool::start_with(
        "ccr-",
        2,
        &["--cache-tenant-cap", "1100KiB", "--cache-gc-interval", "0"],
        |state| {
            // teamb has its own, larger cap.
            let line = berth_tls::Tenants::line("teamb", &b_token, false);
            std::fs::write(
                state.join("tenants"),
                format!("{} cache-cap=2MiB\n", line.trim_end()),
            )
            .unwrap();
        },
    );
    let b_token_file = pool.state_dir.join("teamb-token");
    std::fs::write(&b_token_file, &b_token).unwrap();
    let plain = |lease: &LeaseEnv| {
        let mut c = lease.docker();
        c.env("DOCKER_CONFIG", lease.get("DOCKER_CONFIG"));
        c
    };
    // An image of one layer of 512 KiB that compresses to nothing less.
    let push = |lease: &LeaseEnv, image: &str, seed: u64| {
        let ctx = pool.state_dir.join(format!("ctx-{seed}"));
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(
            ctx.join("blob"),
            berth_tests::registry::pseudo_random(seed, 512 * 1024),
        )
        .unwrap();
        std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY blob /blob\n").unwrap();
        ok(
            run(plain(lease).args(["build", "-q", "-t", image]).arg(&ctx)),
            "docker build",
        );
        ok(run(plain(lease).args(["push", image])), "docker push");
    };

    let a = pool.acquire("ret-a", "10m", "1m");
    let repo_a = a.get("BERTH_CACHE_REPO").to_owned();
    let a_tags: Vec<String> = (1..=3).map(|i| format!("{repo_a}/app:t{i}")).collect();
    for (i, image) in a_tags.iter().enumerate() {
        push(&a, image, i as u64 + 1);
    }
    let b = {
        let o = ok(
            pool.berth_as(
                &b_token_file,
                &[
                    "acquire", "--build", "ret-b", "--ttl", "10m", "--wait", "1m",
                ],
            ),
            "acquire as teamb",
        );
        LeaseEnv::parse(&stdout(&o))
    };
    // teamb holds 1.5 MiB: over the pool-wide cap, under its own.
    let b_images: Vec<String> = (4..=6)
        .map(|i| format!("{}/app:b{i}", b.get("BERTH_CACHE_REPO")))
        .collect();
    for (i, image) in b_images.iter().enumerate() {
        push(&b, image, i as u64 + 4);
    }

    let data = pool.state_dir.join("registries/cache/data");
    let du = || -> u64 {
        let o = ok(run(Command::new("du").arg("-sb").arg(&data)), "du");
        stdout(&o)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = du();
    let up = pool.up_pid().expect("berth up's pid");
    nix::sys::signal::kill(up, nix::sys::signal::Signal::SIGUSR1).unwrap();
    let line = wait_for("the retention pass", Duration::from_secs(120), || {
        pool.log()
            .lines()
            .find(|l| l.contains("build cache retention: bytes per tenant"))
            .map(str::to_owned)
    });
    assert!(line.contains("removed 1 tags [\"local/app:t1\"]"), "{line}");
    assert!(line.contains("garbage-collected (ok)"), "{line}");
    let after = du();
    eprintln!("{line}\nstore: {before} -> {after} bytes");
    assert!(
        after + 400 * 1024 < before,
        "the store did not shrink by A's oldest layer: {before} -> {after} bytes"
    );

    // A's oldest tag is gone, its newer ones and B's stay.
    let gone = run(plain(&a).args(["pull", &a_tags[0]]));
    assert!(!gone.status.success(), "A's oldest tag still pulls");
    let why = stderr(&gone).to_lowercase();
    assert!(
        why.contains("not found") || why.contains("unknown"),
        "{why}"
    );
    ok(run(plain(&a).args(["rmi", &a_tags[1], &a_tags[2]])), "rmi");
    for image in &a_tags[1..] {
        ok(
            run(plain(&a).args(["pull", image])),
            "pull of A's newer tag",
        );
    }
    ok(run(plain(&b).arg("rmi").args(&b_images)), "rmi of B's tags");
    for image in &b_images {
        ok(run(plain(&b).args(["pull", image])), "pull of B's tag");
    }

    // A pass with nothing over the cap stops nothing.
    nix::sys::signal::kill(up, nix::sys::signal::Signal::SIGUSR1).unwrap();
    wait_for("the second pass", Duration::from_secs(60), || {
        pool.log()
            .contains("build cache retention: nothing to reclaim")
            .then_some(())
    });
    ok(
        pool.berth(&["release", "--lease", a.lease_id()]),
        "release a",
    );
    ok(
        pool.berth_as(&b_token_file, &["release", "--lease", b.lease_id()]),
        "release b",
    );
}
