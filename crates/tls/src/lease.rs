//! TLS of an agent's Docker front. The server side presents the agent's
//! certificate (signed by the pool CA, SAN = host address) and admits a
//! client only if its certificate chains to the pool CA, is within its
//! validity, is meant for client authentication, names the lease the front
//! was opened for, **and** carries the key the lease is pinned to
//! ([`PinnedKey`]): a certificate the coordinator issued for the lease to
//! anyone else (a renewal with another key is refused, but defence in
//! depth) never opens the host. The checks run inside the handshake, so a
//! wrong certificate never gets as far as the proxy.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::{KeyId, TlsError};

/// The DNS name a lease's client certificate carries as its SAN. `.invalid`
/// is reserved: the name can never resolve or collide with a real host.
pub fn lease_dns_name(lease_id: &str) -> String {
    format!("{lease_id}.lease.berth.invalid")
}

/// An agent's TLS identity as the coordinator issued it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity").finish_non_exhaustive()
    }
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::cert(what, e))?;
    if certs.is_empty() {
        return Err(TlsError::cert(what, "no certificate in the PEM"));
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::cert("private key", e))
}

/// A root store holding the pool CA.
pub fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("CA certificate", ca_pem)? {
        roots
            .add(c)
            .map_err(|e| TlsError::cert("CA certificate", e))?;
    }
    Ok(roots)
}

/// The key a lease's client certificate must carry. Shared with the open
/// front, so a pin the coordinator moves (an acquire retried with a new key
/// before the lease was first used) takes effect at the next handshake.
///
/// The front fixes the pin at the key of the first connection it admits
/// ([`PinnedKey::fix`]); from then on it never moves, whatever the
/// coordinator asks: one lease, one key in use. Checking the key and fixing
/// it happen under one lock, so a move that races the first connection
/// either comes first (and that connection is refused) or is refused.
#[derive(Debug, Clone)]
pub struct PinnedKey(Arc<std::sync::RwLock<Pin>>);

#[derive(Debug, Clone, Copy)]
struct Pin {
    key: KeyId,
    fixed: bool,
}

impl PinnedKey {
    /// A pin that may still move.
    pub fn new(key: KeyId) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Pin { key, fixed: false })))
    }

    /// A pin fixed at `key` from the start (a lease that was in use before
    /// its agent restarted).
    pub fn fixed(key: KeyId) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Pin { key, fixed: true })))
    }

    fn pin(&self) -> Pin {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self) -> KeyId {
        self.pin().key
    }

    /// Whether the pin is fixed (a connection with its key was admitted).
    #[cfg(test)]
    fn is_fixed(&self) -> bool {
        self.pin().fixed
    }

    /// Moves the pin to `key`, unless it is fixed; whether it now pins `key`.
    #[must_use]
    pub fn set(&self, key: KeyId) -> bool {
        let mut pin = self.0.write().unwrap_or_else(|e| e.into_inner());
        if !pin.fixed {
            pin.key = key;
        }
        pin.key == key
    }

    /// Fixes the pin at `key` if that is the key it pins (every admitted
    /// connection asks, with the key its certificate carried).
    #[must_use]
    pub fn fix(&self, key: KeyId) -> Fix {
        let mut pin = self.0.write().unwrap_or_else(|e| e.into_inner());
        if pin.key != key {
            Fix::Moved
        } else if pin.fixed {
            Fix::Again
        } else {
            pin.fixed = true;
            Fix::First
        }
    }
}

/// What [`PinnedKey::fix`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// This call fixed the key: the lease's first use.
    First,
    /// The key was fixed before, at this key.
    Again,
    /// The pin holds another key: it moved after the connection carrying
    /// this one was checked, and that connection must be dropped.
    Moved,
}

/// Checks the chain with webpki, then that the certificate names the lease
/// and carries its pinned key.
#[derive(Debug)]
struct LeaseVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    lease_name: ServerName<'static>,
    key: PinnedKey,
}

impl ClientCertVerifier for LeaseVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_is_valid_for_subject_name(&self.lease_name)
            .map_err(|_| {
                // A valid pool certificate of another (or an ended) lease.
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
            })?;
        let key = KeyId::of_cert_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if key != self.key.get() {
            // The lease's name with a key that is not the lease's.
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The front's TLS configuration for one lease, admitting only
/// certificates of that lease that carry the `key` it is pinned to.
pub fn lease_server_config(
    identity: &ServerIdentity,
    lease_id: &str,
    pinned: PinnedKey,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crate::provider();
    let chain = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&identity.ca_pem)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::cert("client verifier", e))?;
    let lease_name = ServerName::try_from(lease_dns_name(lease_id))
        .map_err(|e| TlsError::cert("lease id", e))?;
    let verifier = Arc::new(LeaseVerifier {
        chain,
        lease_name,
        key: pinned,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::cert("protocol versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs("server certificate", &identity.cert_pem)?,
            key(&identity.key_pem)?,
        )
        .map_err(|e| TlsError::cert("server certificate", e))?;
    // No session resumption: a resumed session skips the client
    // certificate's verification, so a key that got in once would keep
    // getting in after the pin moved. Every connection runs the full
    // check. (The docker CLI keeps no sessions between invocations anyway.)
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration that trusts the pool CA and presents a lease's
/// certificate (tests and the benchmark; the docker CLI does the same).
pub fn lease_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::cert("protocol versions", e))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs("client certificate", cert_pem)?, key(key_pem)?)
        .map_err(|e| TlsError::cert("client certificate", e))?;
    Ok(Arc::new(config))
}

/// Runs one TLS handshake in memory between `server` and `client`, the
/// client expecting `server_name`; once both sides complete, how the
/// server ran it (full, or a resumed session). What the server sends after
/// its last handshake message (TLS 1.3 session tickets) reaches the client
/// in the same exchange, so a later handshake with the same client
/// configuration can offer that session. For tests and diagnostics: what
/// the front would admit, without a socket.
pub fn handshake_in_memory(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: &str,
) -> Result<rustls::HandshakeKind, String> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let mut c = rustls::ClientConnection::new(client, name).map_err(|e| e.to_string())?;
    let mut s = rustls::ServerConnection::new(server).map_err(|e| e.to_string())?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).map_err(|e| e.to_string())?;
        s.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        s.process_new_packets()
            .map_err(|e| format!("server: {e}"))?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).map_err(|e| e.to_string())?;
        c.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        c.process_new_packets()
            .map_err(|e| format!("client: {e}"))?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return s.handshake_kind().ok_or_else(|| "no handshake kind".into());
        }
    }
    Err("handshake did not finish".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<rustls::HandshakeKind, String> {
        handshake_in_memory(server, client, "198.18.0.2")
    }
    use crate::{Ca, KeyAndCsr};
    use std::time::{Duration, SystemTime};

    struct Rig {
        ca: Ca,
        server: ServerIdentity,
    }

    fn rig() -> Rig {
        let (ca, _) = Ca::generate("test CA").unwrap();
        let host = KeyAndCsr::generate("host").unwrap();
        let now = SystemTime::now();
        let cert_pem = ca
            .sign_host(&host.csr_pem, "h", "198.18.0.2".parse().unwrap(), now)
            .unwrap();
        let server = ServerIdentity {
            cert_pem,
            key_pem: host.key_pem,
            ca_pem: ca.cert_pem().to_owned(),
        };
        Rig { ca, server }
    }

    /// The key every "good" client of these tests uses; the front is pinned to it.
    fn lease_key() -> &'static KeyAndCsr {
        static K: std::sync::OnceLock<KeyAndCsr> = std::sync::OnceLock::new();
        K.get_or_init(|| KeyAndCsr::generate("ci").unwrap())
    }

    fn pinned() -> PinnedKey {
        PinnedKey::new(KeyId::of_csr_pem(&lease_key().csr_pem).unwrap())
    }

    fn client_with(
        ca: &Ca,
        k: &KeyAndCsr,
        lease: &str,
        before: SystemTime,
        after: SystemTime,
    ) -> Arc<ClientConfig> {
        let cert = ca
            .sign_lease_between(&k.csr_pem, lease, before, after)
            .unwrap();
        lease_client_config(ca.cert_pem(), &cert, &k.key_pem).unwrap()
    }

    fn client_for(
        ca: &Ca,
        lease: &str,
        before: SystemTime,
        after: SystemTime,
    ) -> Arc<ClientConfig> {
        client_with(ca, lease_key(), lease, before, after)
    }

    #[test]
    fn only_the_current_lease_certificate_gets_in() {
        let r = rig();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let server = lease_server_config(&r.server, "lease-a", pinned()).unwrap();

        let good = client_for(&r.ca, "lease-a", now - hour, now + hour);
        handshake(server.clone(), good).unwrap();

        let other = client_for(&r.ca, "lease-b", now - hour, now + hour);
        let e = handshake(server.clone(), other).unwrap_err();
        assert!(e.contains("server"), "{e}");

        let expired = client_for(&r.ca, "lease-a", now - 2 * hour, now - hour);
        assert!(handshake(server.clone(), expired).is_err());

        let (cert, key) = crate::ca::self_signed_lease("lease-a").unwrap();
        let forged = lease_client_config(r.ca.cert_pem(), &cert, &key).unwrap();
        assert!(handshake(server.clone(), forged).is_err());

        // Another CA's certificate for the right lease.
        let (other_ca, _) = Ca::generate("other").unwrap();
        let foreign = client_for(&other_ca, "lease-a", now - hour, now + hour);
        assert!(handshake(server.clone(), foreign).is_err());

        // The agent's own server certificate is not a client certificate.
        let as_client =
            lease_client_config(r.ca.cert_pem(), &r.server.cert_pem, &r.server.key_pem).unwrap();
        assert!(handshake(server.clone(), as_client).is_err());

        // No client certificate at all.
        let anonymous = ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(r.ca.cert_pem()).unwrap())
            .with_no_client_auth();
        assert!(handshake(server, Arc::new(anonymous)).is_err());
    }

    #[test]
    fn a_reissued_certificate_for_the_same_lease_gets_in() {
        let r = rig();
        let now = SystemTime::now();
        let server = lease_server_config(&r.server, "lease-a", pinned()).unwrap();
        for _ in 0..2 {
            let c = client_for(&r.ca, "lease-a", now, now + Duration::from_secs(60));
            handshake(server.clone(), c).unwrap();
        }
    }

    #[test]
    fn a_certificate_of_the_lease_with_another_key_is_refused_until_the_pin_moves() {
        let r = rig();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let pin = pinned();
        let server = lease_server_config(&r.server, "lease-a", pin.clone()).unwrap();
        let thief = KeyAndCsr::generate("thief").unwrap();
        let stolen = client_with(&r.ca, &thief, "lease-a", now - hour, now + hour);
        assert!(handshake(server.clone(), stolen.clone()).is_err());
        handshake(
            server.clone(),
            client_for(&r.ca, "lease-a", now, now + hour),
        )
        .unwrap();
        // The coordinator moved the pin (a retried acquire before first use):
        // the new key gets in, the old one no longer does.
        assert!(pin.set(KeyId::of_csr_pem(&thief.csr_pem).unwrap()));
        handshake(server.clone(), stolen).unwrap();
        assert!(handshake(server, client_for(&r.ca, "lease-a", now, now + hour)).is_err());
    }

    #[test]
    fn no_session_is_resumed_so_a_key_that_got_in_is_refused_once_the_pin_moves() {
        let r = rig();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let pin = pinned();
        let server = lease_server_config(&r.server, "lease-a", pin.clone()).unwrap();
        // One client configuration: it keeps whatever session the front
        // offers, and offers it again on its next connection.
        let client = client_for(&r.ca, "lease-a", now - hour, now + hour);
        for _ in 0..2 {
            let kind = handshake(server.clone(), client.clone()).unwrap();
            assert_eq!(kind, rustls::HandshakeKind::Full);
        }
        // The pin moved (a retried acquire with another key): the same
        // client, with everything it kept, no longer gets in.
        let retry = KeyAndCsr::generate("retry").unwrap();
        assert!(pin.set(KeyId::of_csr_pem(&retry.csr_pem).unwrap()));
        let e = handshake(server, client).unwrap_err();
        assert!(e.contains("server"), "{e}");
    }

    #[test]
    fn a_fixed_pin_does_not_move_and_only_its_own_key_fixes_it() {
        let r = rig();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let pin = pinned();
        let ours = KeyId::of_csr_pem(&lease_key().csr_pem).unwrap();
        let retry = KeyAndCsr::generate("retry").unwrap();
        let theirs = KeyId::of_csr_pem(&retry.csr_pem).unwrap();
        let server = lease_server_config(&r.server, "lease-a", pin.clone()).unwrap();
        // A connection checked against a key the pin no longer holds cannot
        // fix it (the pin moved during its handshake).
        assert_eq!(pin.fix(theirs), Fix::Moved);
        assert!(!pin.is_fixed());
        // The first admitted connection fixes the key it carried ...
        handshake(
            server.clone(),
            client_for(&r.ca, "lease-a", now - hour, now + hour),
        )
        .unwrap();
        assert_eq!(pin.fix(ours), Fix::First);
        assert!(pin.is_fixed());
        // ... and from then on no move takes: the retried acquire's key
        // stays out, the key in use stays in.
        assert!(!pin.set(theirs), "a fixed pin moved");
        assert_eq!(pin.get(), ours);
        let moved = client_with(&r.ca, &retry, "lease-a", now - hour, now + hour);
        assert!(handshake(server.clone(), moved).is_err());
        handshake(server, client_for(&r.ca, "lease-a", now - hour, now + hour)).unwrap();
        // Fixing again at the same key is fine (every admitted connection
        // asks); at another, refused.
        assert_eq!(pin.fix(ours), Fix::Again);
        assert_eq!(pin.fix(theirs), Fix::Moved);
        // A pin made fixed (a resumed lease that was in use) is the same.
        let resumed = PinnedKey::fixed(ours);
        assert!(resumed.is_fixed());
        assert_eq!(
            resumed.fix(ours),
            Fix::Again,
            "a resumed lease's use is not new"
        );
        assert!(!resumed.set(theirs));
        assert_eq!(resumed.get(), ours);
    }
}
