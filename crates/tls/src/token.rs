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
    /// Its share of the pool.
    pub limits: TenantLimits,
    hash: TokenHash,
}

/// A tenant's share of the pool, from the optional `KEY=VALUE` fields of its
/// line in the tenants file. The coordinator enforces them: waiting builds
/// queue per tenant and tenants are served in turn, `weight` assignments per
/// turn; a tenant holding `max_active` hosts gets no other until one ends
/// (its builds wait); a request beyond `max_queued` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// `max-active=N`: hosts the tenant may hold at once.
    pub max_active: Option<u32>,
    /// `max-queued=N`: builds the tenant may have waiting at once.
    pub max_queued: Option<u32>,
    /// `weight=N` (1 unless given): assignments per turn.
    pub weight: u32,
    /// `cache-cap=SIZE` (`10GiB`, as `berth up --cache-tenant-cap`): the
    /// most its build cache may hold. `berth up`'s retention pass enforces
    /// it, not the coordinator; absent or 0: the pool-wide cap.
    pub cache_cap: Option<u64>,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            max_active: None,
            max_queued: None,
            weight: 1,
            cache_cap: None,
        }
    }
}

/// The largest weight a tenant may have (a turn is never unbounded).
pub const MAX_WEIGHT: u32 = 1000;

impl TenantLimits {
    /// Reads one `KEY=VALUE` field into `self`.
    fn set(&mut self, field: &str) -> Result<(), String> {
        const FIELDS: &str = "`max-active=N`, `max-queued=N`, `weight=N` or `cache-cap=SIZE`";
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("after the hash: `admin`, {FIELDS}"))?;
        let whole = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| "a limit's value is a whole number".to_owned())
        };
        let slot = match key {
            "max-active" => &mut self.max_active,
            "max-queued" => &mut self.max_queued,
            "weight" => {
                let n = whole(value)?;
                if !(1..=MAX_WEIGHT).contains(&n) {
                    return Err("weight is 1..=1000".into());
                }
                self.weight = n;
                return Ok(());
            }
            "cache-cap" => {
                let size = berth_runtime::size::parse_size(value)
                    .map_err(|e| format!("cache-cap: {e}"))?;
                if self.cache_cap.replace(size).is_some() {
                    return Err("a limit given twice".into());
                }
                return Ok(());
            }
            _ => return Err(format!("unknown field: expected {FIELDS}")),
        };
        let n = whole(value)?;
        if slot.replace(n).is_some() {
            return Err("a limit given twice".into());
        }
        Ok(())
    }

    /// The cap on the tenant's build cache: its own, else `pool_wide`.
    pub fn cache_cap_or(&self, pool_wide: u64) -> u64 {
        match self.cache_cap {
            Some(cap) if cap > 0 => cap,
            _ => pool_wide,
        }
    }
}

/// The tenant's namespace in the build cache registry. Tenant names allow
/// upper case and `._-` where repository names do not: a name of only
/// lower-case letters and digits is its own namespace, any other is `h-`
/// and a hash (which has a `-`, so the two kinds never meet).
pub fn cache_namespace(tenant: &str) -> String {
    if !tenant.is_empty()
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return tenant.to_owned();
    }
    let hash = TokenHash::of(&format!("berth cache namespace\0{tenant}")).to_hex();
    format!("h-{}", &hash[..32])
}

/// The tenants file: one tenant per line, `NAME SHA256_HEX [admin]
/// [max-active=N] [max-queued=N] [weight=N] [cache-cap=SIZE]` (see
/// [`TenantLimits`]); blank
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
            let mut f = l.split_whitespace().peekable();
            let (Some(name), Some(hash)) = (f.next(), f.next()) else {
                return Err(err("expected `NAME SHA256_HEX [admin] [KEY=VALUE ...]`"));
            };
            let admin = f.next_if_eq(&"admin").is_some();
            let mut limits = TenantLimits::default();
            for field in f {
                if field == "admin" {
                    return Err(err("`admin` comes right after the hash"));
                }
                limits.set(field).map_err(|r| err(&r))?;
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
                limits,
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

    /// Every tenant, in the file's order.
    pub fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.iter()
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
        let limited = Tenants::parse(&format!(
            "a {h} admin max-active=3 weight=2\nb {} max-queued=0",
            TokenHash::of("y").to_hex()
        ))
        .unwrap();
        let t: Vec<_> = limited.iter().map(|t| (t.admin, t.limits)).collect();
        assert_eq!(
            t,
            [
                (
                    true,
                    TenantLimits {
                        max_active: Some(3),
                        max_queued: None,
                        weight: 2,
                        cache_cap: None,
                    }
                ),
                (
                    false,
                    TenantLimits {
                        max_active: None,
                        max_queued: Some(0),
                        weight: 1,
                        cache_cap: None,
                    }
                )
            ]
        );
        assert_eq!(
            Tenants::parse(&format!("c {h}"))
                .unwrap()
                .iter()
                .next()
                .unwrap()
                .limits,
            TenantLimits::default()
        );
        for (bad, needle) in [
            ("lonely", "expected"),
            ("a nothex", "64 hex"),
            (&format!("a {h} root") as &str, "admin"),
            (&format!("a {h} admin extra"), "after the hash"),
            (&format!("a {h} max-active=2 admin"), "right after the hash"),
            (&format!("a {h} max-active=x"), "whole number"),
            (&format!("a {h} max-active=-1"), "whole number"),
            (&format!("a {h} max-ative=1"), "unknown field"),
            (&format!("a {h} max-queued=1 max-queued=2"), "twice"),
            (&format!("a {h} weight=0"), "weight is"),
            (&format!("a {h} weight=1001"), "weight is"),
            (
                &format!("a {h} cache-cap=ten"),
                "cache-cap: \"ten\": expected a size",
            ),
            (
                &format!("a {h} cache-cap=1GB"),
                "cache-cap: \"1GB\": unknown unit",
            ),
            (&format!("a {h} cache-cap="), "cache-cap"),
            (&format!("a {h} cache-cap=-1G"), "cache-cap"),
            (&format!("a {h} cache-cap=1G cache-cap=2G"), "twice"),
            (&format!("a {h} cache_cap=1G"), "unknown field"),
            (&format!("a/b {h}"), "names"),
            (&format!("a {h}\na {h}"), "twice"),
            (&format!("a {h}\nb {h}"), "share"),
        ] {
            let e = Tenants::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn cache_caps() {
        let (x, y, z) = (
            TokenHash::of("x").to_hex(),
            TokenHash::of("y").to_hex(),
            TokenHash::of("z").to_hex(),
        );
        let t = Tenants::parse(&format!(
            "big {x} cache-cap=20GiB max-active=2\nzero {y} cache-cap=0\nplain {z} weight=3"
        ))
        .unwrap();
        let caps: Vec<_> = t
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    t.limits.cache_cap,
                    t.limits.cache_cap_or(7),
                )
            })
            .collect();
        assert_eq!(
            caps,
            [
                ("big", Some(20 << 30), 20 << 30),
                // 0 and absent: the pool-wide cap.
                ("zero", Some(0), 7),
                ("plain", None, 7),
            ]
        );
        assert_eq!(t.iter().next().unwrap().limits.max_active, Some(2));
        // The error names the line.
        let e = Tenants::parse(&format!("ok {x}\n\nbad {y} cache-cap=lots"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tenants file line 3: cache-cap: "), "{e}");
    }

    #[test]
    fn cache_namespaces() {
        assert_eq!(cache_namespace("team7"), "team7");
        for t in ["Team", "a-b", "a.b", ""] {
            let n = cache_namespace(t);
            assert!(n.starts_with("h-") && n.len() == 34, "{t}: {n}");
        }
        assert_ne!(cache_namespace("a-b"), cache_namespace("a_b"));
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
