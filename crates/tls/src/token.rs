//! Bearer tokens: tenant tokens for CI and the pool join token for agents.
//!
//! A token is 32 random bytes in hex behind a `berth_` prefix. Only its
//! SHA-256 is stored; a presented token is hashed and compared with every
//! stored hash in constant time, so neither the stored files nor the timing
//! of a refusal give a token away. Tokens are never logged.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::TlsError;

/// A fresh random token.
pub fn generate() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!("berth_{}", hex(&b))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// The SHA-256 of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

impl TokenHash {
    /// Hashes a token as presented (surrounding whitespace ignored).
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.trim().as_bytes()).into())
    }

    /// Parses 64 hex digits.
    pub fn parse_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Self(out))
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Whether `token` hashes to this, in constant time.
    pub fn matches(&self, token: &str) -> bool {
        Self::of(token).0.ct_eq(&self.0).into()
    }
}

/// One tenant of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// May call the AdminService and see every tenant's leases there.
    pub admin: bool,
    hash: TokenHash,
}

/// The tenants file: one tenant per line, `NAME SHA256_HEX [admin]`; blank
/// lines and `#` comments are ignored.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    tenants: Vec<Tenant>,
}

impl Tenants {
    pub fn parse(text: &str) -> Result<Self, TlsError> {
        let mut tenants: Vec<Tenant> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            let err = |reason: &str| TlsError::Tenants {
                line,
                reason: reason.to_owned(),
            };
            let mut f = l.split_whitespace();
            let (Some(name), Some(hash)) = (f.next(), f.next()) else {
                return Err(err("expected `NAME SHA256_HEX [admin]`"));
            };
            let admin = match f.next() {
                None => false,
                Some("admin") => true,
                Some(_) => return Err(err("the third field may only be `admin`")),
            };
            if f.next().is_some() {
                return Err(err("too many fields"));
            }
            if name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(err("tenant names are 1..=64 of [A-Za-z0-9._-]"));
            }
            let hash = TokenHash::parse_hex(hash)
                .ok_or_else(|| err("the token hash must be 64 hex digits (sha256)"))?;
            if tenants.iter().any(|t| t.name == name) {
                return Err(err("tenant listed twice"));
            }
            if tenants.iter().any(|t| t.hash == hash) {
                return Err(err("two tenants share one token"));
            }
            tenants.push(Tenant {
                name: name.to_owned(),
                admin,
                hash,
            });
        }
        Ok(Self { tenants })
    }

    /// The line for a tenants file.
    pub fn line(name: &str, token: &str, admin: bool) -> String {
        format!(
            "{name} {}{}\n",
            TokenHash::of(token).to_hex(),
            if admin { " admin" } else { "" }
        )
    }

    /// The tenant whose token this is. Every entry is compared, whether or
    /// not an earlier one matched, so the time taken says nothing.
    pub fn authenticate(&self, token: &str) -> Option<&Tenant> {
        let presented = TokenHash::of(token);
        let mut found = None;
        for t in &self.tenants {
            if bool::from(presented.0.ct_eq(&t.hash.0)) {
                found = Some(t);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }
}

/// The token of an `authorization: Bearer TOKEN` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_and_match() {
        let t = generate();
        assert!(t.starts_with("berth_") && t.len() == 6 + 64);
        let h = TokenHash::of(&t);
        assert!(h.matches(&t));
        assert!(h.matches(&format!(" {t}\n")));
        assert!(!h.matches(&generate()));
        assert_eq!(TokenHash::parse_hex(&h.to_hex()), Some(h));
        assert_eq!(TokenHash::parse_hex("zz"), None);
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }

    #[test]
    fn tenants_file() {
        let (a, b) = (generate(), generate());
        let text = format!(
            "# comment\n\n{}{}",
            Tenants::line("team-a", &a, false),
            Tenants::line("ops", &b, true)
        );
        let t = Tenants::parse(&text).unwrap();
        assert_eq!(t.len(), 2);
        let ta = t.authenticate(&a).unwrap();
        assert_eq!((ta.name.as_str(), ta.admin), ("team-a", false));
        assert!(t.authenticate(&b).unwrap().admin);
        assert!(t.authenticate("berth_wrong").is_none());
        assert!(t.authenticate("").is_none());

        let h = TokenHash::of("x").to_hex();
        for (bad, needle) in [
            ("lonely", "expected"),
            ("a nothex", "64 hex"),
            (&format!("a {h} root") as &str, "admin"),
            (&format!("a {h} admin extra"), "too many"),
            (&format!("a/b {h}"), "names"),
            (&format!("a {h}\na {h}"), "twice"),
            (&format!("a {h}\nb {h}"), "share"),
        ] {
            let e = Tenants::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
