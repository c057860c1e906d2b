//! The coordinator's own TLS. Its server certificate comes from the pool CA
//! and is re-issued before it runs out, without a restart: [`RotatingCert`]
//! is the rustls certificate resolver, so every new handshake gets the
//! current certificate and established connections keep theirs. Callers
//! authenticate inside the connection (tenant tokens, the join token), not
//! with client certificates.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::ca::HOST_CERT_VALIDITY;
use crate::{Ca, TlsError};

/// Share of a certificate's lifetime after which it is re-issued: a third
/// of it (ten days of thirty) is left for a failed re-issue to be retried
/// and noticed.
pub const ROTATE_AFTER: f64 = 2.0 / 3.0;

/// A server certificate that renews itself.
pub struct RotatingCert {
    ca: Arc<Ca>,
    names: Vec<String>,
    current: RwLock<Current>,
}

struct Current {
    key: Arc<CertifiedKey>,
    issued: SystemTime,
    cert_pem: String,
}

impl std::fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatingCert")
            .field("names", &self.names)
            .field("issued", &self.read().issued)
            .finish_non_exhaustive()
    }
}

fn certified(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::cert("server certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::cert("server key", e))?;
    let signing = crate::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::cert("server key", e))?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

impl RotatingCert {
    /// Issues the first certificate for `names` as of `now`.
    pub fn new(ca: Arc<Ca>, names: Vec<String>, now: SystemTime) -> Result<Self, TlsError> {
        let current = Self::issue(&ca, &names, now)?;
        Ok(Self {
            ca,
            names,
            current: RwLock::new(current),
        })
    }

    fn issue(ca: &Ca, names: &[String], now: SystemTime) -> Result<Current, TlsError> {
        let (cert_pem, key_pem) = ca.issue_server_at(names, now)?;
        Ok(Current {
            key: certified(&cert_pem, &key_pem)?,
            issued: now,
            cert_pem,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// When the current certificate runs out.
    pub fn not_after(&self) -> SystemTime {
        self.read().issued + HOST_CERT_VALIDITY
    }

    /// When the current certificate is due to be re-issued.
    pub fn due(&self) -> SystemTime {
        self.read().issued + HOST_CERT_VALIDITY.mul_f64(ROTATE_AFTER)
    }

    /// The current certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.read().cert_pem.clone()
    }

    /// Re-issues the certificate if it is due at `now`; returns whether it did.
    pub fn rotate_if_due(&self, now: SystemTime) -> Result<bool, TlsError> {
        if now < self.due() {
            return Ok(false);
        }
        let next = Self::issue(&self.ca, &self.names, now)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(true)
    }

    /// How long until the next check is worth making: the time to the due
    /// date, at least a minute, at most an hour (a clock that jumps is
    /// noticed within the hour).
    pub fn next_check(&self, now: SystemTime) -> Duration {
        self.due()
            .duration_since(now)
            .unwrap_or_default()
            .clamp(Duration::from_secs(60), Duration::from_secs(3600))
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().key.clone())
    }
}

/// The coordinator's server configuration: the rotating certificate and HTTP/2.
pub fn coordinator_server_config(cert: Arc<RotatingCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::cert("protocol versions", e))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_certificate_is_reissued_after_two_thirds_of_its_life_and_not_before() {
        let (ca, _) = Ca::generate("test").unwrap();
        let t0 = SystemTime::now();
        let c = RotatingCert::new(Arc::new(ca), vec!["127.0.0.1".into()], t0).unwrap();
        let first = c.cert_pem();
        assert_eq!(c.not_after(), t0 + HOST_CERT_VALIDITY);
        let day = Duration::from_secs(24 * 3600);
        assert!(!c.rotate_if_due(t0 + 19 * day).unwrap());
        assert_eq!(c.cert_pem(), first);
        assert_eq!(c.next_check(t0 + 19 * day), Duration::from_secs(3600));
        assert!(c.rotate_if_due(t0 + 21 * day).unwrap());
        assert_ne!(c.cert_pem(), first);
        assert_eq!(c.not_after(), t0 + 21 * day + HOST_CERT_VALIDITY);
        assert!(!c.rotate_if_due(t0 + 22 * day).unwrap());
    }
}
