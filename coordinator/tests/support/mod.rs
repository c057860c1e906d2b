//! A real coordinator in-process on 127.0.0.1 for the integration tests:
//! TLS with its own pool CA, a tenants file (tenants `ci` and `other`, the
//! admin `ops`) and a pool join token, all under one temp dir. Starting
//! again in the same dir reuses the credentials and the lease store, as a
//! restarted coordinator would. A [`Site`] does the same on either store:
//! the embedded one, or a PostgreSQL cluster of the test's own.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth_coordinator::CoordinatorConfig;
use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use berth_testkit::Store;
use berth_testkit::postgres::{self, Postgres};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Adds `authorization: Bearer TOKEN` to every request.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: CoordinatorConfig,
}

/// The tokens of one test coordinator.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub ci: String,
    pub other: String,
    pub ops: String,
    pub join: String,
}

impl Tokens {
    /// Makes the tokens and the files the coordinator reads, or reads them
    /// back from an earlier start in the same dir.
    fn in_dir(dir: &Path) -> Self {
        let path = |n: &str| dir.join(format!("{n}.token"));
        if let Ok(ci) = std::fs::read_to_string(path("ci")) {
            let read = |n: &str| std::fs::read_to_string(path(n)).unwrap();
            return Self {
                ci,
                other: read("other"),
                ops: read("ops"),
                join: read("join"),
            };
        }
        let token = berth_tls::token::generate;
        let t = Self {
            ci: token(),
            other: token(),
            ops: token(),
            join: token(),
        };
        std::fs::write(
            dir.join("tenants"),
            [
                berth_tls::Tenants::line("ci", &t.ci, false),
                berth_tls::Tenants::line("other", &t.other, false),
                berth_tls::Tenants::line("ops", &t.ops, true),
            ]
            .concat(),
        )
        .unwrap();
        std::fs::write(
            dir.join("join.sha256"),
            berth_tls::TokenHash::of(&t.join).to_hex(),
        )
        .unwrap();
        for (n, v) in [
            ("ci", &t.ci),
            ("other", &t.other),
            ("ops", &t.ops),
            ("join", &t.join),
        ] {
            std::fs::write(path(n), v).unwrap();
        }
        t
    }
}

pub struct Server {
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub addr: std::net::SocketAddr,
    pub channel: Channel,
    pub ca_pem: String,
    pub tokens: Tokens,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A fresh temp dir for test `name` (an earlier run's is removed). Unique
/// per call: `cargo test` runs a file's tests as threads of one process,
/// and two coordinators in one dir would replace each other's CA.
pub fn fresh_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("berth-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Where the test coordinators of one pool keep it: a fresh dir with the
/// credentials (as [`Server::start_in`]) and, on [`Store::Postgres`], a
/// PostgreSQL cluster of the test's own whose database
/// [`postgres::POOL_DB`] holds the pool's state. Coordinators started on one
/// site ([`Server::start_at`]) share the pool, as a restarted coordinator
/// would: on the embedded store through the same state dir; on PostgreSQL
/// through the database alone, each with an empty state dir of its own (as
/// a coordinator on another machine would start). The cluster is stopped
/// and the dir removed on drop.
pub struct Site {
    pub dir: PathBuf,
    pub store: Store,
    pg: Option<Postgres>,
    started: AtomicUsize,
}

impl Site {
    /// A fresh site for test `name`. Blocks while PostgreSQL starts: call it
    /// from a multi-threaded runtime (it moves off the async workers).
    pub fn new(name: &str, store: Store) -> Self {
        let dir = fresh_dir(name);
        let pg = (store == Store::Postgres).then(|| {
            tokio::task::block_in_place(|| {
                let pg = Postgres::start();
                pg.create_db(postgres::POOL_DB);
                pg
            })
        });
        if pg.is_some() {
            postgres::write_key(&dir.join("store.key"));
        }
        Self {
            dir,
            store,
            pg,
            started: AtomicUsize::new(0),
        }
    }

    /// Runs `sql` in the pool's database; `None` on the embedded store.
    pub fn sql(&self, sql: &str) -> Option<String> {
        let pg = self.pg.as_ref()?;
        Some(tokio::task::block_in_place(|| {
            pg.sql(postgres::POOL_DB, sql)
        }))
    }

    /// The state of lease `id` in the pool's database; `None` on the
    /// embedded store.
    pub fn stored_state(&self, id: &str) -> Option<String> {
        let pg = self.pg.as_ref()?;
        Some(tokio::task::block_in_place(|| pg.lease_state(id)))
    }

    /// The coordinator flags that put the pool on this site's store.
    fn store_args(&self) -> Vec<String> {
        let Some(pg) = &self.pg else {
            return Vec::new();
        };
        vec![
            format!("--store={}", pg.url(postgres::POOL_DB)),
            format!("--store-key-file={}", self.dir.join("store.key").display()),
            format!("--leader-ttl={}", postgres::LEADER_TTL),
        ]
    }

    /// The state dir of the next coordinator started here.
    fn next_state_dir(&self) -> PathBuf {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        match self.store {
            Store::Embedded => self.dir.join("state"),
            Store::Postgres => self.dir.join(format!("state-{n}")),
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// A coordinator in a fresh dir of its own.
    pub async fn start(name: &str) -> Self {
        Self::start_in(&fresh_dir(name), &[]).await
    }

    /// A coordinator on `dir` (credentials and lease store), with extra flags.
    pub async fn start_in(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(dir, &dir.join("state"), extra).await
    }

    /// A coordinator of the pool at `site` (see [`Site`]), with extra flags.
    pub async fn start_at(site: &Site, extra: &[&str]) -> Self {
        let store = site.store_args();
        let mut args: Vec<&str> = store.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        Self::start_with(&site.dir, &site.next_state_dir(), &args).await
    }

    /// A coordinator with the credentials in `dir` and the state dir
    /// `state`, with extra flags.
    async fn start_with(dir: &Path, state: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let tokens = Tokens::in_dir(dir);
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let (state_arg, tenants, join) = (
            s(state.to_owned()),
            s(dir.join("tenants")),
            s(dir.join("join.sha256")),
        );
        let mut args = vec![
            "t",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--max-ttl",
            "2h",
            "--state-dir",
            &state_arg,
            "--tenants",
            &tenants,
            "--join-token-hash-file",
            &join,
        ];
        args.extend_from_slice(extra);
        let cfg = Args::parse_from(args).c;
        let listener = berth_coordinator::bind(&cfg).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                berth_coordinator::serve(cfg, listener, shutdown)
                    .await
                    .unwrap();
            }
        });
        let ca_pem = std::fs::read_to_string(state.join("ca.pem")).unwrap();
        let channel = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            dir: dir.to_owned(),
            state_dir: state.to_owned(),
            addr,
            channel,
            ca_pem,
            tokens,
            shutdown,
            task,
        }
    }

    pub fn authed(&self, token: Option<&str>) -> Authed {
        InterceptedService::new(self.channel.clone(), Bearer(token.map(str::to_owned)))
    }

    /// LeaseService as tenant `ci`.
    pub fn leases(&self) -> LeaseServiceClient<Authed> {
        LeaseServiceClient::new(self.authed(Some(&self.tokens.ci)))
    }

    /// Waits until lease `lease_id` is active: the Acquire answer leaves at
    /// the durable assignment, and the agent's acceptance may come after it.
    /// Fails if the lease is anything but assigned meanwhile, or after 10 s.
    pub async fn active_soon(&self, lease_id: &str) {
        let mut c = self.leases();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lease = c
                .get(pb::GetRequest {
                    lease_id: lease_id.to_owned(),
                })
                .await
                .unwrap()
                .into_inner()
                .lease
                .unwrap();
            if lease.state == pb::LeaseState::Active as i32 {
                return;
            }
            assert_eq!(lease.state, pb::LeaseState::Assigned as i32, "{lease:?}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "lease {lease_id} not active after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn leases_as(&self, token: Option<&str>) -> LeaseServiceClient<Authed> {
        LeaseServiceClient::new(self.authed(token))
    }

    /// AdminService as the admin tenant `ops`.
    pub fn admin(&self) -> AdminServiceClient<Authed> {
        AdminServiceClient::new(self.authed(Some(&self.tokens.ops)))
    }

    /// AgentService with the pool join token.
    pub fn agents(&self) -> AgentServiceClient<Authed> {
        AgentServiceClient::new(self.authed(Some(&self.tokens.join)))
    }

    pub fn agents_as(&self, token: Option<&str>) -> AgentServiceClient<Authed> {
        AgentServiceClient::new(self.authed(token))
    }

    /// Opens an agent stream with the join token, sending `first`; returns
    /// the sender for the agent's next messages and the coordinator's
    /// messages.
    pub async fn join(
        &self,
        first: pb::AgentMessage,
    ) -> (
        tokio::sync::mpsc::Sender<pb::AgentMessage>,
        tonic::Streaming<pb::CoordinatorMessage>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(first).await.unwrap();
        let inbound = self
            .agents()
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, inbound)
    }

    /// The hosts the admin API lists.
    pub async fn hosts(&self) -> Vec<pb::Host> {
        self.admin()
            .list_hosts(pb::ListHostsRequest {})
            .await
            .unwrap()
            .into_inner()
            .hosts
    }

    /// A TLS connector trusting the pool CA and offering HTTP/2, for
    /// speaking raw HTTP/2 to the coordinator.
    pub fn raw_tls(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    /// Stops gracefully (as SIGTERM would); the dir stays for a restart.
    pub async fn stop_keep(self) -> PathBuf {
        self.shutdown.cancel();
        self.task.await.unwrap();
        self.dir
    }

    /// Stops and removes the dir.
    pub async fn stop(self) {
        let dir = self.stop_keep().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One CSR for every acquire in a test process (the key stays here).
pub fn csr() -> String {
    static CSR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSR.get_or_init(|| berth_tls::KeyAndCsr::generate("ci").unwrap().csr_pem)
        .clone()
}

/// One CSR for every fake agent's registration in a test process.
pub fn host_csr() -> String {
    static CSR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSR.get_or_init(|| berth_tls::KeyAndCsr::generate("host").unwrap().csr_pem)
        .clone()
}
