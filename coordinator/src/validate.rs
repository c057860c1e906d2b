//! Checks of everything that arrives over the network, before it reaches the
//! pool. Each check names the field and says what was wrong with it.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::Error;

/// Longest build id, host id or reason string accepted.
pub const MAX_ID_LEN: usize = 128;

/// A build or host id: 1..=128 printable ASCII characters, no spaces.
pub fn id(field: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; the limit is {MAX_ID_LEN}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(Error::invalid(
            field,
            format!("contains {c:?}; only printable ASCII without spaces is allowed"),
        ));
    }
    Ok(())
}

/// A lease id as the coordinator issues them (a UUID).
pub fn lease_id(value: &str) -> Result<String, Error> {
    if value.is_empty() {
        return Err(Error::invalid("lease_id", "must not be empty"));
    }
    uuid::Uuid::try_parse(value)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| {
            let shown: String = value.chars().take(40).collect();
            Error::invalid("lease_id", format!("{shown:?} is not a berth lease id"))
        })
}

/// A duration field: present or defaulted, positive, and at most `max`.
pub fn duration(
    field: &'static str,
    value: Option<&prost_types::Duration>,
    default: Option<Duration>,
    allow_zero: bool,
    max: Duration,
) -> Result<Duration, Error> {
    let d = match value {
        None => default.ok_or_else(|| Error::invalid(field, "is required"))?,
        Some(v) => berth_proto::to_duration(v).ok_or_else(|| {
            Error::invalid(
                field,
                format!("{}s {}ns is negative or malformed", v.seconds, v.nanos),
            )
        })?,
    };
    if d.is_zero() && !allow_zero {
        return Err(Error::invalid(field, "must be greater than zero"));
    }
    if d > max {
        return Err(Error::invalid(
            field,
            format!(
                "{} is longer than the maximum of {}",
                humantime::format_duration(d),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(d)
}

/// A host address: an IP address.
pub fn host_addr(value: &str) -> Result<IpAddr, Error> {
    value
        .parse::<IpAddr>()
        .map_err(|_| Error::invalid("host_addr", format!("{value:?} is not an IP address")))
}

/// A DOCKER_HOST value as agents report it: `tcp://ADDR:PORT`.
pub fn docker_host(value: &str) -> Result<(), Error> {
    let rest = value.strip_prefix("tcp://").ok_or_else(|| {
        Error::invalid("docker_host", format!("{value:?} must start with tcp://"))
    })?;
    rest.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| Error::invalid("docker_host", format!("{value:?} is not tcp://ADDR:PORT")))
}

/// A short free-text field (reasons, versions): bounded length.
pub fn text(field: &'static str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; the limit is {max}", value.len()),
        ));
    }
    Ok(())
}

/// A key fingerprint (SHA-256 of a SubjectPublicKeyInfo) that a message
/// may leave empty: `None` when empty, an error unless 32 bytes.
pub fn optional_key(field: &'static str, value: &[u8]) -> Result<Option<berth_tls::KeyId>, Error> {
    if value.is_empty() {
        return Ok(None);
    }
    berth_tls::KeyId::from_slice(value)
        .map(Some)
        .ok_or_else(|| Error::invalid(field, "must be 32 bytes (a SHA-256)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(id("build_id", "ci-123").is_ok());
        assert!(id("build_id", "gh/run:42@attempt-1").is_ok());
        for bad in ["", "has space", "tab\t", "é", &"x".repeat(129)] {
            let err = id("build_id", bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(err.to_string().contains("build_id"), "{err}");
        }
    }

    #[test]
    fn lease_ids() {
        let u = uuid::Uuid::new_v4().to_string();
        assert_eq!(lease_id(&u).unwrap(), u);
        assert!(lease_id("").is_err());
        assert!(lease_id("nope").is_err());
        assert!(lease_id(&"9".repeat(10_000)).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn durations() {
        let max = Duration::from_secs(3600);
        let d = |s| prost_types::Duration {
            seconds: s,
            nanos: 0,
        };
        assert_eq!(
            duration("ttl", Some(&d(60)), None, false, max).unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            duration("ttl", None, Some(Duration::from_secs(5)), false, max).unwrap(),
            Duration::from_secs(5)
        );
        assert!(duration("ttl", None, None, false, max).is_err());
        assert!(duration("ttl", Some(&d(0)), None, false, max).is_err());
        assert!(duration("wait", Some(&d(0)), None, true, max).is_ok());
        assert!(duration("ttl", Some(&d(-1)), None, false, max).is_err());
        let err = duration("ttl", Some(&d(3601)), None, false, max).unwrap_err();
        assert!(err.to_string().contains("maximum"), "{err}");
    }

    #[test]
    fn addresses() {
        assert!(host_addr("198.18.0.2").is_ok());
        assert!(host_addr("::1").is_ok());
        assert!(host_addr("example.com").is_err());
        assert!(docker_host("tcp://198.18.0.2:2376").is_ok());
        assert!(docker_host("unix:///var/run/docker.sock").is_err());
        assert!(docker_host("tcp://nohost").is_err());
    }
}
