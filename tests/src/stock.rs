//! What the tests of "a leased host behaves like any Docker host" share:
//! an upstream HTTP server standing for the network beyond a host (bound on
//! the host's gateway address, the machine's end of the pool's veth, or
//! inside a namespace of the test's own), a guard for such a namespace, a
//! snapshot of the machine's own firewall and forwarding settings (to prove
//! a test left them untouched), build contexts for images holding the
//! machine's static docker CLI, and the lease's environment for clients
//! that are not the docker CLI (Python, docker-compose).
//!
//! Every server here listens only on an address the test or its pool made,
//! and stops when dropped; every namespace is deleted when dropped.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use berth_testkit::{LeaseEnv, busybox, ok, run, stdout};

/// How often the server's accept loop looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// One request the upstream server answered: who asked, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub peer: IpAddr,
    pub path: String,
}

/// A small HTTP/1.0 server answering every GET with one body. Its socket
/// is made inside a network namespace (or in the test's own), so it can
/// stand for a server beyond a host. Stops (and joins) when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on `addr` (port 0 picks one) inside `netns` (a
    /// `/run/netns/NAME` path) or in the test's own namespace.
    pub fn start(netns: Option<&Path>, addr: SocketAddr, body: &str) -> Self {
        let listener = listen_in(netns, addr);
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(vec![]));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (hits, stop, body) = (hits.clone(), stop.clone(), body.to_owned());
            std::thread::spawn(move || serve(&listener, &body, &hits, &stop))
        };
        HttpServer {
            addr,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request answered so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listening socket on `addr` made inside `netns` (a `/run/netns/NAME`
/// path), or in the caller's namespace: `setns` moves only the calling
/// thread, and a socket stays in the namespace it was made in, so a
/// short-lived thread makes it and any thread may use it afterwards.
pub fn listen_in(netns: Option<&Path>, addr: SocketAddr) -> TcpListener {
    let netns = netns.map(Path::to_owned);
    std::thread::spawn(move || {
        if let Some(path) = netns {
            let f = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
        }
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("listening on {addr}: {e}"))
    })
    .join()
    .unwrap()
}

fn serve(listener: &TcpListener, body: &str, hits: &Mutex<Vec<Hit>>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Some(path) = answer(stream, body) {
                    hits.lock().unwrap().push(Hit {
                        peer: peer.ip(),
                        path,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
            }
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Reads one request head, answers with `body`; returns the request path.
fn answer(mut s: TcpStream, body: &str) -> Option<String> {
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1)?.to_owned();
    let reply = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(reply.as_bytes()).ok()?;
    Some(path)
}

/// A network namespace the test made; deleted (with its veth ends) on drop.
pub struct NetnsGuard {
    pub name: String,
}

impl NetnsGuard {
    pub fn create(name: &str) -> Self {
        // A leftover of a killed run of this test.
        let _ = run(Command::new("ip").args(["netns", "del", name]));
        ok(
            run(Command::new("ip").args(["netns", "add", name])),
            "ip netns add",
        );
        NetnsGuard {
            name: name.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        ok(
            run(Command::new("ip").arg("-n").arg(&self.name).args(args)),
            &format!("ip -n {} {}", self.name, args.join(" ")),
        );
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// Runs `PROGRAM ARGS` inside the network namespace at `netns`.
pub fn in_netns(netns: &Path, program: &str, args: &[&str]) -> std::process::Output {
    run(Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program)
        .args(args))
}

/// The machine's own packet filter and forwarding settings, as text, so a
/// test can prove a pool left them exactly as they were. Chain counters
/// are dropped (traffic changes them, rules do not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineNet {
    pub tables: Vec<(String, String)>,
    pub sysctls: Vec<(String, String)>,
}

impl MachineNet {
    /// Read from the test's own namespace, which is the machine's.
    pub fn snapshot() -> Self {
        let mut tables = vec![];
        for tool in ["iptables-save", "ip6tables-save", "iptables-legacy-save"] {
            if berth_testkit::which(tool).is_none() {
                continue;
            }
            let o = ok(run(&mut Command::new(tool)), tool);
            let text: Vec<String> = stdout(&o)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(strip_counters)
                .collect();
            tables.push((tool.to_owned(), text.join("\n")));
        }
        let sysctls = [
            "/proc/sys/net/ipv4/ip_forward",
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "/proc/sys/net/ipv4/conf/all/forwarding",
        ]
        .iter()
        .map(|p| {
            (
                (*p).to_owned(),
                std::fs::read_to_string(p)
                    .unwrap_or_else(|e| format!("unreadable: {e}"))
                    .trim()
                    .to_owned(),
            )
        })
        .collect();
        MachineNet { tables, sysctls }
    }

    /// `net.ipv4.ip_forward` as read.
    pub fn ip_forward(&self) -> &str {
        &self.sysctls[0].1
    }
}

/// `:CHAIN POLICY [packets:bytes]` -> `:CHAIN POLICY`.
fn strip_counters(line: &str) -> String {
    match line.rfind(" [") {
        Some(i) if line.starts_with(':') => line[..i].to_owned(),
        _ => line.to_owned(),
    }
}

/// Whether the ELF file at `path` is statically linked (no program
/// interpreter), i.e. runs in a FROM scratch image.
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != PT_INTERP
    })
}

/// The machine's static docker CLI (this kind of machine ships one at
/// /usr/local/bin/docker), for images built FROM scratch. Fails the test
/// with a clear message when there is none.
pub fn static_docker_cli() -> PathBuf {
    let candidates = ["/usr/local/bin/docker", "/usr/bin/docker"];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| is_static_elf(p))
        .unwrap_or_else(|| {
            panic!(
                "these tests need a statically linked docker CLI (to run inside FROM scratch images); \
                 none of {candidates:?} is one"
            )
        })
}

/// A build context FROM scratch with the static busybox and the static
/// docker CLI at /usr/bin/docker; `files` are added at the image's root
/// (executable), and `cmd` is its CMD (JSON array text).
pub fn docker_cli_context(dir: &Path, files: &[(&str, &str)], cmd: &str) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(busybox(), dir.join("busybox")).unwrap();
    std::fs::copy(static_docker_cli(), dir.join("docker")).unwrap();
    let mut dockerfile = String::from(
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         COPY docker /usr/bin/docker\n",
    );
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        dockerfile.push_str(&format!("COPY {name} /{name}\n"));
    }
    dockerfile.push_str(&format!("CMD {cmd}\n"));
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
}

/// Puts the lease's settings on a client that is not the docker CLI
/// (Python's Docker SDK, Testcontainers, docker-compose), exactly as after
/// `eval "$(berth acquire ...)"`. python-requests lets REQUESTS_CA_BUNDLE
/// and CURL_CA_BUNDLE replace the CA those clients pass
/// (psf/requests#3829), so both are removed.
pub fn lease_client_env<'c>(cmd: &'c mut Command, lease: &LeaseEnv) -> &'c mut Command {
    for k in [
        "DOCKER_HOST",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "BERTH_LEASE_ID",
        "BERTH_HOST_ADDR",
        "BERTH_HOST_ID",
    ] {
        cmd.env(k, lease.get(k));
    }
    cmd.env_remove("DOCKER_CONTEXT")
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        // Nothing may override what the lease says the host is.
        .env_remove("TESTCONTAINERS_HOST_OVERRIDE")
        .env_remove("TC_HOST")
        .env_remove("TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE")
}

/// The gateway of a pool host: the machine's end of its veth, where its
/// default route points (read from the host's routing table).
pub fn host_gateway(host_id: &str) -> IpAddr {
    let o = ok(
        run(Command::new("ip").args(["-n", host_id, "route", "show", "default"])),
        "the host's default route",
    );
    let text = stdout(&o);
    let via = text
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .unwrap_or_else(|| panic!("no default route via a gateway in {host_id}: {text:?}"));
    via.parse().unwrap()
}

/// A token no earlier run could have left anywhere.
pub fn token(what: &str) -> String {
    format!("{what}-{:016x}", rand::random::<u64>())
}
