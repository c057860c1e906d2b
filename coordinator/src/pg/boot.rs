//! What every coordinator of a shared pool must hold the same copy of,
//! kept in the database (`berth_meta`): the pool CA (certificate in the
//! clear, key sealed with [`super::seal`]), the tenants and the pool join
//! token hash.
//!
//! - CA: `--ca-cert`/`--ca-key` given: they are stored (replacing what was
//!   there). Otherwise the database's CA is used, and the first
//!   coordinator to start creates it (an insert-if-absent, so two that
//!   start together agree on one).
//! - Tenants and join token hash: a coordinator started with `--tenants` /
//!   `--join-token-hash-file` stores the file's contents; one started
//!   without uses what the database holds. Changing a tenant is changing
//!   the file and restarting one coordinator with it (then the others).
//!
//! These writes are configuration, not pool state: they are not fenced by
//! the leader's term, and a standby makes them at start as a leader does;
//! a value the database already holds is not written again, so a
//! coordinator restarted with the pool's own files writes nothing.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::PgStore;
use super::seal::{SealError, SealKey};
use crate::api::auth::{Auth, AuthError};
use crate::config::CoordinatorConfig;
use crate::store::{LeaseStore, StoreError};

const CA_KEY: &str = "ca";
const TENANTS_KEY: &str = "tenants";
const JOIN_KEY: &str = "join-token-hash";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("pool CA: {0}")]
    Ca(#[from] berth_tls::TlsError),
    #[error("the pool CA record in the database is unreadable: {0}")]
    CaRecord(#[source] serde_json::Error),
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "{flag} is required for the first coordinator of a pool: the database holds no {what} yet"
    )]
    Missing {
        flag: &'static str,
        what: &'static str,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The pool CA as stored: certificate in the clear, key sealed.
#[derive(Serialize, Deserialize)]
struct CaRecord {
    cert_pem: String,
    sealed_key: Vec<u8>,
}

fn read(path: &Path) -> Result<String, BootError> {
    std::fs::read_to_string(path).map_err(|source| BootError::Read {
        what: path.display().to_string(),
        source,
    })
}

/// The pool CA from the database (see the module doc).
pub fn ca(config: &CoordinatorConfig, store: &PgStore) -> Result<berth_tls::Ca, BootError> {
    let Some(key_file) = &config.store_key_file else {
        return Err(BootError::Missing {
            flag: "--store-key-file",
            what: "store key",
        });
    };
    let seal = SealKey::load(key_file)?;
    let record = |cert_pem: String, key_pem: &str| -> Result<Vec<u8>, BootError> {
        let r = CaRecord {
            cert_pem,
            sealed_key: seal.seal(key_pem.as_bytes())?,
        };
        Ok(serde_json::to_vec(&r).unwrap_or_default())
    };
    let stored = match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => {
            let (cert_pem, key_pem) = (read(cert)?, read(key)?);
            // Checked before it replaces what the pool uses.
            berth_tls::Ca::from_pem(&cert_pem, &key_pem)?;
            let held = store.get_meta(CA_KEY)?;
            let same = held.as_deref().and_then(|b| {
                let r: CaRecord = serde_json::from_slice(b).ok()?;
                let k = seal.open(&r.sealed_key).ok()?;
                (r.cert_pem == cert_pem && k == key_pem.as_bytes()).then_some(())
            });
            match (same, held) {
                // Sealing again would give other bytes (a fresh nonce).
                (Some(()), Some(bytes)) => bytes,
                _ => {
                    let bytes = record(cert_pem, &key_pem)?;
                    store.put_meta(CA_KEY, &bytes)?;
                    tracing::info!("stored the operator's pool CA in the database");
                    bytes
                }
            }
        }
        _ => match store.get_meta(CA_KEY)? {
            Some(bytes) => bytes,
            None => {
                let (ca, key_pem) = berth_tls::Ca::generate("berth pool CA")?;
                let bytes = record(ca.cert_pem().to_owned(), &key_pem)?;
                let winner = store.init_meta(CA_KEY, &bytes)?;
                if winner == bytes {
                    tracing::info!("created the pool CA in the database");
                }
                winner
            }
        },
    };
    let r: CaRecord = serde_json::from_slice(&stored).map_err(BootError::CaRecord)?;
    let key_pem = String::from_utf8(seal.open(&r.sealed_key)?).map_err(|_| SealError::Open)?;
    Ok(berth_tls::Ca::from_pem(&r.cert_pem, &key_pem)?)
}

/// Stores the file's contents under `key` if the flag names a file, else
/// reads what the database holds.
fn shared_file(
    store: &PgStore,
    key: &str,
    file: Option<&Path>,
    flag: &'static str,
    what: &'static str,
) -> Result<String, BootError> {
    if let Some(path) = file {
        let text = read(path)?;
        store.put_meta(key, text.as_bytes())?;
        return Ok(text);
    }
    let bytes = store
        .get_meta(key)?
        .ok_or(BootError::Missing { flag, what })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The credentials the pool accepts, from the files or the database.
pub fn auth(config: &CoordinatorConfig, store: &PgStore) -> Result<Auth, BootError> {
    let tenants = shared_file(
        store,
        TENANTS_KEY,
        config.tenants.as_deref(),
        "--tenants",
        "tenants",
    )?;
    let join = shared_file(
        store,
        JOIN_KEY,
        config.join_token_hash_file.as_deref(),
        "--join-token-hash-file",
        "join token hash",
    )?;
    let from = |flag: &str, file: Option<&Path>| {
        file.map(Path::to_owned)
            .unwrap_or_else(|| format!("the database's {flag}").into())
    };
    Ok(Auth::parse(
        &tenants,
        &from("tenants", config.tenants.as_deref()),
        &join,
        &from("join token hash", config.join_token_hash_file.as_deref()),
    )?)
}
