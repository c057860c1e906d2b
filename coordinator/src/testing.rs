//! Fakes for the coordinator's unit tests: an in-memory EC2 that records
//! calls, and registrations of EC2-shaped hosts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use berth_aws::{Ec2Api, Ec2Error, InstanceInfo, POOL_TAG};
use berth_proto::v1 as pb;

use crate::pool::Registration;
use crate::sweeper::ORPHAN_TAG;

const SECOND: Duration = Duration::from_secs(1);

/// An in-memory EC2 that records calls.
#[derive(Default)]
pub struct FakeEc2 {
    pub instances: Mutex<BTreeMap<String, InstanceInfo>>,
    pub calls: Mutex<Vec<String>>,
    pub down: std::sync::atomic::AtomicBool,
}

impl FakeEc2 {
    pub fn launch(&self, id: &str, ip: &str, pool: Option<&str>, launched_ago: Duration) {
        let mut tags = BTreeMap::new();
        if let Some(p) = pool {
            tags.insert(POOL_TAG.to_owned(), p.to_owned());
        }
        self.instances.lock().unwrap().insert(
            id.to_owned(),
            InstanceInfo {
                instance_id: id.to_owned(),
                state: "running".into(),
                private_ip: Some(ip.parse().unwrap()),
                launch_time: Some(SystemTime::now() - launched_ago),
                tags,
            },
        );
    }
    fn unavailable(&self, op: &'static str) -> Result<(), Ec2Error> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Ec2Error {
                op,
                target: String::new(),
                source: berth_aws::RetryError::TimedOut {
                    attempts: 3,
                    attempt_timeout: SECOND,
                },
            });
        }
        Ok(())
    }
    pub fn state(&self, id: &str) -> (String, bool) {
        let g = self.instances.lock().unwrap();
        let i = &g[id];
        (i.state.clone(), i.tags.contains_key(ORPHAN_TAG))
    }
}

impl Ec2Api for FakeEc2 {
    async fn describe(&self, id: &str) -> Result<Option<InstanceInfo>, Ec2Error> {
        self.unavailable("DescribeInstances")?;
        self.calls.lock().unwrap().push(format!("describe {id}"));
        Ok(self.instances.lock().unwrap().get(id).cloned())
    }
    async fn pool_instances(&self, pool: &str) -> Result<Vec<InstanceInfo>, Ec2Error> {
        self.unavailable("DescribeInstances")?;
        Ok(self
            .instances
            .lock()
            .unwrap()
            .values()
            .filter(|i| i.tag(POOL_TAG) == Some(pool) && i.state == "running")
            .cloned()
            .collect())
    }
    async fn tag(&self, id: &str, k: &str, v: &str) -> Result<(), Ec2Error> {
        self.calls.lock().unwrap().push(format!("tag {id}"));
        if let Some(i) = self.instances.lock().unwrap().get_mut(id) {
            i.tags.insert(k.into(), v.into());
        }
        Ok(())
    }
    async fn untag(&self, id: &str, k: &str) -> Result<(), Ec2Error> {
        self.calls.lock().unwrap().push(format!("untag {id}"));
        if let Some(i) = self.instances.lock().unwrap().get_mut(id) {
            i.tags.remove(k);
        }
        Ok(())
    }
    async fn terminate(&self, id: &str) -> Result<(), Ec2Error> {
        self.calls.lock().unwrap().push(format!("terminate {id}"));
        if let Some(i) = self.instances.lock().unwrap().get_mut(id) {
            i.state = "terminated".into();
        }
        Ok(())
    }
}

pub fn reg(id: &str, addr: &str) -> Registration {
    Registration {
        host_id: id.into(),
        host_addr: addr.into(),
        docker_host: format!("tcp://{addr}:2376"),
        provider: "ec2".into(),
        resources: None,
        agent_version: "t".into(),
        docker_version: "t".into(),
        state: pb::HostState::Ready,
        lease_id: String::new(),
        lease_deadline: None,
        key: None,
        lease_key: None,
    }
}

pub const A: &str = "i-0000000000000000a";
pub const B: &str = "i-0000000000000000b";
pub const C: &str = "i-0000000000000000c";
