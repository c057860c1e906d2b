//! The `berth` CLI against a real `berth-coordinator` process: exit codes and
//! messages for the common mistakes. No hosts are needed for these.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Coordinator {
    child: Child,
    addr: String,
    _dir: PathBuf,
}

impl Coordinator {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("berth-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr_file = dir.join("addr");
        let child = Command::new(env!("CARGO_BIN_EXE_berth-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--addr-file"])
            .arg(&addr_file)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break a.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "coordinator did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    fn berth(&self, args: &[&str]) -> Output {
        berth(&["--coordinator", &self.addr], args)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn berth(pre: &[&str], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(pre)
        .args(args)
        .env_remove("BERTH_LEASE_ID")
        .env_remove("BERTH_COORDINATOR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn expect(o: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn common_mistakes_get_clear_messages_and_exit_codes() {
    let c = Coordinator::start("mistakes");
    expect(
        &c.berth(&["acquire", "--build", "", "--wait", "0s"]),
        2,
        "build_id",
    );
    expect(
        &c.berth(&["acquire", "--build", "b1", "--wait", "0s"]),
        3,
        "no host became ready",
    );
    expect(
        &c.berth(&["get", "--lease", "nope"]),
        2,
        "not a berth lease id",
    );
    expect(
        &c.berth(&["release", "--lease", "4f1c2a3b-0000-4000-8000-000000000001"]),
        4,
        "not found",
    );
    // No lease given and none in the environment: clap says what is missing.
    expect(&c.berth(&["release"]), 2, "--lease");
    let hosts = c.berth(&["hosts"]);
    assert!(hosts.status.success());
    assert!(String::from_utf8_lossy(&hosts.stdout).starts_with("HOST"));
}

#[test]
fn an_unreachable_coordinator_is_named() {
    // Port 9 on loopback: nothing listens there.
    let o = berth(&["--coordinator", "127.0.0.1:9"], &["hosts"]);
    expect(&o, 5, "cannot reach the coordinator at http://127.0.0.1:9");
}
