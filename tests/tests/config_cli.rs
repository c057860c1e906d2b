//! Both daemons take an optional TOML file (`--config FILE`, keys = long
//! flag names) under their flags and BERTH_* twins, and refuse a bad
//! configuration at start with one line on stderr that names the setting,
//! and exit status 2, before they touch anything. The packaged agent.toml
//! is one such file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use berth_testkit::*;

/// A test's own directory of configuration files, removed when the test
/// passed (a failing one keeps it for whoever reads the failure).
struct Files(PathBuf);

impl Files {
    fn new(name: &str) -> Self {
        let d = Path::new(TEST_STATE_ROOT).join(test_prefix(name));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        remove_dirs_if_passed(&[&self.0]);
    }
}

/// Runs `cmd` with no BERTH_* from the test's environment; expects exit 2
/// and exactly one line on stderr containing every `want`.
fn refused(mut cmd: Command, want: &[&str]) {
    for (k, _) in std::env::vars() {
        if k.starts_with("BERTH_") && k != "BERTH_TEST_TAG" {
            cmd.env_remove(k);
        }
    }
    let o = run(&mut cmd);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}\n{err}", o.status);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    for w in want {
        assert!(err.contains(w), "{w:?} missing from {err:?}");
    }
}

fn agent() -> Command {
    Command::new(bin("berth-agent"))
}

/// The coordinator, with a state dir (under `files`) that a refused start
/// must not create.
fn coordinator(files: &Files) -> Command {
    let mut c = Command::new(bin("berth-coordinator"));
    c.arg("--state-dir").arg(files.0.join("never-created"));
    c
}

#[test]
fn bad_agent_configuration_is_one_line_and_exit_2() {
    let files = Files::new("cfga");
    let mut c = agent();
    c.args(["--config", "/nonexistent/agent.toml"]);
    refused(c, &["/nonexistent/agent.toml", "cannot read it"]);

    let f = files.file("agent-port.toml", "front-port = \"twenty\"\n");
    let mut c = agent();
    c.arg("--config").arg(&f);
    refused(c, &["front-port", "twenty", &f.display().to_string()]);

    let f = files.file("agent-key.toml", "frontport = 2376\n");
    let mut c = agent();
    c.arg("--config").arg(&f);
    refused(c, &["unknown setting \"frontport\""]);

    let f = files.file("agent-bool.toml", "recycle = \"yes\"\n");
    let mut c = agent();
    c.arg("--config").arg(&f);
    refused(c, &["recycle", "true or false"]);

    // Parses, but is not a safe prefix: the agent's own validation.
    let f = files.file("agent-prefix.toml", "prefix = \"a b\"\n");
    let mut c = agent();
    c.arg("--config").arg(&f);
    refused(c, &["invalid configuration", "prefix \"a b\""]);

    // A bad flag is the same one line.
    let mut c = agent();
    c.args(["--status-listen", "nowhere"]);
    refused(c, &["--status-listen", "nowhere"]);

    // Through BERTH_CONFIG too.
    let f = files.file("agent-coord.toml", "coordinator = \"http://x:1\"\n");
    let mut c = agent();
    c.env("BERTH_CONFIG", &f);
    refused(
        c,
        &["coordinator URL \"http://x:1\" must start with https://"],
    );
}

#[test]
fn bad_coordinator_configuration_is_one_line_and_exit_2() {
    let files = Files::new("cfgc");
    let f = files.file("coord-listen.toml", "listen = \"nowhere\"\n");
    let mut c = coordinator(&files);
    c.arg("--config").arg(&f);
    refused(c, &["listen", "nowhere"]);

    let f = files.file("coord-toml.toml", "listen = \n");
    let mut c = coordinator(&files);
    c.arg("--config").arg(&f);
    refused(c, &["not valid TOML"]);

    let f = files.file(
        "coord-list.toml",
        "tls-san = [\"a\", 1]\nmax-ttl = [\"1h\"]\n",
    );
    let mut c = coordinator(&files);
    c.arg("--config").arg(&f);
    refused(c, &["max-ttl", "takes one value"]);

    // The file says max-ttl = "forever" (bad), but the environment twin
    // overrides it, so what fails is the next problem: ec2 without a pool.
    let f = files.file(
        "coord-override.toml",
        "max-ttl = \"forever\"\nprovider = \"ec2\"\n",
    );
    let mut c = coordinator(&files);
    c.arg("--config").arg(&f).env("BERTH_MAX_TTL", "1h");
    for (k, _) in std::env::vars() {
        if k.starts_with("BERTH_") && k != "BERTH_TEST_TAG" {
            c.env_remove(k);
        }
    }
    c.env("BERTH_MAX_TTL", "1h");
    let o = run(&mut c);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--provider ec2 needs --pool-name") && !stderr(&o).contains("max-ttl"),
        "{}",
        stderr(&o)
    );
    // And a flag overrides the file.
    let mut c = coordinator(&files);
    c.arg("--config").arg(&f).args(["--max-ttl", "2h"]);
    refused(c, &["--provider ec2 needs --pool-name"]);
    assert!(
        !files.0.join("never-created").exists(),
        "a refused start created its state dir"
    );
}

#[test]
fn the_packaged_agent_toml_is_accepted() {
    // `--help` parses the whole configuration (file included) first; a bad
    // key or value in the file would exit 2 instead.
    let toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packer/files/agent.toml");
    let o = run(agent().arg("--config").arg(&toml).arg("--help"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("--status-listen"), "{}", stdout(&o));
}
