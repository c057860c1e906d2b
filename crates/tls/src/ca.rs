//! The pool CA: its key and certificate, and the certificates it signs.
//!
//! A CSR contributes only its public key (after its self-signature is
//! checked): subject, SANs, key usages and validity are set here, so no
//! requester can ask for a name, a usage or a lifetime it was not given.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::TlsError;
use crate::files;

/// Margin on both ends of every validity window: clocks of the coordinator,
/// the agents and CI machines are never exactly in step.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// How long a generated CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an agent's server certificate is valid; agents get a fresh one
/// each time they register.
pub const HOST_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Largest CSR accepted (a P-256 CSR is well under 1 KiB; RSA-4096 about 2).
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// File names under the coordinator's state directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// The pool CA.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    // Positive, as DER integers for serials must be.
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "berth");
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Ca {
    /// A fresh CA; returns it with its private key in PEM.
    pub fn generate(common_name: &str) -> Result<(Self, String), TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::cert("generating the CA key", e))?;
        let now = SystemTime::now();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(common_name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = (now - CLOCK_SKEW).into();
        p.not_after = (now + CA_VALIDITY).into();
        p.serial_number = Some(serial());
        let cert = p
            .self_signed(&key)
            .map_err(|e| TlsError::cert("self-signing the CA", e))?;
        let key_pem = key.serialize_pem();
        let ca = Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        };
        Ok((ca, key_pem))
    }

    /// A CA from its certificate and private key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::cert("the CA key", e))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| TlsError::cert("the CA certificate", e))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// Loads `CERT` and `KEY` files supplied by operators.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::from_pem(&files::read_pem(cert)?, &files::read_pem(key)?)
    }

    /// Loads the CA kept in `dir`, creating it (files 0600) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let (cert, key) = Self::paths(dir);
        if cert.exists() || key.exists() {
            return Self::load(&cert, &key);
        }
        files::create_private_dir(dir)?;
        let (ca, key_pem) = Self::generate("berth pool CA")?;
        // Key first: a certificate without its key would be loaded and fail.
        files::write_private(&key, key_pem.as_bytes())?;
        files::write_private(&cert, ca.cert_pem.as_bytes())?;
        tracing::info!(cert = %cert.display(), "created the pool CA");
        Ok(ca)
    }

    /// Where [`Ca::load_or_create`] keeps the CA under `dir`.
    pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE))
    }

    /// The CA certificate in PEM, as clients and agents must trust it.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn leaf(
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(common_name);
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![usage];
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        p.serial_number = Some(serial());
        p.use_authority_key_identifier_extension = true;
        p
    }

    fn sign_csr(&self, csr_pem: &str, params: &CertificateParams) -> Result<String, TlsError> {
        self.sign_parsed(&parse_csr(csr_pem)?, params)
    }

    fn sign_parsed(
        &self,
        csr: &CertificateSigningRequestParams,
        params: &CertificateParams,
    ) -> Result<String, TlsError> {
        params
            .signed_by(&csr.public_key, &self.issuer)
            .map(|c| c.pem())
            .map_err(|e| TlsError::cert("signing", e))
    }

    /// An agent's server certificate: SAN = the host's address, valid for
    /// [`HOST_CERT_VALIDITY`].
    pub fn sign_host(
        &self,
        csr_pem: &str,
        host_id: &str,
        addr: IpAddr,
        now: SystemTime,
    ) -> Result<String, TlsError> {
        self.sign_host_for(csr_pem, host_id, addr, now, HOST_CERT_VALIDITY)
    }

    /// [`Ca::sign_host`] valid for `validity` from `now`.
    pub fn sign_host_for(
        &self,
        csr_pem: &str,
        host_id: &str,
        addr: IpAddr,
        now: SystemTime,
        validity: Duration,
    ) -> Result<String, TlsError> {
        let p = Self::leaf(
            &format!("berth host {host_id}"),
            vec![SanType::IpAddress(addr)],
            ExtendedKeyUsagePurpose::ServerAuth,
            now - CLOCK_SKEW,
            now + validity,
        );
        self.sign_csr(csr_pem, &p)
    }

    /// A lease's client certificate: SAN = [`crate::lease_dns_name`], valid
    /// until the lease deadline plus [`CLOCK_SKEW`].
    pub fn sign_lease(
        &self,
        csr_pem: &str,
        lease_id: &str,
        now: SystemTime,
        deadline: SystemTime,
    ) -> Result<String, TlsError> {
        self.sign_lease_between(csr_pem, lease_id, now - CLOCK_SKEW, deadline + CLOCK_SKEW)
    }

    /// [`Ca::sign_lease`] for a CSR the caller already parsed (and so
    /// checked) with [`parse_csr`].
    pub fn sign_lease_parsed(
        &self,
        csr: &CertificateSigningRequestParams,
        lease_id: &str,
        now: SystemTime,
        deadline: SystemTime,
    ) -> Result<String, TlsError> {
        let p = Self::lease_params(lease_id, now - CLOCK_SKEW, deadline + CLOCK_SKEW)?;
        self.sign_parsed(csr, &p)
    }

    /// A lease certificate with an explicit validity window (tests use it
    /// for certificates that have run out).
    pub fn sign_lease_between(
        &self,
        csr_pem: &str,
        lease_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, TlsError> {
        let p = Self::lease_params(lease_id, not_before, not_after)?;
        self.sign_csr(csr_pem, &p)
    }

    /// What a lease certificate says: SAN = [`crate::lease_dns_name`].
    fn lease_params(
        lease_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateParams, TlsError> {
        let san = SanType::DnsName(
            crate::lease_dns_name(lease_id)
                .try_into()
                .map_err(|e| TlsError::cert("lease name", e))?,
        );
        Ok(Self::leaf(
            &format!("berth lease {lease_id}"),
            vec![san],
            ExtendedKeyUsagePurpose::ClientAuth,
            not_before,
            not_after,
        ))
    }

    /// A server certificate and its fresh key for the coordinator's gRPC
    /// endpoint; `sans` are IP addresses or DNS names.
    pub fn issue_server(&self, sans: &[String]) -> Result<(String, String), TlsError> {
        self.issue_server_at(sans, SystemTime::now())
    }

    /// [`Ca::issue_server`] as of `now`: valid from `now` (less the clock
    /// skew) for [`HOST_CERT_VALIDITY`].
    pub fn issue_server_at(
        &self,
        sans: &[String],
        now: SystemTime,
    ) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::cert("generating a key", e))?;
        let mut names = Vec::with_capacity(sans.len());
        for s in sans {
            names.push(match s.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    s.clone()
                        .try_into()
                        .map_err(|e| TlsError::cert("server name", format!("{s:?}: {e}")))?,
                ),
            });
        }
        let p = Self::leaf(
            "berth coordinator",
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            now - CLOCK_SKEW,
            now + HOST_CERT_VALIDITY,
        );
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| TlsError::cert("signing", e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A CSR as [`parse_csr`] returns it.
pub type ParsedCsr = CertificateSigningRequestParams;

/// When the first certificate in `pem` stops being valid.
pub fn not_after(pem: &str) -> Result<SystemTime, TlsError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::cert("certificate", e))?;
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| TlsError::cert("certificate", e))?;
    let secs = u64::try_from(cert.validity().not_after.timestamp())
        .map_err(|e| TlsError::cert("certificate validity", e))?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Parses a CSR and checks its self-signature.
pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, TlsError> {
    if csr_pem.is_empty() {
        return Err(TlsError::BadCsr("no CSR given".into()));
    }
    if csr_pem.len() > MAX_CSR_LEN {
        return Err(TlsError::BadCsr(format!(
            "{} bytes; the limit is {MAX_CSR_LEN}",
            csr_pem.len()
        )));
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| TlsError::BadCsr(e.to_string()))
}

/// A self-signed certificate naming `lease_id`, as an attacker could make
/// one; for tests that it is refused.
pub fn self_signed_lease(lease_id: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(|e| TlsError::cert("generating a key", e))?;
    let now = SystemTime::now();
    let name = crate::lease_dns_name(lease_id);
    let mut p = Ca::leaf(
        &format!("berth lease {lease_id}"),
        vec![SanType::DnsName(
            name.try_into()
                .map_err(|e| TlsError::cert("lease name", e))?,
        )],
        ExtendedKeyUsagePurpose::ClientAuth,
        now - CLOCK_SKEW,
        now + Duration::from_secs(3600),
    );
    p.use_authority_key_identifier_extension = false;
    let cert = p
        .self_signed(&key)
        .map_err(|e| TlsError::cert("self-signing", e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyAndCsr;

    #[test]
    fn ca_round_trips_through_its_files() {
        let dir = std::env::temp_dir().join(format!("berth-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Ca::load_or_create(&dir).unwrap();
        let b = Ca::load_or_create(&dir).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        use std::os::unix::fs::MetadataExt;
        let (cert, key) = Ca::paths(&dir);
        for f in [cert, key] {
            assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        }
        // A certificate signed by the reloaded CA chains to the first.
        let kc = KeyAndCsr::generate("c").unwrap();
        let pem = b
            .sign_host(
                &kc.csr_pem,
                "h1",
                "198.18.0.2".parse().unwrap(),
                SystemTime::now(),
            )
            .unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_csrs_are_refused() {
        let (ca, _) = Ca::generate("t").unwrap();
        let now = SystemTime::now();
        for bad in ["", "not pem", &"x".repeat(MAX_CSR_LEN + 1)] {
            let e = ca.sign_lease(bad, "l", now, now).unwrap_err();
            assert!(matches!(e, TlsError::BadCsr(_)), "{e}");
        }
        // A CSR whose signature does not match its key.
        let a = KeyAndCsr::generate("a").unwrap();
        let mut tampered = a.csr_pem.clone();
        let i = tampered.len() / 2;
        let c = tampered.as_bytes()[i];
        let repl = if c == b'A' { "B" } else { "A" };
        tampered.replace_range(i..=i, repl);
        assert!(ca.sign_lease(&tampered, "l", now, now).is_err());
    }
}
