//! What an EC2 instance learns about itself from IMDSv2: its identity
//! (instance id, private address, type, zone), where Auto Scaling is
//! taking it (`autoscaling/target-lifecycle-state`: `InService`, or
//! `Warmed:*` for a warm-pool instance), and whether EC2 announced it will
//! take the instance back (`spot/instance-action`,
//! `events/recommendations/rebalance`).
//!
//! [`Metadata`] is the seam; [`Imds`] is aws-config's IMDSv2 client (token
//! first, then each path), whose endpoint follows the SDK's standard
//! settings (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, the profile). Every read
//! goes through [`crate::retry`] with [`IMDS_RETRY`].

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::retry::{Outcome, RetryError, RetryPolicy, with_retries};

/// Bounds on one IMDS read. IMDS is a link-local service that answers in
/// milliseconds; a few quick attempts cover a busy boot.
pub const IMDS_RETRY: RetryPolicy = RetryPolicy {
    attempts: 5,
    attempt_timeout: Duration::from_secs(2),
    base_delay: Duration::from_millis(100),
    max_delay: Duration::from_secs(1),
};
/// Connect and read timeouts inside one attempt.
pub const IMDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const IMDS_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Paths berth reads, relative to the IMDS endpoint.
pub const PATH_INSTANCE_ID: &str = "/latest/meta-data/instance-id";
pub const PATH_LOCAL_IPV4: &str = "/latest/meta-data/local-ipv4";
pub const PATH_INSTANCE_TYPE: &str = "/latest/meta-data/instance-type";
pub const PATH_ZONE: &str = "/latest/meta-data/placement/availability-zone";
pub const PATH_TARGET_LIFECYCLE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
pub const PATH_SPOT_ACTION: &str = "/latest/meta-data/spot/instance-action";
pub const PATH_REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";

/// EC2 announced it will take the instance back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interruption {
    pub kind: InterruptionKind,
    /// `terminate`, `stop` or `hibernate` for a spot interruption; empty
    /// for a rebalance recommendation.
    pub action: String,
    /// When the action happens (spot), or when the recommendation was
    /// issued (rebalance); `None` if IMDS gave no readable time.
    pub time: Option<std::time::SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptionKind {
    /// `spot/instance-action`: the spot instance goes in about two minutes.
    Spot,
    /// `events/recommendations/rebalance`: the spot instance is at elevated
    /// risk of interruption.
    Rebalance,
}

impl InterruptionKind {
    pub fn name(self) -> &'static str {
        match self {
            InterruptionKind::Spot => "spot-interruption",
            InterruptionKind::Rebalance => "rebalance-recommendation",
        }
    }
}

impl Interruption {
    /// Parses `spot/instance-action` (`{"action": "terminate", "time":
    /// "2017-09-18T08:22:00Z"}`); `None` if it is not that.
    pub fn parse_spot(json: &str) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Action {
            action: String,
            time: Option<String>,
        }
        let a: Action = serde_json::from_str(json).ok()?;
        Some(Interruption {
            kind: InterruptionKind::Spot,
            action: a.action,
            time: a.time.and_then(|t| humantime::parse_rfc3339(&t).ok()),
        })
    }

    /// Parses `events/recommendations/rebalance` (`{"noticeTime":
    /// "2020-11-05T08:22:00Z"}`); `None` if it is not that.
    pub fn parse_rebalance(json: &str) -> Option<Self> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Notice {
            notice_time: Option<String>,
        }
        let n: Notice = serde_json::from_str(json).ok()?;
        Some(Interruption {
            kind: InterruptionKind::Rebalance,
            action: String::new(),
            time: n
                .notice_time
                .and_then(|t| humantime::parse_rfc3339(&t).ok()),
        })
    }
}

/// Who this instance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdentity {
    pub instance_id: String,
    pub local_ipv4: Ipv4Addr,
    pub instance_type: String,
    pub availability_zone: String,
}

/// Where Auto Scaling is taking the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetLifecycle {
    /// In service: the agent registers and takes leases.
    InService,
    /// Headed for (or in) the warm pool: `Warmed:Pending`, `Warmed:Stopped`,
    /// `Warmed:Running`, `Warmed:Hibernated`, ... (the text after `Warmed:`).
    Warmed(String),
    /// Not in an Auto Scaling group (IMDS has no such path): treated as in
    /// service, so an instance launched by hand works.
    NoGroup,
    /// Any other state (`Standby`, `Detached`, `Terminated`, ...).
    Other(String),
}

impl TargetLifecycle {
    /// Parses the IMDS value.
    pub fn parse(value: &str) -> Self {
        let value = value.trim();
        match value.strip_prefix("Warmed:") {
            Some(rest) => TargetLifecycle::Warmed(rest.to_owned()),
            None if value == "InService" => TargetLifecycle::InService,
            None => TargetLifecycle::Other(value.to_owned()),
        }
    }

    /// Whether the instance belongs to the warm pool.
    pub fn is_warmed(&self) -> bool {
        matches!(self, TargetLifecycle::Warmed(_))
    }
}

impl std::fmt::Display for TargetLifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetLifecycle::InService => f.write_str("InService"),
            TargetLifecycle::Warmed(s) => write!(f, "Warmed:{s}"),
            TargetLifecycle::NoGroup => f.write_str("(no Auto Scaling group)"),
            TargetLifecycle::Other(s) => f.write_str(s),
        }
    }
}

/// What an IMDS read failed at.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: RetryError<String>,
    },
    #[error("IMDS {path}: {value:?} is not {expected}")]
    Invalid {
        path: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// The instance metadata berth needs.
pub trait Metadata: Send + Sync + 'static {
    /// Instance id, private IPv4 address, type and zone.
    fn identity(&self) -> impl Future<Output = Result<InstanceIdentity, ImdsError>> + Send;
    /// `autoscaling/target-lifecycle-state`.
    fn target_lifecycle(&self) -> impl Future<Output = Result<TargetLifecycle, ImdsError>> + Send;
    /// A spot interruption notice, else a rebalance recommendation, if EC2
    /// announced either (both answer 404 until then).
    fn interruption(&self) -> impl Future<Output = Result<Option<Interruption>, ImdsError>> + Send {
        async { Ok(None) }
    }
}

/// IMDSv2 through aws-config's client.
#[derive(Debug, Clone)]
pub struct Imds {
    client: aws_config::imds::Client,
}

impl Default for Imds {
    fn default() -> Self {
        Self::from_env()
    }
}

impl Imds {
    /// A client for the endpoint the SDK's standard settings name (the
    /// real IMDS when nothing is set). Retries are ours, not the SDK's.
    pub fn from_env() -> Self {
        let client = aws_config::imds::Client::builder()
            .configure(
                &aws_config::provider_config::ProviderConfig::default()
                    .with_http_client(crate::https_client()),
            )
            .max_attempts(1)
            .connect_timeout(IMDS_CONNECT_TIMEOUT)
            .read_timeout(IMDS_READ_TIMEOUT)
            .build();
        Imds { client }
    }

    /// One path, retried; `Ok(None)` when IMDS answers 404 (no such item).
    async fn get(&self, path: &'static str) -> Result<Option<String>, ImdsError> {
        with_retries(path, &IMDS_RETRY, || async {
            match self.client.get(path).await {
                Ok(v) => Ok(Some(v.as_ref().trim().to_owned())),
                Err(aws_config::imds::client::error::ImdsError::ErrorResponse(r))
                    if r.response().status().as_u16() == 404 =>
                {
                    Ok(None)
                }
                Err(e) => Err(Outcome::Retry(crate::error_context(&e))),
            }
        })
        .await
        .map_err(|source| ImdsError::Read { path, source })
    }

    async fn get_required(&self, path: &'static str) -> Result<String, ImdsError> {
        match self.get(path).await? {
            Some(v) if !v.is_empty() => Ok(v),
            other => Err(ImdsError::Invalid {
                path,
                value: other.unwrap_or_default(),
                expected: "present (IMDS answered 404 or nothing)",
            }),
        }
    }
}

impl Metadata for Imds {
    #[tracing::instrument(skip(self), err)]
    async fn identity(&self) -> Result<InstanceIdentity, ImdsError> {
        let instance_id = self.get_required(PATH_INSTANCE_ID).await?;
        if !valid_instance_id(&instance_id) {
            return Err(ImdsError::Invalid {
                path: PATH_INSTANCE_ID,
                value: instance_id,
                expected: "an instance id (i-HEX)",
            });
        }
        let ip = self.get_required(PATH_LOCAL_IPV4).await?;
        let local_ipv4 = ip.parse().map_err(|_| ImdsError::Invalid {
            path: PATH_LOCAL_IPV4,
            value: ip.clone(),
            expected: "an IPv4 address",
        })?;
        let instance_type = self.get(PATH_INSTANCE_TYPE).await?.unwrap_or_default();
        let availability_zone = self.get(PATH_ZONE).await?.unwrap_or_default();
        Ok(InstanceIdentity {
            instance_id,
            local_ipv4,
            instance_type,
            availability_zone,
        })
    }

    async fn interruption(&self) -> Result<Option<Interruption>, ImdsError> {
        let invalid = |path, value: String| ImdsError::Invalid {
            path,
            value,
            expected: "the JSON EC2 documents for it",
        };
        if let Some(v) = self.get(PATH_SPOT_ACTION).await? {
            return Interruption::parse_spot(&v)
                .map(Some)
                .ok_or_else(|| invalid(PATH_SPOT_ACTION, v));
        }
        match self.get(PATH_REBALANCE).await? {
            Some(v) => Interruption::parse_rebalance(&v)
                .map(Some)
                .ok_or_else(|| invalid(PATH_REBALANCE, v)),
            None => Ok(None),
        }
    }

    #[tracing::instrument(skip(self), err)]
    async fn target_lifecycle(&self) -> Result<TargetLifecycle, ImdsError> {
        Ok(match self.get(PATH_TARGET_LIFECYCLE).await? {
            Some(v) => TargetLifecycle::parse(&v),
            None => TargetLifecycle::NoGroup,
        })
    }
}

/// `i-` and 8 or 17 lowercase hex digits, as EC2 issues them.
pub fn valid_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interruption_notices_parse() {
        let spot =
            Interruption::parse_spot(r#"{"action": "terminate", "time": "2017-09-18T08:22:00Z"}"#)
                .unwrap();
        assert_eq!(spot.kind, InterruptionKind::Spot);
        assert_eq!(spot.action, "terminate");
        assert_eq!(
            spot.time,
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_505_722_920))
        );
        let r = Interruption::parse_rebalance(r#"{"noticeTime": "2020-11-05T08:22:00Z"}"#).unwrap();
        assert_eq!(
            (r.kind, r.action.as_str()),
            (InterruptionKind::Rebalance, "")
        );
        assert!(r.time.is_some());
        // A time that does not parse is no time, not a failure.
        assert_eq!(
            Interruption::parse_spot(r#"{"action": "stop", "time": "soon"}"#)
                .unwrap()
                .time,
            None
        );
        assert_eq!(Interruption::parse_spot("<html>"), None);
        assert_eq!(Interruption::parse_spot(r#"{"time": "x"}"#), None);
    }

    #[test]
    fn lifecycle_values_parse() {
        assert_eq!(
            TargetLifecycle::parse("InService\n"),
            TargetLifecycle::InService
        );
        assert_eq!(
            TargetLifecycle::parse("Warmed:Stopped"),
            TargetLifecycle::Warmed("Stopped".into())
        );
        assert!(TargetLifecycle::parse("Warmed:Pending").is_warmed());
        assert_eq!(
            TargetLifecycle::parse("Standby"),
            TargetLifecycle::Other("Standby".into())
        );
        assert_eq!(
            TargetLifecycle::parse("Warmed:Running").to_string(),
            "Warmed:Running"
        );
    }

    #[test]
    fn instance_ids_are_checked() {
        assert!(valid_instance_id("i-0123456789abcdef0"));
        assert!(valid_instance_id("i-12345678"));
        for bad in [
            "",
            "i-",
            "i-XYZ",
            "x-0123456789abcdef0",
            "i-0123456789ABCDEF0",
            "i-123",
        ] {
            assert!(!valid_instance_id(bad), "{bad}");
        }
    }
}
