//! berth-coordinator: the thin control plane of a berth pool.
//!
//! It keeps the pool's hosts as their agents report them over one gRPC stream
//! each, hands them to CI builds as leases (FIFO queue, idempotent per build
//! id, deadlines), and tells agents when a lease starts and ends. The agents
//! are the truth about their hosts; the coordinator never touches Docker.
//!
//! Every path in is authenticated: gRPC is TLS with a server certificate
//! from the pool CA (`berth_tls::Ca`, kept under `--state-dir` or supplied by
//! operators), CI presents a tenant token, agents the pool join token
//! (`auth`). The CA also signs the agents' server certificates and one client
//! certificate per lease, the only key to a host's Docker API.
//!
//! Who may join is decided by [`admission`] (every agent on the local
//! provider; with `--provider ec2` the instance is verified with EC2), and
//! on EC2 the [`sweeper`] ends pool instances whose agent never came or
//! went away. An elastic EC2 pool with `--asg-name` has its Auto Scaling
//! group follow the pool's decisions ([`capacity`]) through the
//! [`actuator`].
//!
//! Layout: [`api`] is the gRPC face (handlers, authentication), [`pool`]
//! the state (hosts, leases, the queue) behind one lock, [`lease`] and
//! [`host`] the lease's and the host's state machines (pure: the pool feeds
//! them events and carries out their actions), [`clock`] the one moment a
//! call works with, [`store`] what survives a restart, [`ops`] the metrics
//! and ops endpoint.

#![forbid(unsafe_code)]

pub mod actuator;
pub mod admission;
pub mod api;
pub mod cache;
pub mod capacity;
pub mod clock;
pub mod config;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod host;
pub mod lease;
pub mod listener;
pub mod ops;
pub mod pg;
pub mod pool;
pub mod store;
pub mod sweeper;
#[cfg(test)]
mod testing;
pub mod timeline;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::admin_service_server::AdminServiceServer;
use berth_proto::v1::agent_service_server::AgentServiceServer;
use berth_proto::v1::lease_service_server::LeaseServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use api::{Services, auth};
use clock::Now;
pub use config::CoordinatorConfig;
use pool::Pool;

/// How often the pool's timers are checked.
pub const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("ops endpoint (--ops-listen): cannot listen on {addr}: {source}")]
    OpsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the address file {path}: {source}")]
    AddrFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("pool CA: {0}")]
    Ca(#[source] berth_tls::TlsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("build cache: {0}")]
    Cache(#[from] cache::CacheError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("shared store: {0}")]
    Boot(#[from] pg::boot::BootError),
    #[error("cannot share the listening socket between standby and leader: {0}")]
    Listener(#[source] std::io::Error),
    /// This coordinator led and lost the lead (it could not renew it in
    /// time, or another took it over): it stops, and started again it
    /// stands by.
    #[error("lost the lead of term {term}: {why}")]
    Deposed { term: u64, why: String },
}

/// The pool CA: supplied by operators, or kept under the state dir
/// (created on first start).
pub fn load_ca(config: &CoordinatorConfig) -> Result<berth_tls::Ca, RunError> {
    match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => berth_tls::Ca::load(cert, key),
        _ => berth_tls::Ca::load_or_create(&config.state_dir),
    }
    .map_err(RunError::Ca)
}

/// Binds the listener; split from [`serve`] so callers learn the address
/// (port 0) before serving. The CA and the credentials are checked first,
/// so once the address file exists the CA file does too.
pub async fn bind(config: &CoordinatorConfig) -> Result<TcpListener, RunError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| RunError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    if config.cache_registry.is_some() {
        cache::ensure_files(&config.state_dir)?;
    }
    match &config.store {
        None => {
            load_ca(config)?;
            auth::Auth::load(
                config.tenants.as_deref(),
                config.join_token_hash_file.as_deref(),
            )?;
        }
        // The shared pool's CA and credentials, and the CA certificate
        // written where clients of this coordinator expect it.
        Some(url) => pg::run::prepare(config, url)?,
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
    if let Some(path) = &config.addr_file {
        let addr = listener.local_addr().map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
        write_atomic(path, addr.to_string().as_bytes()).map_err(|source| RunError::AddrFile {
            path: path.clone(),
            source,
        })?;
    }
    Ok(listener)
}

/// Runs the coordinator until `shutdown` fires.
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let listener = bind(&config).await?;
    serve(config, listener, shutdown).await
}

/// Serves the gRPC API on `listener` until `shutdown` fires.
pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    if let Some(url) = config.store.clone() {
        return pg::run::serve(config, &url, listener, shutdown).await;
    }
    let ca = Arc::new(load_ca(&config)?);
    let auth = Arc::new(auth::Auth::load(
        config.tenants.as_deref(),
        config.join_token_hash_file.as_deref(),
    )?);
    // Leases written through to disk: a restart (even after kill -9) picks
    // up where the last process left off.
    let store = Arc::new(store::RedbStore::open(&config.state_dir)?);
    info!(path = %store.path().display(), "lease store open");
    let pool = Arc::new(Pool::with_store(
        pool_config(&config, &auth),
        store,
        Now::system(),
    )?);
    serve_pool(&config, listener, ca, auth, pool, shutdown).await
}

/// The pool's settings: the configuration's, with each tenant's share
/// from the tenants file.
pub(crate) fn pool_config(config: &CoordinatorConfig, auth: &auth::Auth) -> pool::PoolConfig {
    let mut pool_config = config.pool();
    pool_config.tenants = auth.limits();
    pool_config
}

/// Serves the gRPC API of `pool` on `listener` until `shutdown` fires.
pub(crate) async fn serve_pool(
    config: &CoordinatorConfig,
    listener: TcpListener,
    ca: Arc<berth_tls::Ca>,
    auth: Arc<auth::Auth>,
    pool: Arc<Pool>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // Re-issued before it runs out (listener::rotate), without a restart.
    let server_cert = Arc::new(
        berth_tls::server::RotatingCert::new(
            ca.clone(),
            config.server_names(),
            std::time::SystemTime::now(),
        )
        .map_err(RunError::Ca)?,
    );
    let tls =
        berth_tls::server::coordinator_server_config(server_cert.clone()).map_err(RunError::Ca)?;
    let rotation = tokio::spawn(listener::rotate(server_cert, shutdown.clone()));
    let ec2_metrics = Arc::new(ops::metrics::Ec2Metrics::default());
    let metrics = ec2_metrics.clone();
    let verifier: Arc<dyn admission::Verifier> = match config.provider {
        config::Provider::Local => {
            info!(range = %config.local_range, "local pool: agents are admitted by address range");
            Arc::new(admission::LocalRange::new(config.local_range))
        }
        config::Provider::Ec2 => {
            // Boxed: the SDK's config loading is a deep future.
            let api = Arc::new(Box::pin(berth_aws::Ec2::from_env()).await);
            if let Some(cfg) = config.sweep() {
                let sweeper =
                    sweeper::Sweeper::new(api.clone(), pool.clone(), cfg, metrics.clone());
                tokio::spawn(sweeper.run(shutdown.clone()));
            }
            if let Some(cfg) = config.group() {
                let asg = Arc::new(Box::pin(berth_aws::Asg::from_env()).await);
                let actuator =
                    actuator::GroupActuator::new(asg, pool.clone(), cfg, metrics.clone());
                tokio::spawn(actuator.run(shutdown.clone()));
            }
            info!(pool = %config.pool_name, "EC2 pool: agents are verified with DescribeInstances");
            Arc::new(admission::Ec2Verifier::new(
                api,
                config.pool_name.clone(),
                metrics.clone(),
            ))
        }
    };
    let mut cache_task = None;
    let cache = match (&config.cache_registry, config.cache_token_listen) {
        (Some(registry), Some(listen)) => {
            cache::ensure_files(&config.state_dir)?;
            let c = Arc::new(cache::BuildCache::load(
                &config.state_dir,
                registry.clone(),
            )?);
            let l = cache::bind(listen).await?;
            cache_task = Some(tokio::spawn(cache::serve(
                l,
                ca.clone(),
                c.clone(),
                pool.clone(),
                shutdown.clone(),
            )));
            Some(c)
        }
        _ => None,
    };
    let targets = config.registry_targets();
    let registries = if targets.is_empty() {
        None
    } else {
        let w =
            Arc::new(ops::registries::Watch::new(targets, ca.cert_pem()).map_err(RunError::Ca)?);
        tokio::spawn(w.clone().run(shutdown.clone()));
        Some(w)
    };
    let services = Services {
        pool: pool.clone(),
        cache,
        registries: registries.clone(),
        ca,
        shutdown: shutdown.clone(),
        verifier,
        ec2_metrics: metrics,
        host_cert_validity: config.host_cert_validity,
        requests: Arc::new(api::limit::RequestLimit::new(
            config.max_requests(),
            pool.metrics().request_limit_refusals.clone(),
        )),
    };
    let tenant_auth = auth::TenantAuth {
        auth: auth.clone(),
        admin_only: false,
    };
    let admin_auth = auth::TenantAuth {
        auth: auth.clone(),
        admin_only: true,
    };
    let agent_auth = auth::AgentAuth(auth);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<LeaseServiceServer<Services>>()
        .await;
    health_reporter
        .set_serving::<AgentServiceServer<Services>>()
        .await;
    health_reporter
        .set_serving::<AdminServiceServer<Services>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let ticker = {
        let pool = pool.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut every = berth_runtime::shutdown::Every::new(TICK);
            while every.tick(&shutdown).await {
                pool.tick(Now::system());
            }
        })
    };

    let ops_listener = TcpListener::bind(config.ops_listen)
        .await
        .map_err(|source| RunError::OpsBind {
            addr: config.ops_listen,
            source,
        })?;
    let ops_addr = ops_listener.local_addr().ok();
    if let (Some(path), Some(a)) = (&config.ops_addr_file, ops_addr) {
        write_atomic(path, a.to_string().as_bytes()).map_err(|source| RunError::AddrFile {
            path: path.clone(),
            source,
        })?;
    }
    info!(addr = ?ops_addr, "ops endpoint serving /metrics and /healthz");
    let ops_task = tokio::spawn(ops::serve(
        ops_listener,
        ops::metrics::registry(pool.clone(), ec2_metrics.clone(), registries),
        pool.clone(),
        shutdown.clone(),
    ));

    let addr = listener.local_addr().ok();
    info!(addr = ?addr, "coordinator serving");
    // The listener is bound and every service is registered: connections
    // made from here on are answered.
    berth_runtime::systemd::ready(&format!(
        "serving gRPC on {}",
        addr.map(|a| a.to_string()).unwrap_or_default()
    ));
    let incoming = listener::incoming(listener, tls, shutdown.clone());
    let server = listener::server()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(LeaseServiceServer::with_interceptor(
            services.clone(),
            tenant_auth,
        ))
        .add_service(AgentServiceServer::with_interceptor(
            services.clone(),
            agent_auth,
        ))
        .add_service(AdminServiceServer::with_interceptor(services, admin_auth))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled());
    let result = listener::until_drained(server, &shutdown).await;
    shutdown.cancel();
    let _ = ticker.await;
    let _ = rotation.await;
    let _ = ops_task.await;
    if let Some(t) = cache_task {
        let _ = t.await;
    }
    // Changes made since the last answer (expiries, agents' reports) are
    // committed before the store closes; dropping the last handle closes it.
    if let Err(e) = pool.durable().await {
        error!(error = %e, "lease changes made at shutdown were not written");
    }
    drop(pool);
    info!("coordinator stopped; lease store closed");
    Ok(result?)
}

/// Writes a small file (an address file) whole or not at all; it only
/// serves this boot, so no fsync.
fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    berth_runtime::fs::write_atomic(path, data, 0o644, berth_runtime::fs::Durability::Process)
}
