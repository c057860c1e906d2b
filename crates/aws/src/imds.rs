//! What an EC2 instance learns about itself from IMDSv2: its identity
//! (instance id, private address, type, zone) and where Auto Scaling is
//! taking it (`autoscaling/target-lifecycle-state`: `InService`, or
//! `Warmed:*` for a warm-pool instance).
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
