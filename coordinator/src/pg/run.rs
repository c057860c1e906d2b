//! A coordinator on the shared store: stand by until this one leads, then
//! serve the pool until shut down or deposed.
//!
//! - Standby: serves health and UNAVAILABLE with the leader's address
//!   ([`super::standby`]) and tries to take the lead every [`POLL`].
//! - Taking over: the store's commits are fenced with the new term, the
//!   pool is loaded from the database (the usual restore: a lease that
//!   held a host waits for its agent to re-register, up to the lost-host
//!   grace), and the full API is served on the same socket.
//! - Leading: the lead is renewed every fifth of `--leader-ttl`. If it was
//!   not renewed for half of it (the database unreachable, or the row
//!   taken over), the coordinator stops serving and exits with an error
//!   before the row can expire: a supervisor (systemd, `berth up`) starts
//!   it again and it stands by. Its store refuses writes from that moment,
//!   and the database refuses them too once another term began.
//! - A clean stop gives the lead up at once, so a standby takes over
//!   without waiting for the expiry.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::leader::Election;
use super::{PgStore, boot, standby};
use crate::clock::Now;
use crate::config::CoordinatorConfig;
use crate::pool::Pool;
use crate::{RunError, serve_pool};

/// How often a standby tries to take the lead.
pub const POLL: Duration = Duration::from_millis(250);

/// What `bind` checks before the address file is written: the database is
/// reachable, the CA and credentials are there; the CA certificate is
/// written under the state dir, where clients of this coordinator read it.
pub fn prepare(config: &CoordinatorConfig, url: &str) -> Result<(), RunError> {
    let store = PgStore::open(url)?;
    let ca = boot::ca(config, &store)?;
    boot::auth(config, &store)?;
    let (cert, _) = berth_tls::Ca::paths(&config.state_dir);
    berth_runtime::fs::write_atomic(
        &cert,
        ca.cert_pem().as_bytes(),
        0o644,
        berth_runtime::fs::Durability::Process,
    )
    .map_err(|source| RunError::AddrFile { path: cert, source })?;
    Ok(())
}

/// Runs a coordinator of the shared pool on `listener` until `shutdown`.
pub async fn serve(
    config: CoordinatorConfig,
    url: &str,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let store = Arc::new(PgStore::open(url)?);
    let ca = Arc::new(boot::ca(&config, &store)?);
    let auth = Arc::new(boot::auth(&config, &store)?);
    let advertise = match &config.advertise {
        Some(a) => a.clone(),
        None => listener
            .local_addr()
            .map_err(RunError::Listener)?
            .to_string(),
    };
    let mut election = Election::new(url, advertise, config.leader_ttl);
    let socket = listener.into_std().map_err(RunError::Listener)?;
    let clone = || {
        socket
            .try_clone()
            .and_then(TcpListener::from_std)
            .map_err(RunError::Listener)
    };

    // Standby until this coordinator leads. The first attempt comes before
    // the standby answers: a coordinator that finds the lead free (the
    // first of a pool, or one restarted after a clean stop) never answers
    // as a standby; connections wait in the listen backlog meanwhile.
    let (leader_tx, leader_rx) = watch::channel(String::new());
    let standby_stop = shutdown.child_token();
    let mut standby = None;
    let term = loop {
        match election.try_lead().await {
            Ok(Some(term)) => break Some(term),
            Ok(None) => match election.leader().await {
                Ok(l) => {
                    leader_tx.send_if_modified(|cur| {
                        let addr = l.map(|l| l.addr).unwrap_or_default();
                        let changed = *cur != addr;
                        *cur = addr;
                        changed
                    });
                }
                Err(e) => warn!(error = %e, "cannot read who leads"),
            },
            Err(e) => warn!(error = %e, "cannot try to take the lead"),
        }
        if standby.is_none() {
            info!(
                "standing by: serving health, answering UNAVAILABLE until this coordinator leads"
            );
            // A standby is up as far as its supervisor is concerned (systemd
            // `Type=notify` would otherwise give up on it at its start
            // timeout); READY=1 comes again, with a new status, once it leads.
            berth_runtime::systemd::ready("standing by: another coordinator leads");
            standby = Some(tokio::spawn(standby::serve(
                clone()?,
                ca.clone(),
                config.server_names(),
                leader_rx.clone(),
                standby_stop.clone(),
            )));
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => break None,
        }
    };
    standby_stop.cancel();
    // Standby answers are immediate; a client holding a connection open
    // does not hold the takeover for long.
    if let Some(standby) = standby {
        match tokio::time::timeout(Duration::from_secs(2), standby).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "the standby server failed"),
            Ok(_) => {}
            Err(_) => warn!("the standby server did not stop within 2s; leading anyway"),
        }
    }
    let Some(term) = term else {
        return Ok(());
    };

    info!(term, "this coordinator leads; loading the pool");
    store.set_term(term);
    let taken = std::time::Instant::now();
    let pool = Arc::new({
        let store = store.clone();
        let cfg = crate::pool_config(&config, &auth);
        tokio::task::spawn_blocking(move || Pool::with_store(cfg, store, Now::system()))
            .await
            .map_err(|e| RunError::Deposed {
                term,
                why: format!("loading the pool panicked: {e}"),
            })??
    });
    info!(term, took = ?taken.elapsed(), "pool loaded; serving as leader");
    let lead_stop = shutdown.child_token();
    let keeper = tokio::spawn(keep_leading(
        election,
        term,
        store.clone(),
        lead_stop.clone(),
    ));
    let served = serve_pool(&config, clone()?, ca, auth, pool, lead_stop.clone()).await;
    lead_stop.cancel();
    let (mut election, deposed) = match keeper.await {
        Ok(r) => r,
        Err(e) => {
            return Err(RunError::Deposed {
                term,
                why: format!("the lead keeper panicked: {e}"),
            });
        }
    };
    if let Some(why) = deposed {
        return Err(RunError::Deposed { term, why });
    }
    store.set_term(0);
    match election.resign(term).await {
        Ok(()) => info!(term, "gave the lead up"),
        Err(e) => warn!(term, error = %e, "could not give the lead up; it expires on its own"),
    }
    served
}

/// Renews the lead of `term` until `stop`; returns why it was lost, if it
/// was (then `stop` has been cancelled and the store fenced locally).
async fn keep_leading(
    mut election: Election,
    term: u64,
    store: Arc<PgStore>,
    stop: CancellationToken,
) -> (Election, Option<String>) {
    let ttl = election.ttl();
    let every = ttl / 5;
    // Counted from when a renewal was sent: the database's expiry is later.
    let mut valid_until = Instant::now() + ttl;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return (election, None),
        }
        let sent = Instant::now();
        let lost = match tokio::time::timeout(every, election.renew(term)).await {
            Ok(Ok(true)) => {
                valid_until = sent + ttl;
                None
            }
            Ok(Ok(false)) => Some("another coordinator holds the lead, or it expired".to_owned()),
            Ok(Err(e)) => {
                warn!(term, error = %e, "renewing the lead failed");
                None
            }
            Err(_) => {
                warn!(term, "renewing the lead timed out");
                None
            }
        };
        // Half the claim left: stop well before it can expire, with room
        // for one more check and one slow renewal.
        let lost = lost.or_else(|| {
            (Instant::now() + ttl / 2 >= valid_until)
                .then(|| format!("the lead was not renewed for {:?}", ttl / 2))
        });
        if let Some(why) = lost {
            store.set_term(0);
            error!(term, %why, "lost the lead: no longer serving");
            stop.cancel();
            return (election, Some(why));
        }
    }
}
