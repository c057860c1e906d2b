//! An "upstream" registry for the mirror's tests and benchmarks: CNCF
//! distribution (Debian's `docker-registry`) serving TLS with a CA of its
//! own, inside a network namespace the test makes (standing for Docker Hub
//! beyond the pool), and a helper dockerd in the same namespace that builds
//! images `FROM scratch` and pushes them there with the stock docker CLI.
//! A pool host reaches it through the pool's mirror, or straight through a
//! link of its own ([`Upstream::link_host`]).
//!
//! Everything lives under the test's own prefix: the namespace
//! (`PREFIX{hex4}`), its files under `TEST_STATE_ROOT`, the helper
//! dockerd's run directory under `TEST_RUN_ROOT`. Dropping the guard (and
//! the next start) is the agent's sweep of that prefix, which kills every
//! process inside the namespace (the registry, the helper dockerd) and
//! removes the namespace, mounts, cgroups and directories.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_agent::docker::dockerd::{DockerdSpec, HostPaths};
use berth_agent::docker::registries::Registries;
use berth_agent::provider::netns::Block;
use berth_testkit::{ok, run, wait_for};

/// The upstream's port inside its namespace.
pub const UPSTREAM_PORT: u16 = 5000;
/// The upstream's link to the machine (its namespace's end of the veth pair).
const LINK_DEV: &str = "eth0";

/// The registry binary the tests run (`BERTH_REGISTRY_BIN`, else
/// `docker-registry` on PATH), which must exist.
pub fn registry_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("BERTH_REGISTRY_BIN") {
        return PathBuf::from(b);
    }
    berth_testkit::which("docker-registry").expect(
        "docker-registry is missing: these tests run CNCF distribution from Debian's \
         docker-registry package (scripts/test.sh installs it through scripts/deps.sh)",
    )
}

/// A registry configuration (distribution reads JSON as YAML).
pub fn registry_config(
    addr: SocketAddr,
    data: &Path,
    tls: Option<(&Path, &Path)>,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut http = serde_json::json!({ "addr": addr.to_string(), "secret": "berth-test" });
    if let Some((cert, key)) = tls {
        http["tls"] = serde_json::json!({ "certificate": cert, "key": key });
    }
    let mut config = serde_json::json!({
        "version": "0.1",
        "log": { "level": "info", "formatter": "text" },
        "storage": { "filesystem": { "rootdirectory": data }, "delete": { "enabled": true } },
        "http": http,
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    config
}

fn sweep(state_root: &Path, run_root: &Path, prefix: &str) {
    let (s, r, p) = (
        state_root.to_owned(),
        run_root.to_owned(),
        prefix.to_owned(),
    );
    // Its own thread and runtime: callers may be inside a runtime or not.
    let result = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(berth_agent::sweep(&s, &r, &p))
            .map_err(|e| e.to_string())
    })
    .join();
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("sweeping {prefix}: {e}"),
        Err(_) => eprintln!("sweeping {prefix}: the sweep panicked"),
    }
}

/// The upstream registry in its namespace, with its helper dockerd.
pub struct Upstream {
    pub prefix: String,
    pub block: Block,
    /// `ADDR:PORT` inside the namespace, reachable from the machine.
    pub addr: SocketAddr,
    /// The upstream's CA (what `--mirror-upstream-ca` names).
    pub ca_file: PathBuf,
    state_root: PathBuf,
    run_root: PathBuf,
    registry: Option<Child>,
    registry_log: PathBuf,
    helper: Option<(tokio::process::Child, HostPaths)>,
    rt: tokio::runtime::Runtime,
}

impl Upstream {
    /// Makes the namespace and starts the registry (TLS, its own CA) in it.
    pub fn start(prefix: &str) -> Self {
        let state_root = Path::new(berth_testkit::TEST_STATE_ROOT).join(format!("{prefix}up"));
        let run_root = Path::new(berth_testkit::TEST_RUN_ROOT).join(format!("{prefix}up"));
        sweep(&state_root, &run_root, prefix);
        let _ = std::fs::remove_dir_all(&state_root);
        std::fs::create_dir_all(&state_root).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let block = rt
            .block_on(berth_agent::provider::netns::create_wired(prefix))
            .expect("the upstream's namespace");
        let addr = SocketAddr::new(IpAddr::V4(block.host_addr), UPSTREAM_PORT);
        let dir = state_root.join(&block.name);
        let reg_dir = dir.join("registry");
        std::fs::create_dir_all(reg_dir.join("data")).unwrap();
        let (ca, _) = berth_tls::Ca::generate("upstream test CA").unwrap();
        let (cert, key) = ca.issue_server(&[addr.ip().to_string()]).unwrap();
        let ca_file = reg_dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        std::fs::write(reg_dir.join("cert.pem"), cert).unwrap();
        std::fs::write(reg_dir.join("key.pem"), key).unwrap();
        let config = registry_config(
            addr,
            &reg_dir.join("data"),
            Some((&reg_dir.join("cert.pem"), &reg_dir.join("key.pem"))),
            serde_json::json!({}),
        );
        std::fs::write(reg_dir.join("config.yml"), config.to_string()).unwrap();
        let mut up = Upstream {
            prefix: prefix.to_owned(),
            addr,
            ca_file,
            registry: None,
            registry_log: reg_dir.join("registry.log"),
            helper: None,
            state_root,
            run_root,
            block,
            rt,
        };
        up.start_registry();
        up
    }

    fn registry_dir(&self) -> PathBuf {
        self.state_root.join(&self.block.name).join("registry")
    }

    /// Starts (or restarts) the registry and waits until it listens.
    pub fn start_registry(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.registry_log)
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.block.path().display()))
            .arg("--")
            .arg(registry_bin())
            .arg("serve")
            .arg(self.registry_dir().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start the upstream registry");
        self.registry = Some(child);
        let addr = self.addr;
        wait_for("the upstream registry", Duration::from_secs(20), || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
    }

    /// Stops the registry (the namespace stays): the upstream is down.
    pub fn stop_registry(&mut self) {
        if let Some(mut c) = self.registry.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // nsenter execs the registry, so the child is the registry itself.
        let addr = self.addr;
        wait_for(
            "the upstream to stop listening",
            Duration::from_secs(10),
            || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .is_err()
                    .then_some(())
            },
        );
    }

    /// Bytes the upstream's link has sent since it was shaped (the
    /// qdisc's own counter).
    pub fn link_bytes_sent(&self) -> u64 {
        self.link_bytes_sent_on(LINK_DEV)
    }

    /// Bytes the upstream has sent on its device `dev` since it was shaped
    /// (the qdisc's own counter; 0 if the device is gone).
    pub fn link_bytes_sent_on(&self, dev: &str) -> u64 {
        let o = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.block.name,
            "tc",
            "-s",
            "qdisc",
            "show",
            "dev",
            dev,
        ]));
        berth_testkit::stdout(&o)
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Sent ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// Bytes of the blobs the upstream holds.
    pub fn data_bytes(&self) -> u64 {
        fn du(dir: &Path) -> u64 {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => du(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
                    _ => 0,
                })
                .sum()
        }
        du(&self.registry_dir().join("data/docker/registry/v2/blobs"))
    }

    /// The registry's log: every request it served, with the client address.
    pub fn registry_log(&self) -> String {
        std::fs::read_to_string(&self.registry_log).unwrap_or_default()
    }

    /// The helper dockerd's socket, started on first use: it runs in the
    /// upstream's namespace, as the agent runs a host's dockerd, and trusts
    /// the upstream through its own `certs.d`.
    pub fn helper_socket(&mut self) -> PathBuf {
        if let Some((_, paths)) = &self.helper {
            return paths.socket.clone();
        }
        let paths = HostPaths::new(
            &self.state_root.join("hosts"),
            &self.run_root,
            &self.block.name,
        );
        let ca = std::fs::read_to_string(&self.ca_file).unwrap();
        let spec = DockerdSpec {
            program: PathBuf::from("dockerd"),
            paths: paths.clone(),
            netns: Some(self.block.path()),
            cgroup_parent: berth_agent::provider::cleanup::cgroup_name(&self.block.name),
            network: berth_agent::provider::hostnet::HostNetwork::Own,
            // Like a pool host's: no resolver beyond the namespace.
            dns: berth_agent::provider::hostnet::HostDns::OwnAddress(self.block.host_addr.into()),
            registries: Registries::new(&[], &[self.addr.to_string()], Some(ca)).unwrap(),
        };
        let child = self
            .rt
            .block_on(async {
                let mut child = spec.spawn().await?;
                berth_agent::docker::dockerd::wait_ready(
                    &mut child,
                    &paths,
                    Duration::from_secs(30),
                )
                .await?;
                Ok::<_, berth_agent::docker::dockerd::DockerdError>(child)
            })
            .expect("the helper dockerd");
        let socket = paths.socket.clone();
        self.helper = Some((child, paths));
        socket
    }

    /// The stock docker CLI on the helper dockerd.
    pub fn helper_docker(&mut self) -> Command {
        let socket = self.helper_socket();
        berth_testkit::docker_cli(&format!("unix://{}", socket.display()))
    }

    /// Builds `ctx` on the helper dockerd as `ADDR:PORT/REPO:TAG` and pushes
    /// it to the upstream; returns the image's manifest digest as pushed.
    pub fn push(&mut self, ctx: &Path, repo_tag: &str) -> String {
        let name = format!("{}/{repo_tag}", self.addr);
        ok(
            run(self
                .helper_docker()
                .args(["build", "-q", "-t", &name])
                .arg(ctx)),
            "docker build on the helper dockerd",
        );
        let o = ok(
            run(self.helper_docker().args(["push", &name])),
            "docker push to the upstream",
        );
        let out = berth_testkit::stdout(&o);
        out.split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .map(str::to_owned)
            .unwrap_or_default()
    }

    /// Stops the helper dockerd (images pushed stay in the registry).
    pub fn stop_helper(&mut self) {
        if let Some((mut child, _)) = self.helper.take() {
            let _ = self.rt.block_on(child.kill());
        }
    }

    /// Shapes what the upstream sends (its namespace's `eth0`) to `rate`
    /// with a token bucket (`tc qdisc ... tbf`): a WAN link's bandwidth.
    pub fn shape(&self, rate: &str) {
        self.shape_dev(LINK_DEV, rate);
    }

    /// [`Upstream::shape`] on the upstream's device `dev`.
    fn shape_dev(&self, dev: &str, rate: &str) {
        ok(
            run(Command::new("ip").args([
                "netns",
                "exec",
                &self.block.name,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "100ms",
            ])),
            "tc qdisc tbf on the upstream's link",
        );
    }

    /// Links a host's network namespace (`host_ns`, address `host_addr`)
    /// straight to the upstream's, the way a machine outside the pool
    /// reaches a registry on the internet: without this the host reaches
    /// only the machine's own addresses (the machine forwards nothing
    /// between namespaces, and its forwarding is not the test's to change).
    ///
    /// A veth pair named `dev` at both ends, one end in each namespace, no
    /// addresses of its own: in the host, the upstream's own address is
    /// routed over it (from the host's address), so the host names the
    /// upstream exactly as the mirror does and its certificate matches; in
    /// the upstream's namespace, the host's address is routed back over
    /// it, and what the upstream sends there is shaped to `rate` like its
    /// link to the machine ([`Upstream::shape`]; count it with
    /// [`Upstream::link_bytes_sent_on`] `dev`). The host's other routes (the
    /// pool's mirror, the coordinator) stay as they are. The pair goes
    /// away with the host's namespace.
    pub fn link_host(&self, host_ns: &str, host_addr: Ipv4Addr, dev: &str, rate: &str) {
        let ip = |args: &[&str]| {
            ok(
                run(Command::new("ip").args(args)),
                &format!("ip {}", args.join(" ")),
            )
        };
        let up = self.block.name.as_str();
        let (upstream_ip, host_ip) = (self.addr.ip().to_string(), host_addr.to_string());
        ip(&[
            "link", "add", dev, "netns", host_ns, "type", "veth", "peer", "name", dev, "netns", up,
        ]);
        ip(&["-n", up, "link", "set", dev, "up"]);
        ip(&[
            "-n",
            up,
            "route",
            "add",
            &format!("{host_ip}/32"),
            "dev",
            dev,
        ]);
        self.shape_dev(dev, rate);
        ip(&["-n", host_ns, "link", "set", dev, "up"]);
        ip(&[
            "-n",
            host_ns,
            "route",
            "add",
            &format!("{upstream_ip}/32"),
            "dev",
            dev,
            "src",
            &host_ip,
        ]);
    }
}

/// Whether a distribution log shows a request from `client` (an address)
/// for a URI starting with `uri`.
pub fn served(log: &str, client: &str, uri: &str) -> bool {
    log.lines().any(|l| {
        l.contains(&format!("http.request.remoteaddr=\"{client}:"))
            && (l.contains(&format!("http.request.uri=\"{uri}"))
                || l.contains(&format!("http.request.uri={uri}")))
    })
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(mut c) = self.registry.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop_helper();
        sweep(&self.state_root, &self.run_root, &self.prefix);
        let _ = std::fs::remove_dir_all(&self.state_root);
        let _ = std::fs::remove_dir_all(&self.run_root);
    }
}

/// A build context of a multi-layer image `FROM scratch`: the static
/// busybox, its links, and `layers` layers of `layer_kib` KiB each (bytes
/// of a counter, so the content is deterministic and incompressible
/// enough not to vanish in gzip; each layer differs).
pub fn layered_context(dir: &Path, layers: usize, layer_kib: usize) {
    berth_testkit::busybox_context(dir, "mirrored\n");
    let mut dockerfile = String::from(
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         COPY index.html /www/index.html\n",
    );
    for i in 0..layers {
        let name = format!("layer{i}.bin");
        std::fs::write(dir.join(&name), pseudo_random(i as u64, layer_kib * 1024)).unwrap();
        dockerfile.push_str(&format!("COPY {name} /data/{name}\n"));
    }
    dockerfile.push_str("CMD [\"cat\", \"/www/index.html\"]\n");
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
}

/// `len` bytes from a small deterministic generator (xorshift), seeded.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
