//! The check the coordinator makes before it lets an agent into an EC2
//! pool: the instance the agent claims to be exists, is running, carries
//! the pool tag, and owns the address the agent connects from and
//! advertises. Pure: the describe call happens elsewhere.

use std::net::IpAddr;

use crate::ec2::InstanceInfo;

/// Why an agent was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("instance {0} is unknown to EC2")]
    Unknown(String),
    #[error("instance {id} is {state}, not running")]
    NotRunning { id: String, state: String },
    #[error(
        "instance {id} does not carry the pool tag {}={pool} (found {found:?})",
        crate::POOL_TAG
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
    let tag = i.tag(crate::POOL_TAG);
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

    fn instance(state: &str, pool: Option<&str>, ip: &str) -> InstanceInfo {
        InstanceInfo {
            instance_id: "i-0123456789abcdef0".into(),
            state: state.into(),
            private_ip: Some(ip.parse().unwrap()),
            launch_time: None,
            tags: pool
                .map(|p| (crate::POOL_TAG.to_owned(), p.to_owned()))
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
}
