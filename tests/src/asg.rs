//! The world of the Auto Scaling test: an [`Ec2World`] (moto, the
//! coordinator's gateway, credentials) plus an Auto Scaling group in moto
//! whose instances the test boots. moto launches a group's instances itself
//! (SetDesiredCapacity, replacements after TerminateInstances) at addresses
//! of its choosing in the group's subnet; [`AsgWorld::boot_new`] plays each
//! instance's boot: a namespace holding the instance's private address, a
//! fake IMDS that says it is that instance, and a real agent (with its own
//! dockerd) inside.
//!
//! Addresses: the group's subnet is a /24 of 100.64.0.0/10 picked from the
//! test prefix (nothing on the machine routes it). Each instance namespace
//! has its address as a /32 on `eth0`, a host route to the world's gateway
//! (where moto, the fake IMDS and the coordinator listen) and a default
//! route through it; the machine reaches the instance by a /32 route on the
//! root side of the veth. The coordinator thus sees each agent's stream
//! come from its instance's private address, as on EC2.
//!
//! Clean-up: the namespaces are named after the world's prefix, so the
//! world's sweep kills what runs in them and deletes them (their veths go
//! with them).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use aws_sdk_autoscaling::types::{LaunchTemplateSpecification, Tag as AsgTag};
use berth_testkit::{ok, run};

use crate::ec2::{AWS_KEY, Agent, Coordinator, Ec2World, FakeImds, ImdsState, REGION};

/// One instance of the group, as it is seen by the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub instance_id: String,
    pub lifecycle: String,
    pub protected: bool,
}

/// The group as moto reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub desired: u32,
    pub members: Vec<Member>,
}

impl Group {
    pub fn ids(&self) -> Vec<String> {
        self.members.iter().map(|m| m.instance_id.clone()).collect()
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.instance_id == id)
    }
}

/// An instance the test booted.
pub struct Booted {
    pub addr: Ipv4Addr,
    pub netns: String,
    pub imds: FakeImds,
    pub agent: Agent,
}

pub struct AsgWorld {
    pub w: Ec2World,
    pub group_name: String,
    pub asg: aws_sdk_autoscaling::Client,
    /// Instance id -> what the test booted for it.
    pub booted: BTreeMap<String, Booted>,
    net: u32,
    booted_count: u32,
}

/// A small, stable hash of the prefix (FNV-1a), for names and the subnet.
fn hash(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn ip(args: &[&str]) {
    ok(run(Command::new("ip").args(args)), &format!("ip {args:?}"));
}

impl AsgWorld {
    /// The world, a launch template, and a group of `min..=max` instances
    /// (desired `min`) tagged for the pool, in a subnet of its own.
    pub fn start(base_prefix: &str, min: u32, max: u32) -> Self {
        let w = Ec2World::start(base_prefix);
        let h = hash(&w.prefix);
        let net = ((100 << 24) | ((64 + (h >> 8) % 64) << 16) | ((h & 0xff) << 8)) & 0xffff_ff00;
        let cidr = format!("{}/24", Ipv4Addr::from(net));
        let group_name = format!("{}group", w.prefix);
        let asg = {
            let config = aws_sdk_autoscaling::Config::builder()
                .behavior_version(aws_sdk_autoscaling::config::BehaviorVersion::latest())
                .region(aws_sdk_autoscaling::config::Region::new(REGION))
                .http_client(berth_aws::https_client())
                .endpoint_url(w.moto.url())
                .credentials_provider(aws_sdk_autoscaling::config::Credentials::new(
                    AWS_KEY,
                    AWS_KEY,
                    None,
                    None,
                    "berth-tests",
                ))
                .build();
            aws_sdk_autoscaling::Client::from_conf(config)
        };
        w.rt.block_on(async {
            let vpc = w
                .ec2
                .create_vpc()
                .cidr_block(&cidr)
                .send()
                .await
                .expect("CreateVpc");
            let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_owned();
            let subnet = w
                .ec2
                .create_subnet()
                .vpc_id(vpc_id)
                .cidr_block(&cidr)
                .send()
                .await
                .expect("CreateSubnet");
            let subnet_id = subnet.subnet().and_then(|s| s.subnet_id()).unwrap();
            let lt = w
                .ec2
                .create_launch_template()
                .launch_template_name(format!("{}lt", w.prefix))
                .launch_template_data(
                    aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                        .image_id("ami-12c6146b")
                        .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
                        .build(),
                )
                .send()
                .await
                .expect("CreateLaunchTemplate");
            let lt_id = lt
                .launch_template()
                .and_then(|t| t.launch_template_id())
                .unwrap();
            asg.create_auto_scaling_group()
                .auto_scaling_group_name(&group_name)
                .launch_template(
                    LaunchTemplateSpecification::builder()
                        .launch_template_id(lt_id)
                        .version("$Latest")
                        .build(),
                )
                .min_size(i32::try_from(min).unwrap())
                .max_size(i32::try_from(max).unwrap())
                .desired_capacity(i32::try_from(min).unwrap())
                .vpc_zone_identifier(subnet_id)
                .tags(
                    AsgTag::builder()
                        .key(berth_aws::POOL_TAG)
                        .value(&w.pool_name)
                        .propagate_at_launch(true)
                        .build(),
                )
                .send()
                .await
                .expect("CreateAutoScalingGroup");
        });
        AsgWorld {
            w,
            group_name,
            asg,
            booted: BTreeMap::new(),
            net,
            booted_count: 0,
        }
    }

    /// The group as moto reports it.
    pub fn group(&self) -> Group {
        self.w.rt.block_on(async {
            let out = self
                .asg
                .describe_auto_scaling_groups()
                .auto_scaling_group_names(&self.group_name)
                .send()
                .await
                .expect("DescribeAutoScalingGroups");
            let g = &out.auto_scaling_groups()[0];
            Group {
                desired: u32::try_from(g.desired_capacity().unwrap_or(0)).unwrap(),
                members: g
                    .instances()
                    .iter()
                    .map(|i| Member {
                        instance_id: i.instance_id().unwrap_or_default().to_owned(),
                        lifecycle: i
                            .lifecycle_state()
                            .map(|s| s.as_str().to_owned())
                            .unwrap_or_default(),
                        protected: i.protected_from_scale_in().unwrap_or(false),
                    })
                    .collect(),
            }
        })
    }

    /// Boots every in-service instance of the group not booted yet: its
    /// namespace, its fake IMDS, its agent (waiting for READY). Returns
    /// the ids booted.
    pub fn boot_new(&mut self, c: &Coordinator, agent_args: &[&str]) -> Vec<String> {
        let mut new = Vec::new();
        for m in self.group().members {
            if m.lifecycle != "InService" || self.booted.contains_key(&m.instance_id) {
                continue;
            }
            let (state, _, private) = self.w.instance(&m.instance_id);
            if state != "running" {
                continue;
            }
            let addr: Ipv4Addr = private.parse().expect("a private address");
            assert_eq!(
                u32::from(addr) & 0xffff_ff00,
                self.net,
                "moto placed {} outside the group's subnet",
                m.instance_id
            );
            let n = self.booted_count;
            self.booted_count += 1;
            let (netns, netns_path) = self.make_netns(n, addr);
            let imds = FakeImds::start(
                self.w.gateway.into(),
                ImdsState {
                    instance_id: m.instance_id.clone(),
                    local_ipv4: addr.to_string(),
                    lifecycle: Some("InService".into()),
                    ..ImdsState::default()
                },
            );
            let agent = self
                .w
                .spawn_agent_in(c, &netns_path, &imds.url(), agent_args);
            assert!(
                agent.ready.starts_with("READY "),
                "the agent of {} did not print READY (got {:?}); log:\n{}",
                m.instance_id,
                agent.ready,
                agent.log_text()
            );
            self.booted.insert(
                m.instance_id.clone(),
                Booted {
                    addr,
                    netns,
                    imds,
                    agent,
                },
            );
            new.push(m.instance_id);
        }
        new
    }

    /// A namespace `{prefix}i{n:03x}` holding `addr`, wired to the world's
    /// gateway by a veth of its own.
    fn make_netns(&self, n: u32, addr: Ipv4Addr) -> (String, PathBuf) {
        let name = format!("{}i{n:03x}", self.w.prefix);
        let veth = format!("ba{:06x}{n:x}", hash(&self.w.prefix) & 0xff_ffff);
        let gw = self.w.gateway.to_string();
        let host = format!("{addr}/32");
        let gw32 = format!("{gw}/32");
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&["link", "set", &veth, "up"]);
        ip(&["route", "add", &host, "dev", &veth, "src", &gw]);
        for args in [
            vec!["addr", "add", host.as_str(), "dev", "eth0"],
            vec!["link", "set", "lo", "up"],
            vec!["link", "set", "eth0", "up"],
            vec!["route", "add", gw32.as_str(), "dev", "eth0"],
            vec!["route", "add", "default", "via", gw.as_str(), "dev", "eth0"],
        ] {
            let mut a = vec!["-n", name.as_str()];
            a.extend(args.iter().copied());
            ip(&a);
        }
        let path = PathBuf::from("/run/netns").join(&name);
        (name, path)
    }

    /// Whether the agent booted for `id` still runs.
    pub fn agent_running(&mut self, id: &str) -> bool {
        let agent = self.booted[id].agent.clone();
        self.w.running(&agent)
    }
}
