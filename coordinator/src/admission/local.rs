//! Admission with the local provider (`berth up`, a pool on one machine):
//! there is no cloud to ask who a host is, so [`LocalRange`] admits only a
//! host address inside the pool's range (`--local-range`, by default the
//! range the agents' network namespaces are cut from,
//! [`berth_proto::local::HOST_RANGE`]) and never a loopback, unspecified,
//! multicast or broadcast one. The CA signs a host's server certificate for
//! its address, so a join-token holder cannot get one for `127.0.0.1` or
//! for an address outside the pool.
//!
//! It is no proof of identity: anyone on the machine who holds the join
//! token can claim an address in the range. The local provider is
//! single-tenant (docs/security.md).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use tracing::warn;

use super::Verifier;
use crate::error::{self, Error};
use crate::pool::Registration;

/// An address range, `ADDR/LEN` (IPv4 or IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    base: IpAddr,
    len: u8,
}

impl Cidr {
    /// The local provider's default range.
    pub fn local_hosts() -> Self {
        Cidr {
            base: IpAddr::V4(berth_proto::local::HOST_RANGE_BASE),
            len: berth_proto::local::HOST_RANGE_PREFIX,
        }
    }

    /// Whether `addr` lies in the range (an IPv4-mapped IPv6 address counts
    /// as its IPv4 address).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.base, addr.to_canonical()) {
            (IpAddr::V4(base), IpAddr::V4(a)) => prefix_eq(&base.octets(), &a.octets(), self.len),
            (IpAddr::V6(base), IpAddr::V6(a)) => prefix_eq(&base.octets(), &a.octets(), self.len),
            _ => false,
        }
    }
}

/// Whether the first `len` bits of `a` and `b` agree.
fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let full = usize::from(len / 8);
    let rest = len % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDR/LEN"))?;
        let base: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{len:?} is not a prefix length"))?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} is more than {max}"));
        }
        let cidr = Cidr { base, len };
        if base.is_loopback() || base.is_unspecified() || len == 0 {
            return Err(format!(
                "{cidr} would admit loopback or every address; hosts need addresses of their own"
            ));
        }
        Ok(cidr)
    }
}

/// Why the local provider refuses an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("host address {0:?} is not an IP address")]
    NotAnAddress(String),
    #[error(
        "host address {0} is loopback, unspecified, multicast or broadcast: a host needs an address of its own"
    )]
    NotAHostAddress(IpAddr),
    #[error("host address {addr} is outside the pool's range {range} (--local-range)")]
    OutOfRange { addr: IpAddr, range: Cidr },
}

/// The local provider's verifier.
#[derive(Debug, Clone, Copy)]
pub struct LocalRange {
    range: Cidr,
}

impl LocalRange {
    pub fn new(range: Cidr) -> Self {
        Self { range }
    }

    /// The check, without the logging.
    pub fn check(&self, host_addr: &str) -> Result<(), Refusal> {
        let addr: IpAddr = host_addr
            .parse()
            .map_err(|_| Refusal::NotAnAddress(host_addr.to_owned()))?;
        let addr = addr.to_canonical();
        let special = match addr {
            IpAddr::V4(a) => a.is_broadcast() || a.is_multicast(),
            IpAddr::V6(a) => a.is_multicast(),
        };
        if addr.is_loopback() || addr.is_unspecified() || special {
            return Err(Refusal::NotAHostAddress(addr));
        }
        if !self.range.contains(addr) {
            return Err(Refusal::OutOfRange {
                addr,
                range: self.range,
            });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Verifier for LocalRange {
    async fn verify(&self, reg: &Registration, peer: Option<SocketAddr>) -> Result<(), Error> {
        self.check(&reg.host_addr).map_err(|why| {
            warn!(host_id = %reg.host_id, peer = ?peer, host_addr = %reg.host_addr, reason = %why, "agent refused");
            Error::Refused {
                host_id: reg.host_id.clone(),
                reason: error::Refusal::Local(why),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_range_is_the_agents_namespace_range() {
        let v = LocalRange::new(Cidr::local_hosts());
        assert_eq!(v.check("198.18.0.2"), Ok(()));
        assert_eq!(v.check("198.19.255.254"), Ok(()));
        assert!(matches!(
            v.check("198.20.0.2"),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(
            v.check("10.0.0.2"),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(v.check("::ffff:198.18.0.2"), Ok(())));
        assert!(matches!(v.check("::1"), Err(Refusal::NotAHostAddress(_))));
    }

    #[test]
    fn loopback_and_other_non_host_addresses_are_refused_whatever_the_range() {
        // A range an operator widened: loopback is still no host's address.
        let v = LocalRange::new("1.0.0.0/1".parse().unwrap());
        for a in ["127.0.0.1", "127.9.9.9", "0.0.0.0", "::ffff:127.0.0.1"] {
            assert!(
                matches!(v.check(a), Err(Refusal::NotAHostAddress(_))),
                "{a}"
            );
        }
        let v = LocalRange::new("224.0.0.0/3".parse().unwrap());
        for a in ["224.0.0.1", "255.255.255.255"] {
            assert!(
                matches!(v.check(a), Err(Refusal::NotAHostAddress(_))),
                "{a}"
            );
        }
        assert!(matches!(
            v.check("localhost"),
            Err(Refusal::NotAnAddress(_))
        ));
    }

    #[test]
    fn ranges_parse_and_bound_their_prefix() {
        let r: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(r.contains("10.1.200.3".parse().unwrap()));
        assert!(!r.contains("10.2.0.1".parse().unwrap()));
        assert!(!r.contains("fd00::1".parse().unwrap()));
        let r: Cidr = "10.1.2.0/23".parse().unwrap();
        assert!(r.contains("10.1.3.255".parse().unwrap()));
        assert!(!r.contains("10.1.4.0".parse().unwrap()));
        let r: Cidr = "fd00:1::/32".parse().unwrap();
        assert!(r.contains("fd00:1:ffff::9".parse().unwrap()));
        assert!(!r.contains("fd00:2::1".parse().unwrap()));
        assert_eq!(r.to_string(), "fd00:1::/32");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/x",
            "127.0.0.0/8",
            "0.0.0.0/0",
            "10.0.0.0/0",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            Cidr::local_hosts().to_string(),
            berth_proto::local::HOST_RANGE
        );
    }
}
