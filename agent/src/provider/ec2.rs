//! The EC2 provider: the host is the instance the agent runs on.
//!
//! - Identity comes from IMDSv2 ([`berth_aws::Metadata`]): the instance id
//!   is the host id, the private IPv4 address is the host address, and
//!   dockerd runs in the instance's own network namespace (no namespace per
//!   host), which is the host's own: dockerd manages its iptables and
//!   forwarding, and the rules of `hostnet` apply there.
//! - The Auto Scaling target lifecycle (`Warmed:*` / `InService`) drives the
//!   warm-pool behaviour of the state machine; `run` polls it.
//! - Terminating ends the instance: `TerminateInstances` on its own id
//!   (bounded, retried). If the API keeps failing, the agent powers the
//!   instance off instead ([`Ec2Provider`]'s power-off command, by default
//!   `systemctl poweroff`): the launch template sets the instance's shutdown
//!   behaviour to `terminate`, so a power-off ends it too. Either way the
//!   group's desired capacity is untouched and Auto Scaling replaces the
//!   instance. Only the agent ends its instance after a lease.
//! - The machine outlives the agent: a SIGTERM while idle (the instance
//!   being stopped into the warm pool, or the agent restarted) only stops
//!   the host's dockerd and directories ([`Provider::stop`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use berth_aws::{Ec2Api, Metadata, TargetLifecycle};

use crate::docker::dockerd::HostPaths;
use crate::provider::hostnet::HostNetwork;
use crate::provider::{Identity, Provider, ProviderError, host_scope, teardown};

/// Bound on the power-off command (it only has to ask systemd).
pub const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);
/// The power-off command used when none is configured.
pub const DEFAULT_POWEROFF_COMMAND: &str = "systemctl poweroff";

/// The EC2 provider over a metadata source and an EC2 API.
pub struct Ec2Provider<M, A> {
    metadata: M,
    ec2: A,
    state_dir: PathBuf,
    run_dir: PathBuf,
    prefix: String,
    /// Program and arguments of the power-off fallback.
    poweroff: Vec<String>,
    /// (instance id, local id), set by `identity`.
    host: Mutex<Option<(String, String)>>,
}

impl<M, A> std::fmt::Debug for Ec2Provider<M, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Provider")
            .field("poweroff", &self.poweroff)
            .finish_non_exhaustive()
    }
}

impl<M: Metadata, A: Ec2Api> Ec2Provider<M, A> {
    /// `poweroff` is split on whitespace into a program and its arguments.
    pub fn new(
        metadata: M,
        ec2: A,
        state_dir: PathBuf,
        run_dir: PathBuf,
        prefix: String,
        poweroff: &str,
    ) -> Self {
        Ec2Provider {
            metadata,
            ec2,
            state_dir,
            run_dir,
            prefix,
            poweroff: poweroff.split_whitespace().map(str::to_owned).collect(),
            host: Mutex::new(None),
        }
    }

    fn remembered(&self) -> Option<(String, String)> {
        self.host.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn teardown_local(&self, local_id: &str) -> Result<(), ProviderError> {
        let paths = HostPaths::new(&self.state_dir, &self.run_dir, local_id);
        let scope = host_scope(&self.state_dir, &self.run_dir, local_id, None);
        teardown(&scope, &paths).await
    }

    /// Runs the power-off command, bounded by [`POWEROFF_TIMEOUT`].
    async fn power_off(&self) -> Result<(), String> {
        let Some((program, args)) = self.poweroff.split_first() else {
            return Err("no power-off command configured".to_owned());
        };
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {program:?}: {e}"))?;
        match tokio::time::timeout(POWEROFF_TIMEOUT, child.wait_with_output()).await {
            Err(_) => Err(format!("{program:?} took longer than {POWEROFF_TIMEOUT:?}")),
            Ok(Err(e)) => Err(format!("waiting for {program:?}: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "{program:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }
}

impl<M: Metadata, A: Ec2Api> Provider for Ec2Provider<M, A> {
    fn name(&self) -> &'static str {
        "ec2"
    }

    #[tracing::instrument(skip(self), err)]
    async fn identity(&self) -> Result<Identity, ProviderError> {
        let id = self.metadata.identity().await?;
        let local_id = format!("{}{}", self.prefix, id.instance_id);
        *self.host.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((id.instance_id.clone(), local_id.clone()));
        Ok(Identity {
            host_id: id.instance_id,
            local_id,
            host_addr: IpAddr::V4(id.local_ipv4),
            netns: None,
            // The instance is the host: dockerd manages its iptables and
            // forwarding, and the IMDS rule applies there.
            network: HostNetwork::Own,
            instance_type: id.instance_type,
            zone: id.availability_zone,
        })
    }

    async fn lifecycle(&self) -> Result<Option<TargetLifecycle>, ProviderError> {
        Ok(Some(self.metadata.target_lifecycle().await?))
    }

    async fn interruption(&self) -> Result<Option<berth_aws::Interruption>, ProviderError> {
        Ok(self.metadata.interruption().await?)
    }

    fn machine_outlives_agent(&self) -> bool {
        true
    }

    #[tracing::instrument(skip(self), err)]
    async fn stop(&self) -> Result<(), ProviderError> {
        let (_, local_id) = self.remembered().ok_or(ProviderError::NoIdentity)?;
        self.teardown_local(&local_id).await
    }

    #[tracing::instrument(skip(self), err)]
    async fn terminate(&self) -> Result<(), ProviderError> {
        let (instance_id, local_id) = self.remembered().ok_or(ProviderError::NoIdentity)?;
        // The instance first: ending it is what matters, and once EC2 has
        // the request, a shutdown racing the local clean-up is harmless.
        match self.ec2.terminate(&instance_id).await {
            Ok(()) => tracing::info!(%instance_id, "TerminateInstances accepted"),
            Err(api) => {
                tracing::error!(
                    %instance_id,
                    error = %api,
                    poweroff = ?self.poweroff,
                    "TerminateInstances failed; powering off instead (shutdown behaviour terminate ends the instance)"
                );
                if let Err(poweroff) = self.power_off().await {
                    tracing::error!(%instance_id, error = %poweroff, "power-off fallback failed");
                    let _ = self.teardown_local(&local_id).await;
                    return Err(ProviderError::EndInstance {
                        instance_id,
                        api: Box::new(api),
                        poweroff,
                    });
                }
                tracing::warn!(%instance_id, "power-off requested");
            }
        }
        self.teardown_local(&local_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_aws::{Ec2Error, ImdsError, InstanceIdentity, InstanceInfo, RetryError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct FakeMetadata(TargetLifecycle);
    impl Metadata for FakeMetadata {
        async fn identity(&self) -> Result<InstanceIdentity, ImdsError> {
            Ok(InstanceIdentity {
                instance_id: "i-0123456789abcdef0".into(),
                local_ipv4: "10.1.2.3".parse().unwrap(),
                instance_type: "m7i.large".into(),
                availability_zone: "eu-west-1a".into(),
            })
        }
        async fn target_lifecycle(&self) -> Result<TargetLifecycle, ImdsError> {
            Ok(self.0.clone())
        }
    }

    #[derive(Default)]
    struct FakeEc2 {
        fail: bool,
        terminates: AtomicUsize,
    }
    impl Ec2Api for FakeEc2 {
        async fn describe(&self, _: &str) -> Result<Option<InstanceInfo>, Ec2Error> {
            Ok(None)
        }
        async fn pool_instances(&self, _: &str) -> Result<Vec<InstanceInfo>, Ec2Error> {
            Ok(vec![])
        }
        async fn tag(&self, _: &str, _: &str, _: &str) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn untag(&self, _: &str, _: &str) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn terminate(&self, id: &str) -> Result<(), Ec2Error> {
            self.terminates.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(Ec2Error {
                    op: "TerminateInstances",
                    target: id.to_owned(),
                    source: RetryError::Failed {
                        error: "dispatch failure: connection refused".into(),
                        attempts: 4,
                    },
                });
            }
            Ok(())
        }
    }

    fn dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("berth-aws-provider-{name}-{}", std::process::id()))
    }

    fn provider(
        fail: bool,
        poweroff: &str,
        base: &std::path::Path,
    ) -> Ec2Provider<FakeMetadata, FakeEc2> {
        Ec2Provider::new(
            FakeMetadata(TargetLifecycle::Warmed("Pending".into())),
            FakeEc2 {
                fail,
                ..FakeEc2::default()
            },
            base.join("state"),
            base.join("run"),
            "bte-".into(),
            poweroff,
        )
    }

    #[tokio::test]
    async fn identity_is_the_instance() {
        let base = dir("identity");
        let p = provider(false, "true", &base);
        assert!(matches!(
            p.terminate().await,
            Err(ProviderError::NoIdentity)
        ));
        let id = p.identity().await.unwrap();
        assert_eq!(id.host_id, "i-0123456789abcdef0");
        assert_eq!(id.local_id, "bte-i-0123456789abcdef0");
        assert_eq!(id.host_addr, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(id.netns, None);
        assert_eq!(
            (id.instance_type.as_str(), id.zone.as_str()),
            ("m7i.large", "eu-west-1a")
        );
        assert_eq!(
            p.lifecycle().await.unwrap(),
            Some(TargetLifecycle::Warmed("Pending".into()))
        );
        assert!(p.machine_outlives_agent());
    }

    #[tokio::test]
    async fn terminate_ends_the_instance_through_the_api_without_powering_off() {
        let base = dir("api");
        let marker = base.join("powered-off");
        let p = provider(false, &format!("touch {}", marker.display()), &base);
        p.identity().await.unwrap();
        std::fs::create_dir_all(base.join("state/bte-i-0123456789abcdef0")).unwrap();
        p.terminate().await.unwrap();
        assert_eq!(p.ec2.terminates.load(Ordering::SeqCst), 1);
        assert!(!marker.exists(), "powered off although the API worked");
        assert!(!base.join("state/bte-i-0123456789abcdef0").exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[tokio::test]
    async fn a_failing_api_falls_back_to_power_off() {
        let base = dir("fallback");
        std::fs::create_dir_all(&base).unwrap();
        let marker = base.join("powered-off");
        let p = provider(true, &format!("touch {}", marker.display()), &base);
        p.identity().await.unwrap();
        p.terminate().await.unwrap();
        assert!(marker.exists(), "the power-off command did not run");

        // Both failing is an error that names both.
        let p = provider(true, "false", &base);
        p.identity().await.unwrap();
        let e = p.terminate().await.unwrap_err().to_string();
        assert!(
            e.contains("connection refused") && e.contains("\"false\" failed"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[tokio::test]
    async fn stop_leaves_the_instance_alone() {
        let base = dir("stop");
        let marker = base.join("powered-off");
        let p = provider(false, &format!("touch {}", marker.display()), &base);
        p.identity().await.unwrap();
        std::fs::create_dir_all(base.join("run/bte-i-0123456789abcdef0")).unwrap();
        p.stop().await.unwrap();
        assert_eq!(p.ec2.terminates.load(Ordering::SeqCst), 0);
        assert!(!marker.exists());
        assert!(!base.join("run/bte-i-0123456789abcdef0").exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
