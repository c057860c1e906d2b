//! The EC2 calls berth makes, behind [`Ec2Api`]: describe one instance (the
//! coordinator verifying an agent), list a pool's live instances (the
//! orphan sweeper), tag and untag (marking orphans), terminate (the agent
//! ending itself, the sweeper ending an orphan).
//!
//! [`Ec2`] is aws-sdk-ec2 configured from the SDK's standard settings
//! (`AWS_ENDPOINT_URL_EC2` / `AWS_ENDPOINT_URL`, the default credential and
//! region chains). The SDK's own retries are off: every call goes through
//! [`crate::retry`] with its named policy, and errors keep the SDK's full
//! context.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, Tag};

use crate::retry::{Outcome, RetryError, RetryPolicy, with_retries};

/// Bounds on reads (DescribeInstances): the coordinator answers an agent's
/// registration only after this, so it stays short.
pub const DESCRIBE_RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    attempt_timeout: Duration::from_secs(5),
    base_delay: Duration::from_millis(200),
    max_delay: Duration::from_secs(2),
};
/// Bounds on CreateTags / DeleteTags.
pub const TAG_RETRY: RetryPolicy = DESCRIBE_RETRY;
/// Bounds on TerminateInstances. The agent's whole termination (this, then
/// the power-off fallback) must fit its Terminating timeout.
pub const TERMINATE_RETRY: RetryPolicy = RetryPolicy {
    attempts: 4,
    attempt_timeout: Duration::from_secs(5),
    base_delay: Duration::from_millis(300),
    max_delay: Duration::from_secs(2),
};
/// Connect timeout inside one attempt.
pub const EC2_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pages of DescribeInstances read per pool listing (1000 instances each).
pub const MAX_DESCRIBE_PAGES: usize = 20;

/// EC2 error codes that mean "no such instance" rather than a failure.
const NOT_FOUND_CODES: [&str; 2] = ["InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"];
/// Service error codes worth another attempt.
const RETRYABLE_CODES: [&str; 6] = [
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "Unavailable",
];

/// An instance as berth cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping`, `stopped`.
    pub state: String,
    pub private_ip: Option<IpAddr>,
    pub launch_time: Option<SystemTime>,
    pub tags: BTreeMap<String, String>,
}

impl InstanceInfo {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// What an EC2 call failed at.
#[derive(Debug, thiserror::Error)]
#[error("EC2 {op} {target}: {source}")]
pub struct Ec2Error {
    pub op: &'static str,
    pub target: String,
    #[source]
    pub source: RetryError<String>,
}

/// The EC2 calls berth makes.
pub trait Ec2Api: Send + Sync + 'static {
    /// One instance; `Ok(None)` when EC2 does not know it.
    fn describe(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<Option<InstanceInfo>, Ec2Error>> + Send;
    /// Pending and running instances tagged `berth:pool=POOL`.
    fn pool_instances(
        &self,
        pool: &str,
    ) -> impl Future<Output = Result<Vec<InstanceInfo>, Ec2Error>> + Send;
    /// Sets one tag.
    fn tag(
        &self,
        instance_id: &str,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;
    /// Removes one tag.
    fn untag(
        &self,
        instance_id: &str,
        key: &str,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;
    /// TerminateInstances on one instance.
    fn terminate(&self, instance_id: &str) -> impl Future<Output = Result<(), Ec2Error>> + Send;
}

/// aws-sdk-ec2.
#[derive(Debug, Clone)]
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
}

impl Ec2 {
    /// A client from the SDK's standard settings (environment, profile,
    /// IMDS for region and credentials on an instance).
    pub async fn from_env() -> Self {
        Ec2 {
            client: aws_sdk_ec2::Client::new(&sdk_config().await),
        }
    }

    pub fn from_client(client: aws_sdk_ec2::Client) -> Self {
        Ec2 { client }
    }
}

/// The SDK's shared settings for every berth client: the standard
/// environment, profile and IMDS chains, berth's HTTPS client, the SDK's own
/// retries off (each call goes through [`crate::retry`]) and a connect
/// timeout inside each attempt.
pub(crate) async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(crate::https_client())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(EC2_CONNECT_TIMEOUT)
                .build(),
        )
        .load()
        .await
}

/// Sorts an SDK error into retry or final, keeping its full context.
fn classify<E, R>(e: SdkError<E, R>) -> Outcome<String>
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    classify_with(e, &RETRYABLE_CODES)
}

/// [`classify`] with the service's own list of codes worth retrying.
pub(crate) fn classify_with<E, R>(e: SdkError<E, R>, retryable: &[&str]) -> Outcome<String>
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let retry = match &e {
        SdkError::ServiceError(s) => s.err().code().is_some_and(|c| retryable.contains(&c)),
        // Timeouts, connection failures, unreadable responses.
        _ => true,
    };
    let text = crate::error_context(&e);
    if retry {
        Outcome::Retry(text)
    } else {
        Outcome::Fail(text)
    }
}

fn is_not_found<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(e, SdkError::ServiceError(s) if s.err().code().is_some_and(|c| NOT_FOUND_CODES.contains(&c)))
}

fn info(i: &aws_sdk_ec2::types::Instance) -> Option<InstanceInfo> {
    let instance_id = i.instance_id()?.to_owned();
    Some(InstanceInfo {
        instance_id,
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        private_ip: i.private_ip_address().and_then(|a| a.parse().ok()),
        launch_time: i.launch_time().and_then(|t| SystemTime::try_from(*t).ok()),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                ))
            })
            .collect(),
    })
}

impl Ec2Api for Ec2 {
    #[tracing::instrument(skip(self), err)]
    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, Ec2Error> {
        with_retries("DescribeInstances", &DESCRIBE_RETRY, || async {
            match self
                .client
                .describe_instances()
                .instance_ids(instance_id)
                .send()
                .await
            {
                Ok(out) => Ok(out
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(info)
                    .find(|i| i.instance_id == instance_id)),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(classify(e)),
            }
        })
        .await
        .map_err(|source| Ec2Error {
            op: "DescribeInstances",
            target: instance_id.to_owned(),
            source,
        })
    }

    #[tracing::instrument(skip(self), err)]
    async fn pool_instances(&self, pool: &str) -> Result<Vec<InstanceInfo>, Ec2Error> {
        let err = |source| Ec2Error {
            op: "DescribeInstances",
            target: format!("tag:{}={pool}", crate::POOL_TAG),
            source,
        };
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_DESCRIBE_PAGES {
            let page = with_retries("DescribeInstances", &DESCRIBE_RETRY, || async {
                self.client
                    .describe_instances()
                    .filters(
                        Filter::builder()
                            .name(format!("tag:{}", crate::POOL_TAG))
                            .values(pool)
                            .build(),
                    )
                    .filters(
                        Filter::builder()
                            .name("instance-state-name")
                            .values("pending")
                            .values("running")
                            .build(),
                    )
                    .set_next_token(token.clone())
                    .send()
                    .await
                    .map_err(classify)
            })
            .await
            .map_err(err)?;
            found.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(info),
            );
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        Ok(found)
    }

    #[tracing::instrument(skip(self), err)]
    async fn tag(&self, instance_id: &str, key: &str, value: &str) -> Result<(), Ec2Error> {
        with_retries("CreateTags", &TAG_RETRY, || async {
            self.client
                .create_tags()
                .resources(instance_id)
                .tags(Tag::builder().key(key).value(value).build())
                .send()
                .await
                .map(|_| ())
                .map_err(classify)
        })
        .await
        .map_err(|source| Ec2Error {
            op: "CreateTags",
            target: instance_id.to_owned(),
            source,
        })
    }

    #[tracing::instrument(skip(self), err)]
    async fn untag(&self, instance_id: &str, key: &str) -> Result<(), Ec2Error> {
        with_retries("DeleteTags", &TAG_RETRY, || async {
            self.client
                .delete_tags()
                .resources(instance_id)
                .tags(Tag::builder().key(key).build())
                .send()
                .await
                .map(|_| ())
                .map_err(classify)
        })
        .await
        .map_err(|source| Ec2Error {
            op: "DeleteTags",
            target: instance_id.to_owned(),
            source,
        })
    }

    #[tracing::instrument(skip(self), err)]
    async fn terminate(&self, instance_id: &str) -> Result<(), Ec2Error> {
        with_retries("TerminateInstances", &TERMINATE_RETRY, || async {
            self.client
                .terminate_instances()
                .instance_ids(instance_id)
                .send()
                .await
                .map(|_| ())
                .map_err(classify)
        })
        .await
        .map_err(|source| Ec2Error {
            op: "TerminateInstances",
            target: instance_id.to_owned(),
            source,
        })
    }
}
