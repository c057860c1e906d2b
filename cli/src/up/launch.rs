//! The command lines that tie a coordinator and its agents to one pool's
//! credentials. `berth up` starts its processes with them; the tests and
//! benchmarks start theirs with the same builders, so the flags that make a
//! pool are written in one place.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use berth_tls::PoolCredentials;

/// Where the coordinator keeps its state (the CA, the lease store) under a
/// pool's state dir.
pub fn coordinator_state_dir(pool_state_dir: &Path) -> PathBuf {
    pool_state_dir.join("coordinator")
}

/// The pool CA's certificate, as the coordinator keeps it.
pub fn coordinator_ca(pool_state_dir: &Path) -> PathBuf {
    berth_tls::Ca::paths(&coordinator_state_dir(pool_state_dir)).0
}

/// `berth-coordinator`'s arguments for a pool: its listen address, the file
/// it writes its bound address to, its state dir and the pool's credentials.
pub fn coordinator_args(
    creds: &PoolCredentials,
    state_dir: &Path,
    listen: SocketAddr,
    addr_file: &Path,
) -> Vec<OsString> {
    vec![
        "--listen".into(),
        listen.to_string().into(),
        "--addr-file".into(),
        addr_file.into(),
        "--state-dir".into(),
        state_dir.into(),
        "--tenants".into(),
        creds.tenants.clone().into(),
        "--join-token-hash-file".into(),
        creds.join_token_hash.clone().into(),
    ]
}

/// Where an agent's hosts live and what its host ids start with.
#[derive(Debug, Clone)]
pub struct HostDirs<'a> {
    /// `--state-dir`: one directory per host (dockerd's data root, the state file).
    pub hosts: &'a Path,
    /// `--run-dir`: short paths for sockets, pid files and exec roots.
    pub run: &'a Path,
    /// `--prefix` of host ids, namespaces and directories.
    pub prefix: &'a str,
}

/// `berth-agent`'s arguments for a pool: the coordinator's URL and CA, the
/// join token and where its host lives.
pub fn agent_args(
    creds: &PoolCredentials,
    coordinator_url: &str,
    ca: &Path,
    dirs: &HostDirs<'_>,
) -> Vec<OsString> {
    vec![
        "--coordinator".into(),
        coordinator_url.into(),
        "--ca".into(),
        ca.into(),
        "--join-token-file".into(),
        creds.join_token.clone().into(),
        "--state-dir".into(),
        dirs.hosts.into(),
        "--run-dir".into(),
        dirs.run.into(),
        "--prefix".into(),
        dirs.prefix.into(),
    ]
}
