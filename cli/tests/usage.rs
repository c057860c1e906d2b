//! The `berth` binary on its own, without a coordinator: usage errors and an
//! unreachable coordinator give their documented exit codes and a message
//! that names the problem. (The CLI against a real coordinator is tested in
//! `tests/tests/cli_errors.rs` and the end-to-end tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};

fn berth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
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
fn bad_usage_exits_2_naming_what_is_missing() {
    let o = berth(&["--version"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("berth "));
    expect(&berth(&["acquire"]), 2, "--build");
    expect(&berth(&["no-such-command"]), 2, "no-such-command");
}

#[test]
fn an_unreachable_coordinator_is_named_with_exit_code_5() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = berth_tls::Ca::generate("test").unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, berth_tls::token::generate()).unwrap();
    // Port 9 on loopback: nothing listens there.
    let o = berth(&[
        "--coordinator",
        "127.0.0.1:9",
        "--ca",
        ca_path.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "hosts",
    ]);
    expect(&o, 5, "cannot reach the coordinator at https://127.0.0.1:9");
}
