//! Support for the EC2 end-to-end tests: moto's server as the EC2 API, a
//! fake IMDSv2 served by the test, a test-created network namespace as the
//! "instance" (its address is the instance's private address in moto), the
//! real `berth-coordinator --provider ec2` and `berth-agent --provider ec2`
//! as processes, and guards that stop and sweep all of it.
//!
//! What reaches what: the agent runs inside the namespace (`nsenter
//! --net`), so everything it talks to — moto, the fake IMDS, the
//! coordinator — listens on the namespace's gateway address, the root side
//! of its veth. The coordinator thus sees the agent's stream come from the
//! namespace's address, which is the moto instance's private address, and
//! the test reaches the agent's Docker front and published ports at that
//! address. No traffic leaves loopback and the test's namespace.
//!
//! Credentials are real too: the world writes a tenants file (one admin
//! tenant) and a pool join token; the coordinator makes its CA under its
//! state dir, and the agents, the CLI and the test's own gRPC clients trust
//! that CA and present the tokens.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, Tag};
use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use berth_cli::up::launch;
use berth_testkit::{bin, dirs, ok, run, stdout, sweep, wait_for};
use berth_tls::PoolCredentials;

/// Static credentials moto accepts.
pub const AWS_KEY: &str = "testing";
pub const REGION: &str = "us-east-1";
/// How long moto's server may take to answer after it is started.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Fails with a clear message when moto's server is missing.
pub fn preflight_moto() {
    assert!(
        berth_testkit::which("moto_server").is_some(),
        "EC2 tests need moto's server (`pip install 'moto[server]'`); run scripts/test.sh, which installs it"
    );
}

/// A free TCP port on `ip` (bound and released: moto binds it itself).
fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// moto's server, started for one test; killed (with its process group)
/// when dropped. Its pid is kept in `pidfile` so a later run can kill a
/// server that a killed test left behind.
pub struct Moto {
    pub addr: SocketAddr,
    child: Child,
    pidfile: PathBuf,
}

impl Moto {
    /// Starts `moto_server` on `ip` and waits until it answers.
    pub fn start(ip: IpAddr, state_dir: &Path) -> Self {
        preflight_moto();
        let pidfile = state_dir.join("moto.pid");
        kill_recorded(&pidfile);
        let port = free_port(ip);
        let log = std::fs::File::create(state_dir.join("moto.log")).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", &ip.to_string(), "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("cannot start moto_server");
        std::fs::write(&pidfile, child.id().to_string()).unwrap();
        let addr = SocketAddr::new(ip, port);
        let moto = Moto {
            addr,
            child,
            pidfile,
        };
        wait_for("moto's server to answer", MOTO_START_TIMEOUT, || {
            http(addr, "POST", "/moto-api/reset").ok()
        });
        moto
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forgets every resource (`POST /moto-api/reset`).
    pub fn reset(&self) {
        http(self.addr, "POST", "/moto-api/reset").expect("moto reset");
    }

    /// Stops the server, so that every EC2 call fails from now on.
    pub fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pidfile);
    }

    /// An EC2 client for the test's own calls.
    pub fn client(&self) -> aws_sdk_ec2::Client {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(REGION))
            .http_client(berth_aws::https_client())
            .endpoint_url(self.url())
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                AWS_KEY,
                AWS_KEY,
                None,
                None,
                "berth-tests",
            ))
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills a moto server recorded in `pidfile` by an earlier, killed run.
fn kill_recorded(pidfile: &Path) {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("moto") {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(pidfile);
}

/// A bare HTTP/1.0 request; returns the status line and body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.") {
        return Err(std::io::Error::other(format!("not HTTP: {out:?}")));
    }
    Ok(out)
}

/// What the fake IMDS serves.
#[derive(Debug, Clone, Default)]
pub struct ImdsState {
    pub instance_id: String,
    pub local_ipv4: String,
    /// `autoscaling/target-lifecycle-state`; `None` answers 404.
    pub lifecycle: Option<String>,
    /// `spot/instance-action` (JSON); `None` answers 404.
    pub spot_action: Option<String>,
    /// `events/recommendations/rebalance` (JSON); `None` answers 404.
    pub rebalance: Option<String>,
    /// Requests served per path (token requests under "PUT token").
    pub hits: HashMap<String, usize>,
}

/// A fake IMDSv2 on a real socket: `PUT /latest/api/token` hands out a
/// token (with the `x-aws-ec2-metadata-token-ttl-seconds` header the SDK
/// insists on), and metadata reads need that token.
pub struct FakeImds {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ImdsState>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const IMDS_TOKEN: &str = "berth-test-imds-token";

impl FakeImds {
    pub fn start(ip: IpAddr, state: ImdsState) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind the fake IMDS");
        let addr = listener.local_addr().unwrap();
        // Polled, so that stopping never depends on reaching the address
        // (the namespace's veth may already be gone).
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let state = state.clone();
                            std::thread::spawn(move || serve_imds(conn, &state));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        FakeImds {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_lifecycle(&self, value: Option<&str>) {
        self.state.lock().unwrap().lifecycle = value.map(str::to_owned);
    }

    /// Announces a spot interruption (`action`: terminate, stop,
    /// hibernate) at `time` (RFC 3339), as EC2 does two minutes ahead.
    pub fn set_spot_action(&self, action: &str, time: &str) {
        self.state.lock().unwrap().spot_action =
            Some(format!(r#"{{"action": "{action}", "time": "{time}"}}"#));
    }

    /// Issues a rebalance recommendation at `time` (RFC 3339).
    pub fn set_rebalance(&self, time: &str) {
        self.state.lock().unwrap().rebalance = Some(format!(r#"{{"noticeTime": "{time}"}}"#));
    }

    /// How often `path` (e.g. "lifecycle") was served.
    pub fn hits(&self, path_part: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .hits
            .iter()
            .filter(|(p, _)| p.contains(path_part))
            .map(|(_, n)| n)
            .sum()
    }
}

impl FakeImds {
    /// Stops serving and waits for the accept loop to end.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_imds(conn: TcpStream, state: &Mutex<ImdsState>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut conn = conn;
    // HTTP/1.1 keep-alive: serve requests until the client closes.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let (status, extra, body) = imds_answer(state, &method, &path, &headers);
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        );
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn imds_answer(
    state: &Mutex<ImdsState>,
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
) -> (&'static str, String, String) {
    let mut s = state.lock().unwrap();
    if method == "PUT" && path == "/latest/api/token" {
        *s.hits.entry("PUT token".into()).or_default() += 1;
        let ttl = headers
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .cloned()
            .unwrap_or_else(|| "21600".into());
        return (
            "200 OK",
            format!("x-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n"),
            IMDS_TOKEN.into(),
        );
    }
    if headers.get("x-aws-ec2-metadata-token").map(String::as_str) != Some(IMDS_TOKEN) {
        return ("401 Unauthorized", String::new(), String::new());
    }
    *s.hits.entry(path.to_owned()).or_default() += 1;
    let value = match path.strip_prefix("/latest/meta-data/") {
        Some("instance-id") => Some(s.instance_id.clone()),
        Some("local-ipv4") => Some(s.local_ipv4.clone()),
        Some("instance-type") => Some("m7i.large".into()),
        Some("placement/availability-zone") => Some(format!("{REGION}a")),
        Some("placement/region") => Some(REGION.into()),
        Some("autoscaling/target-lifecycle-state") => s.lifecycle.clone(),
        Some("spot/instance-action") => s.spot_action.clone(),
        Some("events/recommendations/rebalance") => s.rebalance.clone(),
        _ => None,
    };
    match value {
        Some(v) => ("200 OK", String::new(), v),
        None => ("404 Not Found", String::new(), String::new()),
    }
}

/// One EC2 test's world: a namespace standing for the instance, moto and
/// the fake IMDS on its gateway, a VPC and subnet in moto that hold the
/// namespace's address. Dropping it stops everything and sweeps the prefix.
pub struct Ec2World {
    pub prefix: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub pool_name: String,
    /// The namespace standing for the instance, and its handle.
    pub netns: String,
    pub netns_path: PathBuf,
    /// Root side of the namespace's veth: where moto, IMDS and the coordinator listen.
    pub gateway: Ipv4Addr,
    /// The namespace's address: the instance's private address.
    pub host_addr: Ipv4Addr,
    pub subnet_id: String,
    pub moto: Moto,
    pub imds: FakeImds,
    pub ec2: aws_sdk_ec2::Client,
    pub rt: tokio::runtime::Runtime,
    /// The admin tenant's token (CLI and the test's own calls).
    pub token: String,
    children: Vec<(String, Child)>,
}

impl Ec2World {
    pub fn start(base_prefix: &str) -> Self {
        let prefix = berth_testkit::test_prefix(base_prefix);
        sweep(&prefix);
        let (state_dir, run_dir) = dirs(&prefix);
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).unwrap();
        // A worker thread keeps gRPC connections serviced between calls, so
        // dropped channels close and the coordinator can stop promptly.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let block = rt
            .block_on(berth_agent::provider::netns::create_wired(&prefix))
            .expect("create the instance's network namespace");
        let moto = Moto::start(IpAddr::V4(block.gateway), &state_dir);
        let ec2 = moto.client();
        let (vpc_cidr, subnet_cidr) = cidrs(block.host_addr);
        let subnet_id = rt.block_on(async {
            let vpc = ec2
                .create_vpc()
                .cidr_block(vpc_cidr)
                .send()
                .await
                .expect("CreateVpc");
            let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_owned();
            let subnet = ec2
                .create_subnet()
                .vpc_id(vpc_id)
                .cidr_block(subnet_cidr)
                .send()
                .await
                .expect("CreateSubnet");
            subnet
                .subnet()
                .and_then(|s| s.subnet_id())
                .unwrap()
                .to_owned()
        });
        let imds = FakeImds::start(IpAddr::V4(block.gateway), ImdsState::default());
        let creds = PoolCredentials::ensure(&state_dir, "ci").unwrap();
        let token = creds.admin_token().unwrap();
        Ec2World {
            token,
            pool_name: format!("{prefix}pool"),
            netns: block.name.clone(),
            netns_path: block.path(),
            gateway: block.gateway,
            host_addr: block.host_addr,
            prefix,
            state_dir,
            run_dir,
            subnet_id,
            moto,
            imds,
            ec2,
            rt,
            children: Vec::new(),
        }
    }

    /// Launches an instance in the world's subnet with `tags`; with
    /// `at_host_addr` its private address is the namespace's.
    pub fn launch(&self, tags: &[(&str, &str)], at_host_addr: bool) -> String {
        self.launch_at(tags, at_host_addr.then_some(self.host_addr))
    }

    /// An address in the world's subnet that is neither the namespace's
    /// nor the gateway's, nor one AWS reserves.
    pub fn spare_addr(&self) -> Ipv4Addr {
        let o = self.host_addr.octets();
        (10..250)
            .map(|last| Ipv4Addr::new(o[0], o[1], o[2], last))
            .find(|a| *a != self.host_addr && *a != self.gateway)
            .unwrap()
    }

    /// Launches an instance in the world's subnet with `tags`, at `private`
    /// if given (else moto picks).
    pub fn launch_at(&self, tags: &[(&str, &str)], private: Option<Ipv4Addr>) -> String {
        let at_host_addr = private;
        self.rt.block_on(async {
            let mut req = self
                .ec2
                .run_instances()
                .image_id("ami-12c6146b")
                .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
                .min_count(1)
                .max_count(1)
                .subnet_id(&self.subnet_id);
            if let Some(ip) = at_host_addr {
                req = req.private_ip_address(ip.to_string());
            }
            if !tags.is_empty() {
                let mut spec = aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Instance);
                for (k, v) in tags {
                    spec = spec.tags(Tag::builder().key(*k).value(*v).build());
                }
                req = req.tag_specifications(spec.build());
            }
            let out = req.send().await.expect("RunInstances");
            out.instances()[0].instance_id().unwrap().to_owned()
        })
    }

    /// Launches the instance the namespace stands for, tagged for the pool,
    /// and tells the fake IMDS it is that instance.
    pub fn launch_host(&self, lifecycle: Option<&str>) -> String {
        let id = self.launch(&[(berth_aws::POOL_TAG, &self.pool_name)], true);
        let mut s = self.imds.state.lock().unwrap();
        s.instance_id = id.clone();
        s.local_ipv4 = self.host_addr.to_string();
        s.lifecycle = lifecycle.map(str::to_owned);
        s.spot_action = None;
        s.rebalance = None;
        id
    }

    /// (state, tags, private address) of one instance in moto.
    pub fn instance(&self, id: &str) -> (String, BTreeMap<String, String>, String) {
        self.rt.block_on(async {
            let out = self
                .ec2
                .describe_instances()
                .instance_ids(id)
                .send()
                .await
                .expect("DescribeInstances");
            let i = &out.reservations()[0].instances()[0];
            let state = i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default();
            let tags = i
                .tags()
                .iter()
                .map(|t| {
                    (
                        t.key().unwrap_or_default().to_owned(),
                        t.value().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            (
                state,
                tags,
                i.private_ip_address().unwrap_or_default().to_owned(),
            )
        })
    }

    pub fn state_of(&self, id: &str) -> String {
        self.instance(id).0
    }

    pub fn stop_instance(&self, id: &str) {
        self.rt.block_on(async {
            self.ec2
                .stop_instances()
                .instance_ids(id)
                .send()
                .await
                .expect("StopInstances");
        });
    }

    /// Instances of this world's pool in moto, by state.
    pub fn pool_states(&self) -> BTreeMap<String, String> {
        self.rt.block_on(async {
            let out = self
                .ec2
                .describe_instances()
                .filters(
                    Filter::builder()
                        .name(format!("tag:{}", berth_aws::POOL_TAG))
                        .values(&self.pool_name)
                        .build(),
                )
                .send()
                .await
                .expect("DescribeInstances");
            out.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .map(|i| {
                    (
                        i.instance_id().unwrap_or_default().to_owned(),
                        i.state()
                            .and_then(|s| s.name())
                            .map(|n| n.as_str().to_owned())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
    }

    /// The environment that points the AWS SDK at moto and the fake IMDS.
    pub fn aws_env(&self, cmd: &mut Command) {
        for var in [
            "AWS_PROFILE",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL_EC2",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("AWS_ENDPOINT_URL", self.moto.url())
            .env("AWS_ACCESS_KEY_ID", AWS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", AWS_KEY)
            .env("AWS_REGION", REGION)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", self.imds.url());
    }

    /// Starts `berth-coordinator --provider ec2` on the gateway with JSON
    /// logs in `coordinator.log`; returns its address.
    pub fn start_coordinator(&mut self, extra: &[&str]) -> Coordinator {
        let addr_file = self.state_dir.join("coordinator.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log_path = self.state_dir.join("coordinator.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(bin("berth-coordinator"));
        cmd.args(launch::coordinator_args(
            &self.creds(),
            &launch::coordinator_state_dir(&self.state_dir),
            SocketAddr::new(IpAddr::V4(self.gateway), 0),
            &addr_file,
        ))
        .args(["--ops-listen", "127.0.0.1:0"])
        .args(["--provider", "ec2", "--pool-name", &self.pool_name])
        .args(["--heartbeat-interval", "500ms", "--log-format", "json"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
        self.aws_env(&mut cmd);
        // The coordinator never reads IMDS.
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
        let child = cmd.spawn().expect("start berth-coordinator");
        self.children.push(("coordinator".into(), child));
        let addr: SocketAddr = wait_for("the coordinator address", Duration::from_secs(60), || {
            std::fs::read_to_string(&addr_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        Coordinator {
            addr,
            log: log_path,
            ca_pem: launch::coordinator_ca(&self.state_dir),
        }
    }

    /// Starts `berth-agent --provider ec2` inside the namespace and waits
    /// for its READY line. `poweroff_marker` is the file the power-off
    /// fallback (a script) writes.
    pub fn start_agent(&mut self, coordinator: &Coordinator, extra: &[&str]) -> Agent {
        let agent = self.spawn_agent(coordinator, extra);
        assert!(
            agent.ready.starts_with("READY "),
            "the agent did not print READY (got {:?}); log:\n{}",
            agent.ready,
            agent.log_text()
        );
        agent
    }

    /// Starts `berth-agent --provider ec2` like [`Ec2World::start_agent`]
    /// and returns once it printed its first line (`ready`: the READY line,
    /// or empty if it exited without one).
    pub fn spawn_agent(&mut self, coordinator: &Coordinator, extra: &[&str]) -> Agent {
        let (netns, imds) = (self.netns_path.clone(), self.imds.url());
        self.spawn_agent_in(coordinator, &netns, &imds, extra)
    }

    /// [`Ec2World::spawn_agent`] in the namespace at `netns_path` with the
    /// fake IMDS at `imds_url` (another instance than the world's own).
    pub fn spawn_agent_in(
        &mut self,
        coordinator: &Coordinator,
        netns_path: &Path,
        imds_url: &str,
        extra: &[&str],
    ) -> Agent {
        let n = self.children.len();
        let log_path = self.state_dir.join(format!("agent-{n}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let marker = self.poweroff_marker();
        let script = self.state_dir.join("poweroff.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$@\" >> {}\n", marker.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path.display()))
            .arg("--")
            .arg(bin("berth-agent"))
            .args(["--provider", "ec2"])
            .args(launch::agent_args(
                &self.creds(),
                &format!("https://{}", coordinator.addr),
                &coordinator.ca_pem,
                &launch::HostDirs {
                    hosts: &self.state_dir.join("hosts"),
                    run: &self.run_dir,
                    prefix: &self.prefix,
                },
            ))
            .arg("--poweroff-command")
            .arg(format!("{} now", script.display()))
            .args(extra)
            .env("RUST_LOG", "info,berth_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        self.aws_env(&mut cmd);
        cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds_url);
        let mut child = cmd.spawn().expect("start berth-agent");
        let stdout = child.stdout.take().unwrap();
        let pid = child.id();
        self.children.push((format!("agent-{n}"), child));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            let _ = tx.send(first);
            // Keep reading so the agent never blocks on a full pipe.
            for _ in lines {}
        });
        let ready = rx.recv_timeout(Duration::from_secs(90)).unwrap_or_default();
        Agent {
            pid,
            index: self.children.len() - 1,
            ready,
            log: log_path,
        }
    }

    /// The pool's credentials under the world's state dir.
    pub fn creds(&self) -> PoolCredentials {
        PoolCredentials::paths(&self.state_dir)
    }

    pub fn poweroff_marker(&self) -> PathBuf {
        self.state_dir.join("powered-off")
    }

    /// Sends SIGTERM to a child and waits for it; returns whether it exited 0.
    pub fn stop_child(&mut self, agent: &Agent, timeout: Duration) -> bool {
        let _ = kill(
            Pid::from_raw(i32::try_from(agent.pid).unwrap()),
            Signal::SIGTERM,
        );
        self.wait_child(agent, timeout)
    }

    /// Waits for a child to exit; returns whether it exited 0.
    pub fn wait_child(&mut self, agent: &Agent, timeout: Duration) -> bool {
        let child = &mut self.children[agent.index].1;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {timeout:?}; log:\n{}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills a child with SIGKILL (no clean-up runs) and reaps it.
    pub fn kill_child(&mut self, agent: &Agent) {
        let child = &mut self.children[agent.index].1;
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Whether a child is still running.
    pub fn running(&mut self, agent: &Agent) -> bool {
        matches!(self.children[agent.index].1.try_wait(), Ok(None))
    }

    /// The hosts the coordinator lists.
    pub fn hosts(&self, c: &Coordinator) -> Vec<pb::Host> {
        self.rt.block_on(async {
            let mut client = AdminServiceClient::new(channel(c).await);
            client
                .list_hosts(berth_testkit::with_token(
                    pb::ListHostsRequest {},
                    &self.token,
                ))
                .await
                .expect("ListHosts")
                .into_inner()
                .hosts
        })
    }

    /// Waits until the coordinator lists `host_id` as Ready and connected.
    pub fn wait_registered(&self, c: &Coordinator, host_id: &str, timeout: Duration) {
        wait_for(&format!("{host_id} to register"), timeout, || {
            self.hosts(c)
                .iter()
                .any(|h| {
                    h.host_id == host_id && h.connected && h.state == pb::HostState::Ready as i32
                })
                .then_some(())
        });
    }

    /// Runs the `berth` CLI against `c`.
    pub fn berth(&self, c: &Coordinator, args: &[&str]) -> std::process::Output {
        run(&mut self.berth_command(c, args))
    }

    /// The `berth` CLI command against `c`, to run or spawn.
    pub fn berth_command(&self, c: &Coordinator, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("berth"));
        cmd.arg("--coordinator")
            .arg(c.addr.to_string())
            .env("BERTH_CA", &c.ca_pem)
            .env("BERTH_TOKEN_FILE", self.creds().cli_token)
            .env("HOME", self.state_dir.join("home"))
            .env_remove("BERTH_TOKEN")
            .env_remove("BERTH_LEASE_ID")
            .env_remove("DOCKER_CERT_PATH")
            .args(args);
        cmd
    }

    pub fn acquire(&self, c: &Coordinator, build: &str) -> berth_testkit::LeaseEnv {
        let o = ok(
            self.berth(
                c,
                &["acquire", "--build", build, "--ttl", "10m", "--wait", "1m"],
            ),
            "berth acquire",
        );
        berth_testkit::LeaseEnv::parse(&stdout(&o))
    }
}

impl Drop for Ec2World {
    fn drop(&mut self) {
        // Agents first (they clean up on SIGTERM), then the coordinator.
        for (_, child) in self.children.iter_mut().rev() {
            if let Ok(None) = child.try_wait()
                && let Ok(pid) = i32::try_from(child.id())
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(30);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.moto.stop();
        self.imds.stop();
        sweep(&self.prefix);
        berth_testkit::remove_dirs_if_passed(&[&self.state_dir, &self.run_dir]);
    }
}

/// A running coordinator.
#[derive(Debug, Clone)]
pub struct Coordinator {
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// The pool CA the coordinator made (its server certificate chains to it).
    pub ca_pem: PathBuf,
}

impl Coordinator {
    /// The coordinator's JSON log lines whose message contains `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(needle))
            })
            .collect()
    }
}

/// A running agent.
#[derive(Debug, Clone)]
pub struct Agent {
    pub pid: u32,
    index: usize,
    pub ready: String,
    pub log: PathBuf,
}

impl Agent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A gRPC channel to `c`, over TLS with its CA.
pub async fn channel(c: &Coordinator) -> tonic::transport::Channel {
    let ca = std::fs::read_to_string(&c.ca_pem).expect("the coordinator's CA");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    tonic::transport::Endpoint::from_shared(format!("https://{}", c.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("reach the coordinator")
}

/// A /16 VPC and a /24 subnet that hold `addr`.
fn cidrs(addr: Ipv4Addr) -> (String, String) {
    let o = addr.octets();
    (
        format!("{}.{}.0.0/16", o[0], o[1]),
        format!("{}.{}.{}.0/24", o[0], o[1], o[2]),
    )
}
