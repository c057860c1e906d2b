//! What a lease's client certificate says, read back with an X.509 parser
//! rather than through the code that wrote it. The README's promise: the CA
//! "signs only public keys: a CSR's names, usages and lifetime are ignored";
//! a lease certificate's SAN is `LEASE_ID.lease.berth.invalid`, it is for
//! client authentication only, and it is valid until the lease deadline plus
//! one minute.
//!
//! A PKCS#10 CSR has no validity field, so a requester cannot ask for a
//! lifetime as such; what it can ask for is names, key usages and other
//! extensions (a CA's basic constraints, a private key usage period). Names
//! and key usages are ignored; a CSR asking for any other extension is
//! refused as a bad CSR.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_tls::ca::{CLOCK_SKEW, parse_csr};
use berth_tls::{Ca, TlsError, lease_dns_name};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const LEASE: &str = "0b9f0c1e-6a53-4f8e-9d61-1d2c3b4a5e6f";
const OTHER_LEASE: &str = "7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6";

/// A CSR asking for everything a lease certificate must not carry: another
/// lease's name, `localhost` and an IP address as SANs, server
/// authentication and code signing next to client authentication, the key
/// usages of a CA, and the pool CA's own subject.
fn greedy_csr() -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec![lease_dns_name(OTHER_LEASE), "localhost".to_owned()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "berth");
    dn.push(DnType::CommonName, "berth pool CA");
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::CodeSigning,
    ];
    // Not serialized: a CSR has no validity (rcgen drops these).
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

/// A CSR whose extension request holds one more extension (DER value).
fn csr_with_extension(oid: &[u64], value: Vec<u8>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![lease_dns_name(LEASE)]).unwrap();
    p.custom_extensions = vec![CustomExtension::from_oid_content(oid, value)];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn der(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    p.contents
}

/// Everything the README promises about a lease certificate, checked on the
/// parsed certificate.
fn check_lease_certificate(
    cert_pem: &str,
    ca_pem: &str,
    key: &KeyPair,
    now: SystemTime,
    deadline: SystemTime,
) {
    let cert_der = der(cert_pem);
    let (_, cert) = X509Certificate::from_der(&cert_der).unwrap();
    let ca_der = der(ca_pem);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();

    // Issued by the pool CA, for the requester's key, under a name of the CA's
    // choosing.
    cert.verify_signature(Some(ca.public_key()))
        .expect("signed by the pool CA");
    assert_eq!(cert.issuer(), ca.subject());
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the certificate is not for the CSR's key"
    );
    let cns: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cns, [format!("berth lease {LEASE}")]);

    // Exactly these extensions, each with the CA's content.
    let mut oids: Vec<String> = cert
        .extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect();
    oids.sort();
    assert_eq!(
        oids,
        [
            "2.5.29.14", // subject key identifier
            "2.5.29.15", // key usage
            "2.5.29.17", // subject alternative name
            "2.5.29.19", // basic constraints
            "2.5.29.35", // authority key identifier
            "2.5.29.37", // extended key usage
        ],
        "unexpected extensions"
    );
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                let expected = lease_dns_name(LEASE);
                assert_eq!(san.general_names, [GeneralName::DNSName(&expected)], "SANs");
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.client_auth, "not for client authentication");
                assert!(
                    !eku.any
                        && !eku.server_auth
                        && !eku.code_signing
                        && !eku.email_protection
                        && !eku.time_stamping
                        && !eku.ocsp_signing
                        && eku.other.is_empty(),
                    "usages beyond client authentication: {eku:?}"
                );
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ku.digital_signature(), "{ku}");
                assert!(
                    !ku.key_cert_sign() && !ku.crl_sign(),
                    "a lease certificate can sign certificates: {ku}"
                );
            }
            ParsedExtension::BasicConstraints(bc) => {
                assert!(!bc.ca, "a lease certificate is a CA");
            }
            ParsedExtension::SubjectKeyIdentifier(_)
            | ParsedExtension::AuthorityKeyIdentifier(_) => {}
            other => panic!("unexpected extension {other:?}"),
        }
    }

    // Valid from a minute before signing to a minute after the deadline
    // (X.509 times have whole seconds).
    let secs = |t: SystemTime| i64::try_from(t.duration_since(UNIX_EPOCH).unwrap().as_secs());
    let v = cert.validity();
    assert_eq!(
        v.not_after.timestamp(),
        secs(deadline + CLOCK_SKEW).unwrap(),
        "not after: {}",
        v.not_after
    );
    assert_eq!(
        v.not_before.timestamp(),
        secs(now - CLOCK_SKEW).unwrap(),
        "not before: {}",
        v.not_before
    );
    assert_eq!(
        CLOCK_SKEW,
        Duration::from_secs(60),
        "the README says a minute"
    );
}

#[test]
fn a_lease_certificate_takes_only_the_public_key_from_the_csr() {
    let (ca, _) = Ca::generate("berth pool CA").unwrap();
    let (key, csr) = greedy_csr();
    // The CSR really asks for all of it (rcgen reads it back).
    let asked = parse_csr(&csr).unwrap();
    assert_eq!(asked.params.subject_alt_names.len(), 3);
    assert!(
        asked
            .params
            .extended_key_usages
            .contains(&ExtendedKeyUsagePurpose::ServerAuth)
    );
    assert!(
        asked
            .params
            .key_usages
            .contains(&KeyUsagePurpose::KeyCertSign)
    );

    let now = SystemTime::now();
    let deadline = now + Duration::from_secs(30 * 60) + Duration::from_millis(700);
    let pem = ca.sign_lease(&csr, LEASE, now, deadline).unwrap();
    check_lease_certificate(&pem, ca.cert_pem(), &key, now, deadline);
    // The path the coordinator takes (the CSR parsed once, for Acquire and
    // Renew) issues the same.
    let pem = ca.sign_lease_parsed(&asked, LEASE, now, deadline).unwrap();
    check_lease_certificate(&pem, ca.cert_pem(), &key, now, deadline);
}

#[test]
fn a_csr_asking_for_other_extensions_is_refused() {
    let (ca, _) = Ca::generate("berth pool CA").unwrap();
    let now = SystemTime::now();
    let deadline = now + Duration::from_secs(60);
    // Basic constraints, CA:TRUE: SEQUENCE { BOOLEAN TRUE }.
    let ca_true = csr_with_extension(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    // Private key usage period, 2000 to 2100: SEQUENCE { [0] notBefore,
    // [1] notAfter } as GeneralizedTime: the nearest a CSR gets to asking
    // for a lifetime.
    let mut period = vec![0x30, 0x22, 0x80, 0x0f];
    period.extend_from_slice(b"20000101000000Z");
    period.extend_from_slice(&[0x81, 0x0f]);
    period.extend_from_slice(b"21000101000000Z");
    let long_life = csr_with_extension(&[2, 5, 29, 16], period);
    for (what, csr) in [
        ("basic constraints CA:TRUE", ca_true),
        ("a private key usage period", long_life),
    ] {
        let e = ca.sign_lease(&csr, LEASE, now, deadline).unwrap_err();
        assert!(matches!(e, TlsError::BadCsr(_)), "{what}: {e}");
        assert!(parse_csr(&csr).is_err(), "{what}");
    }
}
