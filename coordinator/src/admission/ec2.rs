//! Admission on EC2 (`--provider ec2`): [`Ec2Verifier`] asks EC2
//! (`DescribeInstances`) whether the instance an agent claims to be exists,
//! is running, carries `berth:pool=NAME` and owns both the stream's peer
//! address and the address the agent advertises; [`check_agent`] is that
//! check, pure (the describe call happens in the verifier). Every way to
//! fail it is a [`Refusal`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use berth_aws::{Ec2Api, InstanceInfo};
use tracing::{info, warn};

use super::Verifier;
use crate::error::{self, Error, Unavailable};
use crate::ops::metrics::{Ec2Metrics, bump};
use crate::pool::Registration;

/// Verifies agents against EC2.
pub struct Ec2Verifier<A> {
    api: Arc<A>,
    pool_name: String,
    metrics: Arc<Ec2Metrics>,
}

impl<A> Ec2Verifier<A> {
    pub fn new(api: Arc<A>, pool_name: String, metrics: Arc<Ec2Metrics>) -> Self {
        Self {
            api,
            pool_name,
            metrics,
        }
    }
}

impl<A: Ec2Api> Ec2Verifier<A> {
    fn refuse(&self, reg: &Registration, peer: Option<SocketAddr>, why: Refusal) -> Error {
        bump(&self.metrics.agents_refused);
        warn!(host_id = %reg.host_id, peer = ?peer, host_addr = %reg.host_addr, reason = %why, "agent refused");
        Error::Refused {
            host_id: reg.host_id.clone(),
            reason: error::Refusal::Ec2(why),
        }
    }
}

#[tonic::async_trait]
impl<A: Ec2Api> Verifier for Ec2Verifier<A> {
    async fn verify(&self, reg: &Registration, peer: Option<SocketAddr>) -> Result<(), Error> {
        if !berth_aws::imds::valid_instance_id(&reg.host_id) {
            let why = Refusal::NotAnInstanceId(reg.host_id.clone());
            return Err(self.refuse(reg, peer, why));
        }
        let Some(peer_addr) = peer else {
            return Err(self.refuse(reg, peer, Refusal::NoPeerAddress));
        };
        let advertised = match reg.host_addr.parse() {
            Ok(a) => a,
            Err(_) => {
                let why = Refusal::HostAddrNotIp(reg.host_addr.clone());
                return Err(self.refuse(reg, peer, why));
            }
        };
        let instance = match self.api.describe(&reg.host_id).await {
            Ok(i) => i,
            Err(e) => {
                bump(&self.metrics.verify_errors);
                warn!(host_id = %reg.host_id, error = %e, "cannot verify agent: EC2 did not answer");
                return Err(Error::Unavailable(Unavailable::Ec2 {
                    host_id: reg.host_id.clone(),
                    source: e,
                }));
            }
        };
        match check_agent(
            &reg.host_id,
            instance.as_ref(),
            &self.pool_name,
            peer_addr.ip(),
            advertised,
        ) {
            Ok(()) => {
                bump(&self.metrics.agents_verified);
                info!(host_id = %reg.host_id, peer = %peer_addr, pool = %self.pool_name, "agent verified with EC2");
                Ok(())
            }
            Err(refusal) => Err(self.refuse(reg, peer, refusal)),
        }
    }
}

/// Why EC2 does not vouch for an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The host id is not an EC2 instance id (never sent to EC2).
    #[error("host id {0:?} is not an EC2 instance id")]
    NotAnInstanceId(String),
    /// The stream has no peer address to hold against the instance's.
    #[error("the stream has no peer address")]
    NoPeerAddress,
    /// The address the agent advertises is not an IP address.
    #[error("host address {0:?} is not an IP address")]
    HostAddrNotIp(String),
    #[error("instance {0} is unknown to EC2")]
    Unknown(String),
    #[error("instance {id} is {state}, not running")]
    NotRunning { id: String, state: String },
    #[error(
        "instance {id} does not carry the pool tag {}={pool} (found {found:?})",
        berth_aws::POOL_TAG
    )]
    NotInPool {
        id: String,
        pool: String,
        found: Option<String>,
    },
    #[error(
        "instance {id} has private address {private:?}, but the agent connects from {peer} and advertises {advertised}"
    )]
    AddressMismatch {
        id: String,
        private: Option<IpAddr>,
        peer: IpAddr,
        advertised: IpAddr,
    },
}

/// Checks one registration. `instance` is DescribeInstances' answer for
/// `instance_id`; `peer` the stream's source address; `advertised` the
/// host address the agent registers (what builds will reach).
pub fn check_agent(
    instance_id: &str,
    instance: Option<&InstanceInfo>,
    pool: &str,
    peer: IpAddr,
    advertised: IpAddr,
) -> Result<(), Refusal> {
    let Some(i) = instance.filter(|i| i.instance_id == instance_id) else {
        return Err(Refusal::Unknown(instance_id.to_owned()));
    };
    if i.state != "running" {
        return Err(Refusal::NotRunning {
            id: i.instance_id.clone(),
            state: i.state.clone(),
        });
    }
    let tag = i.tag(berth_aws::POOL_TAG);
    if tag != Some(pool) {
        return Err(Refusal::NotInPool {
            id: i.instance_id.clone(),
            pool: pool.to_owned(),
            found: tag.map(str::to_owned),
        });
    }
    // An IPv4 peer may show up as ::ffff:a.b.c.d on a dual-stack listener.
    let peer = peer.to_canonical();
    let advertised = advertised.to_canonical();
    let private = i.private_ip.map(|p| p.to_canonical());
    if private != Some(peer) || private != Some(advertised) {
        return Err(Refusal::AddressMismatch {
            id: i.instance_id.clone(),
            private,
            peer,
            advertised,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::Ec2Metrics;
    use crate::testing::{A, B, C, FakeEc2, reg};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    const SECOND: Duration = Duration::from_secs(1);

    fn instance(state: &str, pool: Option<&str>, ip: &str) -> InstanceInfo {
        InstanceInfo {
            instance_id: "i-0123456789abcdef0".into(),
            state: state.into(),
            private_ip: Some(ip.parse().unwrap()),
            launch_time: None,
            tags: pool
                .map(|p| (berth_aws::POOL_TAG.to_owned(), p.to_owned()))
                .into_iter()
                .collect(),
        }
    }

    const ID: &str = "i-0123456789abcdef0";

    #[test]
    fn a_running_tagged_instance_at_its_own_address_passes() {
        let i = instance("running", Some("ci"), "10.0.1.5");
        let a: IpAddr = "10.0.1.5".parse().unwrap();
        assert_eq!(check_agent(ID, Some(&i), "ci", a, a), Ok(()));
        let mapped: IpAddr = "::ffff:10.0.1.5".parse().unwrap();
        assert_eq!(check_agent(ID, Some(&i), "ci", mapped, a), Ok(()));
    }

    #[test]
    fn each_failed_check_has_its_own_refusal() {
        let a: IpAddr = "10.0.1.5".parse().unwrap();
        let other: IpAddr = "10.0.1.6".parse().unwrap();
        let ok = instance("running", Some("ci"), "10.0.1.5");
        assert_eq!(
            check_agent(ID, None, "ci", a, a),
            Err(Refusal::Unknown(ID.into()))
        );
        // An answer about another instance is no answer.
        let mut someone_else = ok.clone();
        someone_else.instance_id = "i-0000000000000000f".into();
        assert!(matches!(
            check_agent(ID, Some(&someone_else), "ci", a, a),
            Err(Refusal::Unknown(_))
        ));
        assert!(matches!(
            check_agent(ID, Some(&instance("stopped", Some("ci"), "10.0.1.5")), "ci", a, a),
            Err(Refusal::NotRunning { state, .. }) if state == "stopped"
        ));
        assert!(matches!(
            check_agent(ID, Some(&instance("running", None, "10.0.1.5")), "ci", a, a),
            Err(Refusal::NotInPool { found: None, .. })
        ));
        assert!(matches!(
            check_agent(ID, Some(&instance("running", Some("prod"), "10.0.1.5")), "ci", a, a),
            Err(Refusal::NotInPool { found: Some(f), .. }) if f == "prod"
        ));
        assert!(matches!(
            check_agent(ID, Some(&ok), "ci", other, a),
            Err(Refusal::AddressMismatch { .. })
        ));
        // The right peer advertising someone else's address is refused too.
        let e = check_agent(ID, Some(&ok), "ci", a, other).unwrap_err();
        assert!(e.to_string().contains("advertises 10.0.1.6"), "{e}");
    }

    #[tokio::test]
    async fn verifier_admits_pool_members_at_their_address_and_refuses_the_rest() {
        let ec2 = Arc::new(FakeEc2::default());
        ec2.launch(A, "10.0.0.5", Some("ci"), SECOND);
        ec2.launch(B, "10.0.0.6", None, SECOND);
        let metrics = Arc::new(Ec2Metrics::default());
        let v = Ec2Verifier::new(ec2.clone(), "ci".into(), metrics.clone());
        let peer = |ip: &str| Some(SocketAddr::new(ip.parse().unwrap(), 40000));

        v.verify(&reg(A, "10.0.0.5"), peer("10.0.0.5"))
            .await
            .unwrap();
        let refused = |r: Result<(), Error>| match r {
            Err(
                e @ Error::Refused {
                    reason: error::Refusal::Ec2(_),
                    ..
                },
            ) => {
                assert_eq!(e.code(), tonic::Code::PermissionDenied);
                e.to_string()
            }
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(
            refused(v.verify(&reg(A, "10.0.0.5"), peer("127.0.0.1")).await)
                .contains("connects from 127.0.0.1")
        );
        assert!(
            refused(v.verify(&reg(B, "10.0.0.6"), peer("10.0.0.6")).await).contains("pool tag")
        );
        assert!(refused(v.verify(&reg(C, "10.0.0.7"), peer("10.0.0.7")).await).contains("unknown"));
        // Junk ids never reach EC2.
        assert!(
            refused(
                v.verify(&reg("local-1", "10.0.0.7"), peer("10.0.0.7"))
                    .await
            )
            .contains("not an EC2 instance id")
        );
        assert!(
            !ec2.calls
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.contains("local-1"))
        );
        assert_eq!(
            refused(v.verify(&reg(A, "10.0.0.5"), None).await),
            "agent refused: the stream has no peer address"
        );
        // EC2 down: no verdict, a retryable status.
        ec2.down.store(true, Ordering::SeqCst);
        let e = v
            .verify(&reg(A, "10.0.0.5"), peer("10.0.0.5"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            matches!(&e, Error::Unavailable(Unavailable::Ec2 { host_id, .. }) if host_id == A),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with(&format!(
                "cannot verify instance {A} now: EC2 DescribeInstances"
            )),
            "{e}"
        );
        let m = metrics.snapshot();
        assert_eq!(
            (m.agents_verified, m.agents_refused, m.verify_errors),
            (1, 5, 1)
        );
    }
}
