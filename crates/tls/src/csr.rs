//! The requester's side: a fresh key pair and a CSR carrying its public key.
//! The key stays with the caller (CI machine, agent); only the CSR travels.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::TlsError;

/// A private key and a CSR for it, both PEM.
#[derive(Clone)]
pub struct KeyAndCsr {
    pub key_pem: String,
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("KeyAndCsr").finish_non_exhaustive()
    }
}

impl KeyAndCsr {
    /// A fresh ECDSA P-256 key (PKCS#8, which the docker CLI loads) and its CSR.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::cert("generating a key", e))?;
        let csr_pem = csr_for(&key, common_name)?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_pem,
        })
    }

    /// A new CSR for an existing key (renewal keeps the key).
    pub fn for_key(key_pem: &str, common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::cert("the key", e))?;
        let csr_pem = csr_for(&key, common_name)?;
        Ok(Self {
            key_pem: key_pem.to_owned(),
            csr_pem,
        })
    }
}

fn csr_for(key: &KeyPair, common_name: &str) -> Result<String, TlsError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.serialize_request(key)
        .and_then(|c| c.pem())
        .map_err(|e| TlsError::cert("making a CSR", e))
}
