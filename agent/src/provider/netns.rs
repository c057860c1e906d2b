//! One network namespace per local host, so every host has an address of its
//! own (198.18.0.0/15, the benchmarking range: never routed anywhere real)
//! and its own port space, like separate machines.
//!
//! The /15 is cut into 32768 blocks of four addresses (a /30): block `b` has
//! the root side at `198.18.0.0 + 4b + 1` on the veth `bb{b:04x}` and the host
//! at `+2` on `eth0` inside the namespace `{prefix}{b:04x}`. Creating the root
//! veth is the lock on a block: `ip link add` fails with "File exists" when
//! another agent (of any prefix) holds it, and the agent picks another.
//!
//! Everything here shells out to `ip` (iproute2), bounded by [`IP_TIMEOUT`].
//! [`create`] makes the veth pair and the namespace (one `ip -batch`);
//! [`wire`] takes eight more `ip` commands, run as two `ip -batch`
//! invocations (root side, then namespace side), because on a loaded 2-core
//! machine each `ip` process costs milliseconds of a boot that should take
//! little more than dockerd's own start. The agent runs [`wire`] while
//! dockerd starts (dockerd only needs the namespace to exist).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Bound on one `ip` invocation.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// Number of /30 blocks in 198.18.0.0/15.
pub const BLOCKS: u32 = 1 << (32 - berth_proto::local::HOST_RANGE_PREFIX - 2);
/// How many random blocks to try before giving up (a nearly full range
/// means something leaks namespaces; better to fail loudly).
pub const MAX_BLOCK_ATTEMPTS: usize = 64;
/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";
const BASE: Ipv4Addr = berth_proto::local::HOST_RANGE_BASE;

/// What went wrong setting up or tearing down a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("running `ip {args}`: {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` timed out after {IP_TIMEOUT:?}")]
    Timeout { args: String },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("no free address block after {MAX_BLOCK_ATTEMPTS} attempts")]
    Exhausted,
}

/// A block's addresses and names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub index: u32,
    /// Namespace name = host id.
    pub name: String,
    /// Root-side veth name.
    pub veth: String,
    /// Root side of the /30 (the host's default gateway).
    pub gateway: Ipv4Addr,
    /// The host's address inside the namespace.
    pub host_addr: Ipv4Addr,
}

impl Block {
    /// The names and addresses of block `index` for `prefix`. `index` is
    /// taken modulo [`BLOCKS`].
    pub fn new(prefix: &str, index: u32) -> Self {
        let index = index % BLOCKS;
        let base = u32::from(BASE) + 4 * index;
        Block {
            index,
            name: format!("{prefix}{index:04x}"),
            veth: veth_name(index),
            gateway: Ipv4Addr::from(base + 1),
            host_addr: Ipv4Addr::from(base + 2),
        }
    }

    /// `/run/netns/NAME`, the handle `nsenter` and `setns` open.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }
}

/// Root-side veth of block `index`.
pub fn veth_name(index: u32) -> String {
    format!("bb{:04x}", index % BLOCKS)
}

/// The handle of namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Moves the calling thread into the network namespace at `path`. Only
/// that thread moves: callers run this on a thread of their own, and a
/// socket made there afterwards stays in the namespace.
pub fn enter(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

/// The block a host id (`{prefix}{hex4}`) stands for, if it is one.
pub fn block_of(prefix: &str, host_id: &str) -> Option<u32> {
    let hex = host_id.strip_prefix(prefix)?;
    if hex.len() != 4 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().filter(|b| *b < BLOCKS)
}

/// Runs `ip ARGS`, bounded, returning stderr on failure.
pub async fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let joined = args.join(" ");
    let child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NetnsError::Spawn {
            args: joined.clone(),
            source,
        })?;
    let out = tokio::time::timeout(IP_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| NetnsError::Timeout {
            args: joined.clone(),
        })?
        .map_err(|source| NetnsError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(NetnsError::Failed {
            args: joined,
            stderr,
        })
    }
}

fn already_exists(e: &NetnsError) -> bool {
    matches!(e, NetnsError::Failed { stderr, .. } if stderr.contains("File exists"))
}

/// Creates a namespace on a random free block with its veth pair; returns
/// the block and the name of the veth's peer, which [`wire`] moves into the
/// namespace and addresses (dockerd can start in the namespace meanwhile).
///
/// One `ip -batch` makes both (the agent's boot waits for it before dockerd
/// can start): the veth first, as the lock on the block, then the
/// namespace. The batch stops at the first failing line and names it.
#[tracing::instrument(err)]
pub async fn create(prefix: &str) -> Result<(Block, String), NetnsError> {
    for _ in 0..MAX_BLOCK_ATTEMPTS {
        let index = rand::rng().random_range(0..BLOCKS);
        let block = Block::new(prefix, index);
        // The peer gets a temporary, equally unique name; it is renamed to
        // eth0 once inside the namespace.
        let peer = format!("{}p", block.veth);
        let lines = [
            format!("link add {} type veth peer name {peer}", block.veth),
            format!("netns add {}", block.name),
        ];
        match ip_batch(None, &lines).await {
            Ok(()) => return Ok((block, peer)),
            // Line 1: another agent (of any prefix) holds the block.
            Err(e) if failed_line(&e) == Some(1) && already_exists(&e) => continue,
            // Line 2: a leftover namespace of a killed run holds this name:
            // leave it to `sweep` and take another block.
            Err(e) if failed_line(&e) == Some(2) && already_exists(&e) => {
                tracing::warn!(netns = %block.name, "stale network namespace; trying another block");
                delete_veth(&block.veth).await;
            }
            Err(e) => {
                // Past line 1 the veth is ours: it goes with the failure.
                if failed_line(&e).is_some_and(|n| n > 1) {
                    delete_veth(&block.veth).await;
                }
                return Err(e);
            }
        }
    }
    Err(NetnsError::Exhausted)
}

/// Which line of an `ip -batch` failed, from its stderr (`Command failed
/// -:N`).
fn failed_line(e: &NetnsError) -> Option<usize> {
    let NetnsError::Failed { stderr, .. } = e else {
        return None;
    };
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Command failed -:"))
        .and_then(|n| n.trim().parse().ok())
}

/// [`create`] and [`wire`] in one go (tests and benchmarks that need a
/// wired namespace and nothing else); nothing is left behind on failure.
pub async fn create_wired(prefix: &str) -> Result<Block, NetnsError> {
    let (block, peer) = create(prefix).await?;
    if let Err(e) = wire(&block, &peer).await {
        delete(&block.name, &block.veth).await;
        return Err(e);
    }
    Ok(block)
}

/// Moves the peer into the namespace as `eth0`, addresses both ends and
/// sets the default route. On failure the caller removes the block.
pub async fn wire(block: &Block, peer: &str) -> Result<(), NetnsError> {
    let ns = block.name.as_str();
    let host_cidr = format!("{}/30", block.host_addr);
    let gw_cidr = format!("{}/30", block.gateway);
    let gw = block.gateway;
    let veth = &block.veth;
    ip_batch(
        None,
        &[
            format!("link set {peer} netns {ns}"),
            format!("addr add {gw_cidr} dev {veth}"),
            format!("link set {veth} up"),
        ],
    )
    .await?;
    ip_batch(
        Some(ns),
        &[
            format!("link set {peer} name eth0"),
            format!("addr add {host_cidr} dev eth0"),
            "link set lo up".to_owned(),
            "link set eth0 up".to_owned(),
            format!("route add default via {gw}"),
        ],
    )
    .await
}

/// Runs `ip [-n NETNS] -batch -` with `lines` on stdin, bounded; it stops at
/// the first failing line and says which in stderr.
pub async fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), NetnsError> {
    let mut args: Vec<&str> = vec![];
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let shown = format!("{} <<< {}", args.join(" "), lines.join("; "));
    let spawn_err = |source| NetnsError::Spawn {
        args: shown.clone(),
        source,
    };
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let mut input = lines.join("\n");
    input.push('\n');
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).await?;
            // Dropping stdin is the end of the batch.
        }
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(IP_TIMEOUT, run)
        .await
        .map_err(|_| NetnsError::Timeout {
            args: shown.clone(),
        })?
        .map_err(spawn_err)?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(NetnsError::Failed {
            args: shown,
            stderr,
        })
    }
}

/// Deletes a namespace and its root veth; missing ones are fine.
pub async fn delete(name: &str, veth: &str) {
    delete_netns(name).await;
    delete_veth(veth).await;
}

/// Deletes namespace `name` if it exists; true if it existed and is gone.
/// Processes still inside keep the namespace alive, so callers kill them first.
pub async fn delete_netns(name: &str) -> bool {
    if name.is_empty() || !netns_path(name).exists() {
        return false;
    }
    if let Err(e) = ip(&["netns", "del", name]).await {
        tracing::warn!(netns = %name, error = %e, "deleting network namespace");
    }
    !netns_path(name).exists()
}

/// Deletes root-side veth `veth` if it exists. Deleting the namespace already
/// destroys the pair; this matters when the namespace was never created.
pub async fn delete_veth(veth: &str) {
    if veth.is_empty() || !std::path::Path::new("/sys/class/net").join(veth).exists() {
        return;
    }
    match ip(&["link", "del", veth]).await {
        // The pair may vanish between the check and the delete: the kernel
        // destroys it asynchronously after its namespace is deleted.
        Err(NetnsError::Failed { stderr, .. }) if stderr.contains("Cannot find device") => {}
        Err(e) => tracing::warn!(%veth, error = %e, "deleting veth"),
        Ok(()) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_addresses_and_names() {
        let b = Block::new("berth-", 0);
        assert_eq!(
            (b.gateway, b.host_addr),
            (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2))
        );
        assert_eq!((b.name.as_str(), b.veth.as_str()), ("berth-0000", "bb0000"));

        let b = Block::new("bta-", 0x1a2b);
        assert_eq!(
            b.host_addr,
            Ipv4Addr::from(u32::from(BASE) + 4 * 0x1a2b + 2)
        );
        assert_eq!((b.name.as_str(), b.veth.as_str()), ("bta-1a2b", "bb1a2b"));

        // The last block ends exactly at the top of the /15.
        let b = Block::new("p", BLOCKS - 1);
        assert_eq!(b.host_addr, Ipv4Addr::new(198, 19, 255, 254));
        assert_eq!(b.gateway, Ipv4Addr::new(198, 19, 255, 253));
        assert_eq!(b.veth, "bb7fff");
        assert_eq!(b.path(), PathBuf::from("/run/netns/p7fff"));
        // Interface names are limited to 15 bytes.
        assert!(format!("{}p", b.veth).len() <= 15);
    }

    #[test]
    fn the_failing_line_of_a_batch_is_read_from_stderr() {
        let failed = |stderr: &str| NetnsError::Failed {
            args: "-batch -".into(),
            stderr: stderr.into(),
        };
        let link = failed("RTNETLINK answers: File exists\nCommand failed -:1");
        assert_eq!(failed_line(&link), Some(1));
        assert!(already_exists(&link));
        let ns = failed(
            "Cannot create namespace file \"/run/netns/bta-0001\": File exists\nCommand failed -:2",
        );
        assert_eq!(failed_line(&ns), Some(2));
        assert!(already_exists(&ns));
        assert_eq!(failed_line(&failed("Cannot find device \"x\"")), None);
        assert_eq!(failed_line(&NetnsError::Exhausted), None);
    }

    #[test]
    fn host_ids_map_back_to_blocks() {
        assert_eq!(block_of("bta-", "bta-1a2b"), Some(0x1a2b));
        assert_eq!(block_of("bta-", "bta-7fff"), Some(0x7fff));
        assert_eq!(block_of("bta-", "bta-8000"), None, "outside the /15");
        assert_eq!(block_of("bta-", "btb-1a2b"), None);
        assert_eq!(block_of("bta-", "bta-1a2"), None);
        assert_eq!(block_of("bta-", "bta-xyzw"), None);
        assert_eq!(block_of("bta-", "bta-1a2b3"), None);
    }
}
