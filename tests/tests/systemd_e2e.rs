//! Both daemons behave as `Type=notify` services: started with
//! `NOTIFY_SOCKET` pointing at a datagram socket this test binds (standing
//! in for systemd), each sends READY=1 once it serves, WATCHDOG=1 at half of
//! `WATCHDOG_USEC`, and STOPPING=1 when SIGTERM starts its shutdown. The
//! agent's dockerd never sees the agent's notification socket (it speaks
//! the protocol too and would report the agent's unit ready or stopping).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The socket systemd would listen on, bound by the test.
struct FakeSystemd {
    sock: UnixDatagram,
    path: PathBuf,
}

impl FakeSystemd {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        FakeSystemd { sock, path }
    }

    /// The next datagram, or None after `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Reads datagrams until one has the line `want`; returns every one read.
    fn wait_for(&self, want: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(m) = self.next(left) {
                let done = m.lines().any(|l| l == want);
                seen.push(m);
                if done {
                    return seen;
                }
            }
        }
        panic!("no {want} within {timeout:?}; got {seen:?}");
    }
}

/// Kills what the test started and sweeps its prefix, also on failure.
struct Guard {
    prefix: String,
    children: Vec<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        sweep(&self.prefix);
        let (state, run) = dirs(&self.prefix);
        remove_dirs_if_passed(&[&state, &run]);
    }
}

fn sigterm(c: &Child) {
    kill(
        Pid::from_raw(i32::try_from(c.id()).unwrap()),
        Signal::SIGTERM,
    )
    .unwrap();
}

fn wait_exit(c: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    wait_for("the daemon to exit", timeout, || c.try_wait().unwrap())
}

/// A coordinator with fresh credentials under `dir`; returns the child,
/// its gRPC address and the join token file.
fn coordinator(dir: &Path, notify: Option<&Path>) -> (Child, std::net::SocketAddr, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let admin = berth_tls::token::generate();
    let join = berth_tls::token::generate();
    // Secrets as an operator keeps them: the agent refuses a join token
    // file that others may read.
    let write = |name: &str, data: String| {
        berth_tls::files::write_private(&dir.join(name), data.as_bytes()).unwrap()
    };
    write("tenants", berth_tls::Tenants::line("t", &admin, true));
    write("join.sha256", berth_tls::TokenHash::of(&join).to_hex());
    write("join.token", join);
    let addr_file = dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = Command::new(bin("berth-coordinator"));
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--ops-listen")
        .arg("127.0.0.1:0")
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--state-dir")
        .arg(dir.join("coordinator"))
        .arg("--tenants")
        .arg(dir.join("tenants"))
        .arg("--join-token-hash-file")
        .arg(dir.join("join.sha256"))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("coordinator.log")).unwrap());
    if let Some(sock) = notify {
        // 200 ms: pings every 100 ms.
        cmd.env("NOTIFY_SOCKET", sock)
            .env("WATCHDOG_USEC", "200000");
    }
    let child = cmd.spawn().expect("cannot start berth-coordinator");
    let addr = wait_for("the coordinator address", Duration::from_secs(30), || {
        std::fs::read_to_string(&addr_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    (child, addr, dir.join("join.token"))
}

#[test]
fn coordinator_reports_ready_watchdog_and_stopping() {
    let prefix = test_prefix("bsc-");
    sweep(&prefix);
    let (dir, _) = dirs(&prefix);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let systemd = FakeSystemd::bind(&dir);
    let mut guard = Guard {
        prefix: prefix.clone(),
        children: Vec::new(),
    };
    let (child, addr, _) = coordinator(&dir, Some(&systemd.path));
    guard.children.push(child);

    let seen = systemd.wait_for("READY=1", Duration::from_secs(30));
    assert!(
        seen.last().unwrap().contains("STATUS=serving gRPC on"),
        "{seen:?}"
    );
    // READY means serving: the gRPC port takes connections now.
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect("READY=1 was sent before the gRPC listener took connections");
    // WATCHDOG_USEC=200ms: a ping at least every 100 ms or so.
    let pings = systemd.wait_for("WATCHDOG=1", Duration::from_secs(5));
    assert!(pings.iter().all(|m| !m.contains("STOPPING=1")), "{pings:?}");
    systemd.wait_for("WATCHDOG=1", Duration::from_secs(5));

    sigterm(&guard.children[0]);
    let seen = systemd.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(!seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    let status = wait_exit(&mut guard.children[0], Duration::from_secs(20));
    assert!(status.success(), "coordinator exited with {status}");
}

#[test]
fn agent_reports_ready_and_stopping_and_keeps_the_socket_from_dockerd() {
    if !preflight() {
        return;
    }
    let prefix = test_prefix("bsa-");
    sweep(&prefix);
    let (dir, run_dir) = dirs(&prefix);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let systemd = FakeSystemd::bind(&dir);
    let mut guard = Guard {
        prefix: prefix.clone(),
        children: Vec::new(),
    };
    let (coord, addr, join_token) = coordinator(&dir, None);
    guard.children.push(coord);

    let mut agent = Command::new(bin("berth-agent"))
        .arg("--coordinator")
        .arg(format!("https://{addr}"))
        .arg("--ca")
        .arg(dir.join("coordinator").join("ca.pem"))
        .arg("--join-token-file")
        .arg(&join_token)
        .arg("--state-dir")
        .arg(dir.join("hosts"))
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--prefix")
        .arg(&prefix)
        .env("NOTIFY_SOCKET", &systemd.path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .expect("cannot start berth-agent");
    let stdout = agent.stdout.take().unwrap();
    guard.children.push(agent);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("READY ") {
                let _ = tx.send(line);
            }
        }
    });

    let seen = systemd.wait_for("READY=1", Duration::from_secs(60));
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("READY=1 without the READY line on stdout");
    let host_id = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("host_id="))
        .unwrap()
        .to_owned();
    assert!(
        seen.last()
            .unwrap()
            .contains(&format!("STATUS=host {host_id} ready")),
        "{seen:?}"
    );
    systemd.wait_for("WATCHDOG=1", Duration::from_secs(5));

    // dockerd, the agent's child, got none of systemd's variables.
    let pidfile = run_dir.join(&host_id).join("dockerd.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let vars: Vec<&str> = environ.split('\0').collect();
    assert!(
        vars.iter().any(|v| v.starts_with("PATH=")),
        "dockerd's environment could not be read: {vars:?}"
    );
    for name in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="] {
        assert!(
            !vars.iter().any(|v| v.starts_with(name)),
            "dockerd inherited {name}: {vars:?}"
        );
    }

    sigterm(&guard.children[1]);
    systemd.wait_for("STOPPING=1", Duration::from_secs(10));
    let status = wait_exit(&mut guard.children[1], Duration::from_secs(60));
    assert!(
        status.success(),
        "agent exited with {status}; log:\n{}",
        std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
    );
    sigterm(&guard.children[0]);
    wait_exit(&mut guard.children[0], Duration::from_secs(20));
}
