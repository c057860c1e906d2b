//! Pinning a key. A lease's certificates are bound to the one key the build
//! made at acquire, and a host to the key its agent first registered with:
//! a lease id, a build id or a host id alone is never a capability.
//! [`KeyId`] is the SHA-256 of a key's SubjectPublicKeyInfo (DER), computed
//! the same way from a CSR (what the coordinator is sent) and from a
//! certificate (what a TLS peer presents).

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;

/// The fingerprint of one public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 32]);

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl KeyId {
    fn of_spki(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    /// The key a PEM CSR asks to be certified (its signature is not checked
    /// here: `ca::parse_csr` does that).
    pub fn of_csr_pem(csr_pem: &str) -> Result<Self, TlsError> {
        let der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
                .map_err(|e| TlsError::BadCsr(e.to_string()))?;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
                .map_err(|e| TlsError::BadCsr(e.to_string()))?;
        Ok(Self::of_spki(
            csr.certification_request_info.subject_pki.raw,
        ))
    }

    /// The key of a DER certificate.
    pub fn of_cert_der(der: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| TlsError::cert("certificate", e))?;
        Ok(Self::of_spki(cert.tbs_certificate.subject_pki.raw))
    }

    /// The key of the first certificate in a PEM.
    pub fn of_cert_pem(pem: &str) -> Result<Self, TlsError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| TlsError::cert("certificate", e))?;
        Self::of_cert_der(&der)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }

    /// From raw bytes (a field of the wire contract); `None` unless 32 long.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(b).ok().map(Self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_certificate_has_the_key_of_its_csr_and_keys_differ() {
        let (ca, _) = crate::Ca::generate("test").unwrap();
        let k1 = crate::KeyAndCsr::generate("one").unwrap();
        let k2 = crate::KeyAndCsr::generate("two").unwrap();
        let now = SystemTime::now();
        let cert = ca
            .sign_lease(
                &k1.csr_pem,
                "4f1c2a3b-0000-4000-8000-000000000001",
                now,
                now + Duration::from_secs(60),
            )
            .unwrap();
        let id1 = KeyId::of_csr_pem(&k1.csr_pem).unwrap();
        assert_eq!(KeyId::of_cert_pem(&cert).unwrap(), id1);
        assert_ne!(KeyId::of_csr_pem(&k2.csr_pem).unwrap(), id1);
        // A renewal's CSR for the same key has the same id.
        let again = crate::KeyAndCsr::for_key(&k1.key_pem, "renew").unwrap();
        assert_eq!(KeyId::of_csr_pem(&again.csr_pem).unwrap(), id1);
        assert_eq!(KeyId::parse_hex(&id1.to_hex()), Some(id1));
        assert_eq!(KeyId::from_slice(&id1.0), Some(id1));
        assert!(KeyId::of_csr_pem("not a csr").is_err());
    }
}
