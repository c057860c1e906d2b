//! The `berth` CLI against a real `berth-coordinator` process: exit codes and
//! messages for the common mistakes. No hosts are needed for these.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Coordinator {
    child: Child,
    addr: String,
    ca: PathBuf,
    token: PathBuf,
    _dir: PathBuf,
}

impl Coordinator {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("berth-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr_file = dir.join("addr");
        let token = berth_tls::token::generate();
        let token_file = dir.join("token");
        std::fs::write(&token_file, &token).unwrap();
        std::fs::write(
            dir.join("tenants"),
            berth_tls::Tenants::line("ci", &token, true),
        )
        .unwrap();
        std::fs::write(
            dir.join("join.sha256"),
            berth_tls::TokenHash::of(&berth_tls::token::generate()).to_hex(),
        )
        .unwrap();
        let child = Command::new(berth_testkit::bin("berth-coordinator"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--ops-listen",
                "127.0.0.1:0",
                "--addr-file",
            ])
            .arg(&addr_file)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--tenants")
            .arg(dir.join("tenants"))
            .arg("--join-token-hash-file")
            .arg(dir.join("join.sha256"))
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
            ca: dir.join("state").join("ca.pem"),
            token: token_file,
            _dir: dir,
        }
    }

    fn berth(&self, args: &[&str]) -> Output {
        let (ca, token) = (self.ca.to_string_lossy(), self.token.to_string_lossy());
        berth(
            &[
                "--coordinator",
                &self.addr,
                "--ca",
                &ca,
                "--token-file",
                &token,
            ],
            args,
        )
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
    Command::new(berth_testkit::bin("berth"))
        .args(pre)
        .args(args)
        .env_remove("BERTH_LEASE_ID")
        .env_remove("BERTH_COORDINATOR")
        .env_remove("BERTH_CA")
        .env_remove("BERTH_TOKEN")
        .env_remove("BERTH_TOKEN_FILE")
        .env_remove("DOCKER_CERT_PATH")
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
fn missing_or_wrong_credentials_are_named_with_exit_code_7() {
    let c = Coordinator::start("creds");
    let (ca, token) = (c.ca.to_string_lossy(), c.token.to_string_lossy());
    let addr = c.addr.as_str();
    // No token file where it is looked for.
    expect(
        &berth(
            &[
                "--coordinator",
                addr,
                "--ca",
                &ca,
                "--token-file",
                "/nonexistent/token",
            ],
            &["hosts"],
        ),
        7,
        "tenant token",
    );
    // A token the coordinator does not know, from the environment.
    let o = Command::new(berth_testkit::bin("berth"))
        .args(["--coordinator", addr, "--ca", &ca, "hosts"])
        .env_remove("BERTH_TOKEN_FILE")
        .env("BERTH_TOKEN", berth_tls::token::generate())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    expect(&o, 7, "invalid tenant token");
    // No CA to check the coordinator against.
    expect(
        &berth(
            &[
                "--coordinator",
                addr,
                "--ca",
                "/nonexistent/ca.pem",
                "--token-file",
                &token,
            ],
            &["hosts"],
        ),
        7,
        "CA",
    );
    // A CA the coordinator's certificate does not chain to.
    let (other, _) = berth_tls::Ca::generate("other").unwrap();
    let other_ca = c._dir.join("other-ca.pem");
    std::fs::write(&other_ca, other.cert_pem()).unwrap();
    let other_ca = other_ca.to_string_lossy();
    let o = berth(
        &[
            "--coordinator",
            addr,
            "--ca",
            &other_ca,
            "--token-file",
            &token,
        ],
        &["hosts"],
    );
    expect(&o, 5, "cannot reach the coordinator");
    // A plaintext URL is refused outright.
    expect(
        &berth(
            &[
                "--coordinator",
                &format!("http://{addr}"),
                "--ca",
                &ca,
                "--token-file",
                &token,
            ],
            &["hosts"],
        ),
        1,
        "TLS only",
    );
}
