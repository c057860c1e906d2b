//! Proof that dockerd listens on no TCP port. The agent's front is the only
//! way into a host; a dockerd with a `tcp://` host (from a stray
//! daemon.json, a wrapper, a changed unit file) would be an unauthenticated
//! root shell for anyone who reaches it.
//!
//! `/proc/PID/net/tcp{,6}` lists the sockets of PID's network namespace
//! (the host's, for a dockerd started in it); the LISTEN entries' inodes are
//! matched against the `socket:[INODE]` links in `/proc/PID/fd`, so only
//! sockets that dockerd itself holds count.
//!
//! Reading a TCP table walks the machine's whole TCP hash (a few
//! milliseconds each on a machine with much memory, however few sockets the
//! namespace has), while `/proc/PID/net/unix` and `/proc/PID/net/netlink`
//! list the namespace's own sockets only (microseconds). A booted dockerd
//! holds unix and netlink sockets only (for a few milliseconds after its
//! first `/_ping` answer it also holds one of some other kind): when every
//! socket it holds is in those two tables, none of them is a TCP socket and
//! the TCP tables are not read ([`tcp_listeners`]); any other socket (or a
//! table that cannot be read) takes the full check.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// TCP state number of LISTEN in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("reading {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dockerd (pid {pid}) listens on TCP {addrs:?}; refusing to serve this host")]
    Listening { pid: i32, addrs: Vec<SocketAddr> },
}

/// Listening sockets in a `/proc/net/tcp` or `tcp6` table: inode -> address.
pub fn parse_listening(table: &str) -> HashMap<u64, SocketAddr> {
    let mut out = HashMap::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != TCP_LISTEN {
            continue;
        }
        let (Some(addr), Ok(inode)) = (parse_addr(f[1]), f[9].parse::<u64>()) else {
            continue;
        };
        if inode != 0 {
            out.insert(inode, addr);
        }
    }
    out
}

/// `0100007F:0016` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host
/// byte order (little-endian here), and the port in hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints each 32-bit word of the address as it sits in
    // memory, read as a little-endian integer.
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_le_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8])?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Socket inodes among a process's open file descriptors.
fn socket_inodes(proc_root: &Path, pid: i32) -> Result<Vec<u64>, ListenerError> {
    let dir = proc_root.join(pid.to_string()).join("fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| ListenerError::Read {
        path: dir.clone(),
        source,
    })?;
    Ok(entries
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect())
}

/// Every listening TCP socket (inode -> address) of `pid`'s network
/// namespace, from `/proc/PID/net/tcp{,6}`.
fn listening_in_netns_of(
    proc_root: &Path,
    pid: i32,
) -> Result<HashMap<u64, SocketAddr>, ListenerError> {
    let mut listening = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let path = proc_root.join(pid.to_string()).join("net").join(table);
        match std::fs::read_to_string(&path) {
            Ok(text) => listening.extend(parse_listening(&text)),
            // No IPv6 in this kernel: nothing can listen there.
            Err(e) if table == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ListenerError::Read { path, source }),
        }
    }
    Ok(listening)
}

/// Inodes of the unix and netlink sockets of `pid`'s network namespace;
/// `None` if a table cannot be read.
fn unix_and_netlink_inodes(proc_root: &Path, pid: i32) -> Option<HashSet<u64>> {
    let mut inodes = HashSet::new();
    // The column of the inode in each table.
    for (table, column) in [("unix", 6), ("netlink", 9)] {
        let path = proc_root.join(pid.to_string()).join("net").join(table);
        let text = std::fs::read_to_string(path).ok()?;
        inodes.extend(
            text.lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(column)?.parse::<u64>().ok()),
        );
    }
    Some(inodes)
}

/// The TCP addresses `pid` listens on, in its own network namespace.
pub fn tcp_listeners(proc_root: &Path, pid: i32) -> Result<Vec<SocketAddr>, ListenerError> {
    let held = socket_inodes(proc_root, pid)?;
    // Every socket it holds is a unix or netlink one: none is TCP.
    if unix_and_netlink_inodes(proc_root, pid)
        .is_some_and(|known| held.iter().all(|i| known.contains(i)))
    {
        return Ok(vec![]);
    }
    let listening = listening_in_netns_of(proc_root, pid)?;
    let mut addrs: Vec<SocketAddr> = held
        .into_iter()
        .filter_map(|i| listening.get(&i).copied())
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// Every TCP listener in `pid`'s network namespace except those held by
/// the processes in `own` (the agent: its front and status endpoint). After
/// a wipe nothing else may listen in a host's namespace: a listener left
/// there (a swarm manager on 2377, a process a privileged container left
/// behind) would serve the next lease's neighbours.
pub fn listeners_in_netns_of(
    proc_root: &Path,
    pid: i32,
    own: &[i32],
) -> Result<Vec<SocketAddr>, ListenerError> {
    let mut listening = listening_in_netns_of(proc_root, pid)?;
    for p in own {
        for inode in socket_inodes(proc_root, *p)? {
            listening.remove(&inode);
        }
    }
    let mut addrs: Vec<SocketAddr> = listening.into_values().collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// Fails if dockerd `pid` listens on any TCP port.
pub fn ensure_no_tcp(pid: i32) -> Result<(), ListenerError> {
    let addrs = tcp_listeners(Path::new("/proc"), pid)?;
    if addrs.is_empty() {
        Ok(())
    } else {
        Err(ListenerError::Listening { pid, addrs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0200007F:0050 0300007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0948 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0948 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4545 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn parses_listening_sockets() {
        let l = parse_listening(TCP);
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!(l[&4242], "127.0.0.1:3306".parse().unwrap());
        assert_eq!(l[&4444], "0.0.0.0:2376".parse().unwrap());
        let l6 = parse_listening(TCP6);
        assert_eq!(l6[&4545], "[::1]:2376".parse().unwrap());
        assert!(parse_listening("header only\n").is_empty());
    }

    #[test]
    fn finds_a_real_listener_of_this_process_and_not_others() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let before = tcp_listeners(Path::new("/proc"), pid).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let after = tcp_listeners(Path::new("/proc"), pid).unwrap();
        assert!(after.contains(&addr), "{after:?}");
        assert!(!before.contains(&addr));
        assert!(matches!(
            ensure_no_tcp(pid),
            Err(ListenerError::Listening { .. })
        ));
        drop(l);
        // A connected (not listening) socket does not count.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = server.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(a).unwrap();
        drop(server);
        assert!(!tcp_listeners(Path::new("/proc"), pid).unwrap().contains(&a));
    }

    /// A fake `/proc` with one process holding `fds` (socket inodes) and
    /// its namespace's tables.
    fn fake_proc(name: &str, fds: &[u64], unix: &str, netlink: &str, tcp: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("berth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (fd, net) = (root.join("7/fd"), root.join("7/net"));
        std::fs::create_dir_all(&fd).unwrap();
        std::fs::create_dir_all(&net).unwrap();
        for (i, inode) in fds.iter().enumerate() {
            std::os::unix::fs::symlink(format!("socket:[{inode}]"), fd.join(i.to_string()))
                .unwrap();
        }
        std::os::unix::fs::symlink("/dev/null", fd.join("99")).unwrap();
        std::fs::write(net.join("unix"), unix).unwrap();
        std::fs::write(net.join("netlink"), netlink).unwrap();
        std::fs::write(net.join("tcp"), tcp).unwrap();
        root
    }

    const UNIX: &str = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 100 /run/berth/h/docker.sock
0000000000000000: 00000003 00000000 00000000 0001 03 101
";
    const NETLINK: &str =
        "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
00000000d35608b5 0   0          00000000 0        0        0     2        0        200
";

    #[test]
    fn a_process_holding_only_unix_and_netlink_sockets_listens_on_no_tcp_port() {
        // 4444 listens, but in another process's hands.
        let root = fake_proc("lst-fast", &[100, 101, 200], UNIX, NETLINK, TCP);
        assert_eq!(tcp_listeners(&root, 7).unwrap(), vec![]);
        // Holding the listener: found, through the TCP tables.
        let root = fake_proc("lst-tcp", &[100, 200, 4444], UNIX, NETLINK, TCP);
        assert_eq!(
            tcp_listeners(&root, 7).unwrap(),
            vec!["0.0.0.0:2376".parse().unwrap()]
        );
        // A socket of another kind (UDP, say) that listens on no TCP port.
        let root = fake_proc("lst-other", &[100, 555], UNIX, NETLINK, TCP);
        assert_eq!(tcp_listeners(&root, 7).unwrap(), vec![]);
        // Unreadable netlink table: the full check, which finds the listener.
        let root = fake_proc("lst-nonl", &[100, 4444], UNIX, NETLINK, TCP);
        std::fs::remove_file(root.join("7/net/netlink")).unwrap();
        assert_eq!(tcp_listeners(&root, 7).unwrap().len(), 1);
        // The tables' inodes alone do not count: the process must hold it.
        let root = fake_proc("lst-none", &[], UNIX, NETLINK, TCP);
        assert_eq!(tcp_listeners(&root, 7).unwrap(), vec![]);
        for name in ["lst-fast", "lst-tcp", "lst-other", "lst-nonl", "lst-none"] {
            let _ = std::fs::remove_dir_all(
                std::env::temp_dir().join(format!("berth-{name}-{}", std::process::id())),
            );
        }
    }

    #[test]
    fn strays_are_every_listener_of_the_namespace_but_our_own() {
        let me = i32::try_from(std::process::id()).unwrap();
        let ours = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours_addr = ours.local_addr().unwrap();
        // Another process of this namespace listening: a stray.
        let mut other = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(30)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(other.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let strays = listeners_in_netns_of(Path::new("/proc"), me, &[me]).unwrap();
        let _ = other.kill();
        let _ = other.wait();
        assert!(!strays.contains(&ours_addr), "{strays:?}");
        assert!(
            strays.contains(&SocketAddr::from(([127, 0, 0, 1], port))),
            "{strays:?}"
        );
        let all = listeners_in_netns_of(Path::new("/proc"), me, &[]).unwrap();
        assert!(all.contains(&ours_addr));
    }
}
