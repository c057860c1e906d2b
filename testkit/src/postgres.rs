//! A private PostgreSQL cluster for one test: Debian's `postgresql` (15)
//! binaries, `initdb` into a directory of the test's own, `pg_ctl start` on
//! a free loopback port, trust authentication on loopback only. As root
//! the cluster runs as the `postgres` user (PostgreSQL refuses root). The
//! guard stops it (`pg_ctl stop -m immediate`) and removes its directory;
//! [`Postgres::start`] first sweeps clusters with this tag whose test
//! process is gone.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::unistd::{Pid, Uid, User, chown};

use crate::{TEST_STATE_ROOT, ok, run, test_prefix, wait_for};

/// Where Debian installs PostgreSQL 15's server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The database of a pool started on [`crate::Store::Postgres`].
pub const POOL_DB: &str = "pool";

/// `--leader-ttl` of coordinators in tests: a killed leader's claim runs
/// out within seconds; long enough that a leader on a loaded machine is not
/// deposed by a slow renewal.
pub const LEADER_TTL: &str = "4s";

/// The `berth up` arguments that put the pool's coordinator on `url`, with
/// the store key file `key` (written by [`write_key`]).
pub fn up_args(url: &str, key: &Path) -> Vec<String> {
    [
        format!("--store={url}"),
        format!("--store-key-file={}", key.display()),
        format!("--leader-ttl={LEADER_TTL}"),
    ]
    .into_iter()
    .flat_map(|a| ["--coordinator-arg".to_owned(), a])
    .collect()
}

/// Writes a store key (the key that seals the pool CA's key) to `path`.
pub fn write_key(path: &Path) {
    std::fs::write(path, "5a".repeat(32)).unwrap();
}

/// A running cluster; stopped and removed on drop.
pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
}

fn pg_bin(name: &str) -> PathBuf {
    let p = Path::new(PG_BIN).join(name);
    assert!(
        p.exists(),
        "{} is missing: install Debian's postgresql package (scripts/deps.sh ensure_postgres)",
        p.display()
    );
    p
}

/// A command run as the cluster's owner.
fn as_owner(program: &Path) -> Command {
    if Uid::effective().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        // The owner may not be able to enter the test's working directory.
        c.current_dir("/");
        c
    } else {
        Command::new(program)
    }
}

fn prefix() -> String {
    test_prefix("pgsql-")
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Stops and removes clusters of this tag whose test process is gone.
pub fn sweep() {
    let prefix = prefix();
    let Ok(entries) = std::fs::read_dir(TEST_STATE_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() {
            continue; // its test is still running
        }
        let dir = e.path();
        let _ = run(as_owner(&pg_bin("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(dir.join("data")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl Postgres {
    /// Starts a fresh cluster and waits until it accepts connections.
    pub fn start() -> Self {
        sweep();
        let dir = Path::new(TEST_STATE_ROOT).join(format!(
            "{}{}-{}",
            prefix(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if Uid::effective().is_root() {
            let u = User::from_name("postgres")
                .unwrap()
                .expect("no `postgres` user: install Debian's postgresql package");
            chown(&dir, Some(u.uid), Some(u.gid)).unwrap();
        }
        let data = dir.join("data");
        ok(
            run(as_owner(&pg_bin("initdb")).arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])),
            "initdb",
        );
        let port = free_port();
        let pg = Self { dir, port };
        pg.pg_ctl_start();
        pg
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c max_connections=200",
            self.port,
            self.dir.display()
        );
        ok(
            run(as_owner(&pg_bin("pg_ctl"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-o", &opts, "-w", "-t", "60", "start"])),
            "pg_ctl start",
        );
    }

    /// Stops the server at once (as a crash would) and starts it again.
    pub fn restart(&self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
        self.pg_ctl_start();
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        run(as_owner(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args))
    }

    /// Runs SQL as the superuser in `db`; panics if it fails.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let o = ok(
            run(Command::new(pg_bin("psql"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    db,
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    sql,
                ])
                .arg("-p")
                .arg(self.port.to_string())),
            "psql",
        );
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// The state of lease `id` (`active`, `released`, ...) as database
    /// [`POOL_DB`] holds it; empty if it has no such lease.
    pub fn lease_state(&self, id: &str) -> String {
        self.sql(
            POOL_DB,
            &format!("SELECT record->>'state' FROM berth_leases WHERE id = '{id}'"),
        )
    }

    /// Creates database `name` and returns its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.sql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Waits until the server accepts connections again.
    pub fn wait_ready(&self) {
        wait_for(
            "PostgreSQL to accept connections",
            std::time::Duration::from_secs(30),
            || {
                std::net::TcpStream::connect(("127.0.0.1", self.port))
                    .ok()
                    .map(|_| ())
            },
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
