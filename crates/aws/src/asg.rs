//! The Auto Scaling calls berth makes, behind [`AsgApi`]: read a group
//! (its capacity and instances), set its desired capacity (scale out),
//! terminate one chosen instance and decrement the desired capacity with it
//! (scale in), and set or clear an instance's scale-in protection. Only the
//! coordinator calls these: it alone changes capacity.
//!
//! [`Asg`] is aws-sdk-autoscaling configured like [`crate::Ec2`] (the
//! SDK's standard settings: `AWS_ENDPOINT_URL_AUTO_SCALING` /
//! `AWS_ENDPOINT_URL`, the default credential and region chains), the SDK's
//! own retries off, every call bounded by its named [`RetryPolicy`].

use std::future::Future;
use std::time::Duration;

use aws_sdk_autoscaling::error::{ProvideErrorMetadata, SdkError};

use crate::retry::{Outcome, RetryError, RetryPolicy, with_retries};

/// Bounds on DescribeAutoScalingGroups (the actuator reads the group on
/// every pass, so a slow answer only delays one pass).
pub const ASG_DESCRIBE_RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    attempt_timeout: Duration::from_secs(5),
    base_delay: Duration::from_millis(200),
    max_delay: Duration::from_secs(2),
};
/// Bounds on SetDesiredCapacity, TerminateInstanceInAutoScalingGroup and
/// SetInstanceProtection. A scaling activity in progress is retried.
pub const ASG_CHANGE_RETRY: RetryPolicy = RetryPolicy {
    attempts: 4,
    attempt_timeout: Duration::from_secs(5),
    base_delay: Duration::from_millis(300),
    max_delay: Duration::from_secs(2),
};
/// Instance ids per SetInstanceProtection call (the API's limit).
pub const MAX_PROTECTION_BATCH: usize = 50;

/// Service error codes worth another attempt.
const RETRYABLE_CODES: [&str; 6] = [
    "Throttling",
    "ThrottlingException",
    "ScalingActivityInProgress",
    "ResourceContention",
    "InternalFailure",
    "ServiceUnavailable",
];

/// One instance of a group as berth cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInstance {
    pub instance_id: String,
    /// `Pending`, `InService`, `Terminating`, `Warmed:*`, ...
    pub lifecycle_state: String,
    pub protected: bool,
}

/// A group's capacity and instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub min: u32,
    pub max: u32,
    pub desired: u32,
    pub instances: Vec<GroupInstance>,
}

/// What an Auto Scaling call failed at.
#[derive(Debug, thiserror::Error)]
#[error("Auto Scaling {op} {target}: {source}")]
pub struct AsgError {
    pub op: &'static str,
    pub target: String,
    #[source]
    pub source: RetryError<String>,
}

/// The Auto Scaling calls berth makes.
pub trait AsgApi: Send + Sync + 'static {
    /// The group; `Ok(None)` when Auto Scaling does not know it.
    fn describe_group(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<GroupInfo>, AsgError>> + Send;
    /// SetDesiredCapacity (cooldowns not honoured: the coordinator decides).
    fn set_desired(
        &self,
        name: &str,
        desired: u32,
    ) -> impl Future<Output = Result<(), AsgError>> + Send;
    /// TerminateInstanceInAutoScalingGroup with
    /// `ShouldDecrementDesiredCapacity=true`: the instance goes and is not
    /// replaced.
    fn terminate_and_decrement(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<(), AsgError>> + Send;
    /// SetInstanceProtection on `instance_ids` (at most
    /// [`MAX_PROTECTION_BATCH`]).
    fn set_protection(
        &self,
        name: &str,
        instance_ids: &[String],
        protected: bool,
    ) -> impl Future<Output = Result<(), AsgError>> + Send;
}

/// aws-sdk-autoscaling.
#[derive(Debug, Clone)]
pub struct Asg {
    client: aws_sdk_autoscaling::Client,
}

impl Asg {
    /// A client from the SDK's standard settings, as [`crate::Ec2::from_env`].
    pub async fn from_env() -> Self {
        Asg {
            client: aws_sdk_autoscaling::Client::new(&crate::ec2::sdk_config().await),
        }
    }

    pub fn from_client(client: aws_sdk_autoscaling::Client) -> Self {
        Asg { client }
    }
}

fn classify<E, R>(e: SdkError<E, R>) -> Outcome<String>
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    crate::ec2::classify_with(e, &RETRYABLE_CODES)
}

/// `op` retried under `policy`; a failure names the call and its target.
async fn call<T, F, Fut>(
    op: &'static str,
    target: String,
    policy: &RetryPolicy,
    attempt: F,
) -> Result<T, AsgError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Outcome<String>>>,
{
    with_retries(op, policy, attempt)
        .await
        .map_err(|source| AsgError { op, target, source })
}

fn count(v: Option<i32>) -> u32 {
    v.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

fn group(g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> GroupInfo {
    GroupInfo {
        name: g.auto_scaling_group_name().unwrap_or_default().to_owned(),
        min: count(g.min_size()),
        max: count(g.max_size()),
        desired: count(g.desired_capacity()),
        instances: g
            .instances()
            .iter()
            .filter_map(|i| {
                Some(GroupInstance {
                    instance_id: i.instance_id()?.to_owned(),
                    lifecycle_state: i
                        .lifecycle_state()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                    protected: i.protected_from_scale_in().unwrap_or(false),
                })
            })
            .collect(),
    }
}

impl AsgApi for Asg {
    #[tracing::instrument(skip(self), err)]
    async fn describe_group(&self, name: &str) -> Result<Option<GroupInfo>, AsgError> {
        let target = name.to_owned();
        call(
            "DescribeAutoScalingGroups",
            target,
            &ASG_DESCRIBE_RETRY,
            || async {
                self.client
                    .describe_auto_scaling_groups()
                    .auto_scaling_group_names(name)
                    .send()
                    .await
                    .map(|out| {
                        out.auto_scaling_groups()
                            .iter()
                            .find(|g| g.auto_scaling_group_name() == Some(name))
                            .map(group)
                    })
                    .map_err(classify)
            },
        )
        .await
    }

    #[tracing::instrument(skip(self), err)]
    async fn set_desired(&self, name: &str, desired: u32) -> Result<(), AsgError> {
        const OP: &str = "SetDesiredCapacity";
        let target = format!("{name} to {desired}");
        let Ok(n) = i32::try_from(desired) else {
            return Err(AsgError {
                op: OP,
                target,
                source: RetryError::Failed {
                    error: format!("desired capacity {desired} is out of range"),
                    attempts: 0,
                },
            });
        };
        call(OP, target, &ASG_CHANGE_RETRY, || async {
            self.client
                .set_desired_capacity()
                .auto_scaling_group_name(name)
                .desired_capacity(n)
                .honor_cooldown(false)
                .send()
                .await
                .map(|_| ())
                .map_err(classify)
        })
        .await
    }

    #[tracing::instrument(skip(self), err)]
    async fn terminate_and_decrement(&self, instance_id: &str) -> Result<(), AsgError> {
        call(
            "TerminateInstanceInAutoScalingGroup",
            instance_id.to_owned(),
            &ASG_CHANGE_RETRY,
            || async {
                self.client
                    .terminate_instance_in_auto_scaling_group()
                    .instance_id(instance_id)
                    .should_decrement_desired_capacity(true)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(classify)
            },
        )
        .await
    }

    #[tracing::instrument(skip(self), err)]
    async fn set_protection(
        &self,
        name: &str,
        instance_ids: &[String],
        protected: bool,
    ) -> Result<(), AsgError> {
        let target = format!("{name} {instance_ids:?} to {protected}");
        call(
            "SetInstanceProtection",
            target,
            &ASG_CHANGE_RETRY,
            || async {
                self.client
                    .set_instance_protection()
                    .auto_scaling_group_name(name)
                    .set_instance_ids(Some(instance_ids.to_vec()))
                    .protected_from_scale_in(protected)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(classify)
            },
        )
        .await
    }
}
