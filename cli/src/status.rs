//! `berth status` and the output formats of `berth acquire`: what CI
//! authors and operators see of the pool without reading logs.
//!
//! `acquire --format`: `env` (the default: `export` lines for `eval`),
//! `json` (one object), or `docker-context` (a docker context named after
//! the lease, created with the stock docker CLI; its name is printed, so
//! `docker --context "$(berth acquire --format docker-context ...)" ps`
//! works). Progress while waiting goes to stderr only.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use berth_proto::v1 as pb;

use super::CliError;

/// How `berth acquire` prints the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `export` lines for `eval "$(berth acquire ...)"`.
    Env,
    /// One JSON object.
    Json,
    /// Create a docker context named after the lease; print its name.
    DockerContext,
}

/// Bound on one `docker context` command.
pub const DOCKER_CONTEXT_TIMEOUT: Duration = Duration::from_secs(30);

/// The docker context `--format docker-context` makes for a lease.
pub fn context_name(lease_id: &str) -> String {
    format!("berth-{lease_id}")
}

/// The lease as one JSON object.
pub fn json(l: &pb::Lease, cert_dir: &Path) -> String {
    let v = serde_json::json!({
        "lease_id": l.lease_id,
        "build_id": l.build_id,
        "host_id": l.host_id,
        "host_addr": l.host_addr,
        "docker_host": l.docker_host,
        "docker_tls_verify": "1",
        "docker_cert_path": cert_dir.to_string_lossy(),
        "deadline": super::format_time(l.deadline.as_ref()),
        "docker_context": context_name(&l.lease_id),
    });
    format!("{v}\n")
}

async fn docker(args: &[&str]) -> Result<std::process::Output, CliError> {
    let run = tokio::process::Command::new("docker")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(DOCKER_CONTEXT_TIMEOUT, run).await {
        Err(_) => Err(CliError::Other(format!(
            "`docker {}` took longer than {DOCKER_CONTEXT_TIMEOUT:?}",
            args.join(" ")
        ))),
        Ok(Err(e)) => Err(CliError::Other(format!(
            "cannot run the docker CLI for --format docker-context: {e}"
        ))),
        Ok(Ok(o)) => Ok(o),
    }
}

/// Creates (or replaces) the lease's docker context; returns its name.
pub async fn create_context(l: &pb::Lease, cert_dir: &Path) -> Result<String, CliError> {
    let name = context_name(&l.lease_id);
    let d = cert_dir.to_string_lossy();
    let endpoint = format!(
        "host={},ca={d}/ca.pem,cert={d}/cert.pem,key={d}/key.pem",
        l.docker_host
    );
    // A retried acquire of the same build gets the same lease: replace.
    let _ = docker(&["context", "rm", "-f", &name]).await;
    let o = docker(&[
        "context",
        "create",
        &name,
        "--description",
        &format!("berth lease {} (build {})", l.lease_id, l.build_id),
        "--docker",
        &endpoint,
    ])
    .await?;
    if !o.status.success() {
        return Err(CliError::Other(format!(
            "docker context create {name} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(name)
}

/// Removes the lease's docker context if there is one (release).
pub async fn remove_context(lease_id: &str) {
    let name = context_name(lease_id);
    if let Ok(o) = docker(&["context", "inspect", &name]).await
        && o.status.success()
        && let Ok(o) = docker(&["context", "rm", "-f", &name]).await
        && !o.status.success()
    {
        eprintln!(
            "berth: cannot remove docker context {name}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
}

/// `--progress-every`: a duration of at least 100 ms.
pub fn parse_progress_every(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s}: must be at least 100ms"));
    }
    Ok(d)
}

/// One progress line for stderr while acquire waits: the build's lease as
/// LeaseService.Find reports it, the pool at a glance if the token may see
/// it.
pub fn progress_line(
    build: &str,
    waited: Duration,
    lease: Option<&pb::Lease>,
    stats: Option<&pb::PoolStatsResponse>,
) -> String {
    let mut s = format!(
        "berth: waiting for a host for build {build}: {}s",
        waited.as_secs()
    );
    match lease {
        Some(l) if l.queue_position > 0 => {
            let _ = write!(
                s,
                "; position {} of {} in tenant {}'s queue",
                l.queue_position, l.tenant_queued, l.tenant
            );
        }
        Some(l) if l.state == pb::LeaseState::Assigned as i32 => {
            let _ = write!(s, "; host {} chosen, waiting for its agent", l.host_id);
        }
        _ => {}
    }
    if let Some(st) = stats {
        let _ = write!(
            s,
            " (queue: {} builds waiting; {} hosts ready)",
            st.queue_length, st.hosts_offerable
        );
        if !st.store_error.is_empty() {
            let _ = write!(
                s,
                "; the coordinator's store is failing, no host is offered: {}",
                st.store_error
            );
        }
    }
    s
}

/// `berth status`: where the coordinator is and the pool at a glance.
pub fn describe(
    coordinator: &str,
    stats: Result<&pb::PoolStatsResponse, &tonic::Status>,
) -> String {
    let mut s = format!("coordinator  {coordinator}: reachable\n");
    match stats {
        Ok(st) => {
            if !st.store_error.is_empty() {
                let _ = writeln!(
                    s,
                    "store        FAILING: no host is offered until it works again ({})",
                    st.store_error
                );
            }
            let hosts: u32 = st.hosts_by_state.values().sum();
            let _ = writeln!(
                s,
                "hosts        {hosts} ({} connected, {} ready for a lease, {} draining)",
                st.hosts_connected, st.hosts_offerable, st.hosts_draining
            );
            let mut by: Vec<_> = st.hosts_by_state.iter().collect();
            by.sort();
            for (state, n) in by {
                let _ = writeln!(s, "  {state:<12} {n}");
            }
            let _ = writeln!(s, "queue        {} builds waiting", st.queue_length);
            let mut leases: Vec<_> = st.leases_by_state.iter().collect();
            leases.sort();
            let _ = writeln!(s, "leases");
            for (state, n) in leases {
                let _ = writeln!(s, "  {state:<12} {n}");
            }
            for r in &st.registries {
                s.push_str(&registry_line(r));
            }
        }
        Err(e) if e.code() == tonic::Code::PermissionDenied => {
            s.push_str("pool summary: needs an admin tenant's token\n");
        }
        Err(e) => {
            let _ = writeln!(s, "pool summary: {}", e.message());
        }
    }
    s
}

/// One line on a pool registry: does it answer, and its counters.
fn registry_line(r: &pb::RegistryStatus) -> String {
    let title = match r.name.as_str() {
        "cache" => "build cache",
        other => other,
    };
    let mut s = format!("{title:<12} {}: ", r.address);
    if r.answering {
        s.push_str("answers");
    } else {
        let _ = write!(s, "does not answer ({})", r.error);
    }
    if r.counters_read {
        let _ = write!(
            s,
            "; {} requests, {} hits{}, {} misses, {} served",
            r.requests,
            r.hits,
            ratio(r.hits, r.requests),
            r.misses,
            bytes(r.bytes_served)
        );
    } else if r.answering && !r.error.is_empty() {
        let _ = write!(s, "; {}", r.error);
    }
    s.push('\n');
    s
}

/// ` (75%)`, or nothing without requests.
fn ratio(part: u64, whole: u64) -> String {
    if whole == 0 {
        return String::new();
    }
    #[allow(clippy::cast_precision_loss)]
    let pct = part as f64 * 100.0 / whole as f64;
    format!(" ({pct:.0}%)")
}

/// Bytes for people: `512 B`, `1.5 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_what_docker_needs_and_is_one_line() {
        let l = pb::Lease {
            lease_id: "abc".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            host_addr: "198.18.0.2".into(),
            ..Default::default()
        };
        let out = json(&l, Path::new("/c/abc"));
        assert_eq!(out.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(v["docker_host"], "tcp://198.18.0.2:2376");
        assert_eq!(v["docker_cert_path"], "/c/abc");
        assert_eq!(v["docker_context"], "berth-abc");
    }

    #[test]
    fn the_progress_line_shows_the_builds_place_in_its_tenants_queue() {
        let queued = pb::Lease {
            state: pb::LeaseState::Queued as i32,
            tenant: "ci".into(),
            queue_position: 2,
            tenant_queued: 5,
            ..Default::default()
        };
        let stats = pb::PoolStatsResponse {
            queue_length: 9,
            hosts_offerable: 0,
            ..Default::default()
        };
        let line = progress_line("b1", Duration::from_secs(7), Some(&queued), Some(&stats));
        assert_eq!(
            line,
            "berth: waiting for a host for build b1: 7s; position 2 of 5 in tenant ci's queue (queue: 9 builds waiting; 0 hosts ready)"
        );
        let assigned = pb::Lease {
            state: pb::LeaseState::Assigned as i32,
            host_id: "h1".into(),
            ..Default::default()
        };
        assert_eq!(
            progress_line("b1", Duration::from_secs(8), Some(&assigned), None),
            "berth: waiting for a host for build b1: 8s; host h1 chosen, waiting for its agent"
        );
        assert_eq!(
            progress_line("b1", Duration::ZERO, None, None),
            "berth: waiting for a host for build b1: 0s"
        );
        assert_eq!(
            parse_progress_every("250ms"),
            Ok(Duration::from_millis(250))
        );
        for bad in ["0s", "10ms", "soon"] {
            assert!(parse_progress_every(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_summarises_the_pool() {
        let st = pb::PoolStatsResponse {
            hosts_by_state: [("ready".to_owned(), 2), ("leased".to_owned(), 1)].into(),
            hosts_connected: 3,
            hosts_offerable: 2,
            queue_length: 4,
            ..Default::default()
        };
        let out = describe("https://c:7070", Ok(&st));
        assert!(
            out.contains("hosts        3 (3 connected, 2 ready for a lease, 0 draining)"),
            "{out}"
        );
        assert!(out.contains("queue        4 builds waiting"), "{out}");
        assert!(!out.contains("mirror"), "{out}");
        assert!(!out.contains("store"), "{out}");
        let failing = pb::PoolStatsResponse {
            store_error: "store commit: No space left on device".into(),
            ..st
        };
        assert!(
            describe("c", Ok(&failing)).contains(
                "store        FAILING: no host is offered until it works again (store commit: No space left on device)"
            ),
            "{out}"
        );
        let denied = tonic::Status::permission_denied("x");
        assert!(describe("c", Err(&denied)).contains("needs an admin"));
    }

    #[test]
    fn status_says_whether_the_registries_answer() {
        let st = pb::PoolStatsResponse {
            registries: vec![
                pb::RegistryStatus {
                    name: "mirror".into(),
                    address: "198.18.0.1:5000".into(),
                    answering: true,
                    counters_read: true,
                    requests: 4,
                    hits: 3,
                    misses: 1,
                    bytes_served: 3 << 20,
                    ..Default::default()
                },
                pb::RegistryStatus {
                    name: "cache".into(),
                    address: "198.18.0.1:5001".into(),
                    error: "no answer within 2s".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let out = describe("c", Ok(&st));
        assert!(
            out.contains(
                "mirror       198.18.0.1:5000: answers; 4 requests, 3 hits (75%), 1 misses, \
                 3.0 MiB served\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("build cache  198.18.0.1:5001: does not answer (no answer within 2s)\n"),
            "{out}"
        );
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
