//! The host's network rules: what makes a leased host's network behave like
//! a stock Docker host's, applied inside the host's own network namespace
//! (a local host's namespace, or the EC2 instance) and never anywhere else.
//! Every rule lives here, with its reason:
//!
//! 1. **dockerd manages iptables, masquerading and forwarding** (its
//!    defaults, passed explicitly: `--iptables=true --ip-masq=true
//!    --ip-forward=true`) when the network namespace is the host's own
//!    ([`HostNetwork::Own`]). Bridge containers and build steps then reach
//!    the network beyond the host through NAT, published ports are
//!    forwarded as on any Docker host, and `docker run` prints no
//!    "IPv4 forwarding is disabled" warning. dockerd edits the tables and
//!    the `net.ipv4.ip_forward` sysctl of the namespace it runs in, which is
//!    the host's alone: the machine's stay as they are. A local host without
//!    a namespace (`--no-netns`) shares the machine's network
//!    ([`HostNetwork::Shared`]): there dockerd keeps its hands off
//!    (`--iptables=false --ip-masq=false --ip-forward=false`), and
//!    containers reach only the host itself.
//! 2. **No instance metadata from containers**: `DOCKER-USER -d
//!    169.254.169.254/32 -j DROP`, added once dockerd is up (it creates the
//!    chain). On EC2 the metadata service hands out the instance role's
//!    credentials and the user data; a build step or a test container has
//!    no business there, and code pulled in by a build (a package's install
//!    script) should not find them. `DOCKER-USER` is the chain dockerd keeps
//!    for the administrator: jumped to first from `FORWARD`, never flushed
//!    by dockerd, and it sees only forwarded traffic, i.e. containers on
//!    bridge networks; the agent itself (which reads IMDS on EC2) and the
//!    host's own processes are not affected. The lease holder is root on the
//!    host and could remove the rule (see the threat model): this keeps
//!    builds from reaching the service by accident or through third-party
//!    code, it does not contain the lease holder. The IPv6 endpoint
//!    (`fd00:ec2::254`, only where an instance has it enabled) is not
//!    covered: bridge networks get no IPv6 unless a lease creates one with
//!    `--ipv6`.
//!
//! 3. **A local host in a namespace of its own has no DNS server, and says
//!    so at once** ([`HostDns::OwnAddress`]). Its namespace reaches this
//!    machine's addresses only (the machine forwards nothing for it), so the
//!    machine's resolver is out of reach unless it listens on the machine's
//!    loopback, which is another namespace's. With the machine's
//!    `/etc/resolv.conf`, every name dockerd looks up waits for the
//!    resolver's timeouts: a `docker pull` of a Docker Hub image looks up
//!    `docker.io` first (A and AAAA) and waited two 5 s timeouts before it
//!    went to the pool's mirror, on every pull. The host's dockerd gets a
//!    `resolv.conf` of its own instead ([`resolv_conf`], bound over
//!    `/etc/resolv.conf` in dockerd's mount namespace only) naming the
//!    host's own address, where nothing answers on port 53: a lookup is
//!    refused at once (ICMP port unreachable, inside the host's namespace)
//!    and dockerd goes on, as it does on a machine whose resolver is
//!    `127.0.0.53`. The pool's registries are named by address, so nothing
//!    berth serves needs a name. Containers inherit that resolver (dockerd
//!    copies the file into bridge containers; it is not a loopback address,
//!    which dockerd would replace by public resolvers), and a DNS server a
//!    lease holder publishes on the host's port 53 answers them and dockerd.
//!    An EC2 instance and a `--no-netns` host keep the machine's resolver
//!    ([`HostDns::Machine`]).
//!
//! Rule 1 is dockerd's command line ([`HostNetwork::dockerd_args`]); rule 2
//! is [`apply`], called by the agent after dockerd answers; rule 3 is the
//! host's `resolv.conf` ([`HostDns`]), written when dockerd starts. `iptables` runs
//! inside the host's namespace (spawned from a thread that entered it), bounded by
//! [`IPTABLES_TIMEOUT`], and is idempotent: a rule already there (an agent
//! taking over its host) is not added twice.

use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::docker::mountns;

/// Bound on one `iptables` invocation.
pub const IPTABLES_TIMEOUT: Duration = Duration::from_secs(10);
/// The instance metadata service's address (IPv4, link-local).
pub const IMDS_ADDR: &str = "169.254.169.254";
/// The chain dockerd reserves for the administrator's filter rules.
pub const DOCKER_USER_CHAIN: &str = "DOCKER-USER";

/// Whose network namespace dockerd runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostNetwork {
    /// The host's alone (a local host's namespace, an EC2 instance):
    /// dockerd manages its iptables and forwarding, and [`RULES`] apply.
    Own,
    /// The machine's, shared with everything else on it (a local host with
    /// `--no-netns`): dockerd touches neither iptables nor sysctls.
    Shared,
}

impl HostNetwork {
    /// dockerd's flags for this network (rule 1 of the module header).
    pub fn dockerd_args(self) -> [&'static str; 3] {
        match self {
            HostNetwork::Own => ["--iptables=true", "--ip-masq=true", "--ip-forward=true"],
            HostNetwork::Shared => ["--iptables=false", "--ip-masq=false", "--ip-forward=false"],
        }
    }
}

/// Which resolver a host's dockerd (and its containers) asks (rule 3 of the
/// module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDns {
    /// The machine's `/etc/resolv.conf`, as it is.
    Machine,
    /// A `resolv.conf` of the host's own naming this address (the host's
    /// own, in its own namespace), where no resolver answers unless the
    /// lease holder runs one.
    OwnAddress(IpAddr),
}

impl HostDns {
    /// The `resolv.conf` the host's dockerd gets, if not the machine's.
    pub fn resolv_conf(self) -> Option<String> {
        match self {
            HostDns::Machine => None,
            HostDns::OwnAddress(addr) => Some(resolv_conf(addr)),
        }
    }
}

/// A local host's `resolv.conf`: its own address as the only nameserver.
/// One try, 1 s: should an answer not come back at once (the kernel rate
/// limits the port-unreachable replies to containers), a lookup still
/// fails within a second rather than ten.
pub fn resolv_conf(addr: IpAddr) -> String {
    format!(
        "# berth: this host reaches no resolver (see the agent's hostnet rules).\n\
         # Nothing answers here unless the lease runs a DNS server on the host:\n\
         # lookups are refused at once instead of timing out.\n\
         nameserver {addr}\n\
         options timeout:1 attempts:1\n"
    )
}

/// One iptables rule the host's network setup adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    /// The match and target, as iptables arguments after the chain.
    pub spec: &'static [&'static str],
    /// Why it is there (logged when it is added).
    pub why: &'static str,
}

/// The rules added after dockerd is up (rule 2 of the module header).
pub const RULES: &[Rule] = &[Rule {
    table: "filter",
    chain: DOCKER_USER_CHAIN,
    spec: &["-d", "169.254.169.254/32", "-j", "DROP"],
    why: "containers cannot reach the instance metadata service",
}];

/// What went wrong adding a rule.
#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` timed out after {IPTABLES_TIMEOUT:?}")]
    Timeout { command: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

impl Rule {
    /// iptables arguments for `op` (`-C` check, `-I` insert first, `-D` delete).
    pub fn args(&self, op: &str) -> Vec<String> {
        let mut args = vec![
            "-w".to_owned(),
            "-t".to_owned(),
            self.table.to_owned(),
            op.to_owned(),
            self.chain.to_owned(),
        ];
        args.extend(self.spec.iter().map(|s| (*s).to_owned()));
        args
    }
}

/// Adds [`RULES`] inside the host's network namespace (`netns`, or the
/// agent's own namespace when `None`: the EC2 instance). Nothing for a
/// [`HostNetwork::Shared`] network, whose tables are the machine's.
#[tracing::instrument(skip_all, fields(netns = ?netns), err)]
pub async fn apply(network: HostNetwork, netns: Option<&Path>) -> Result<(), HostNetError> {
    if network == HostNetwork::Shared {
        return Ok(());
    }
    for rule in RULES {
        // `-C` fails when the rule is missing; then it is inserted first in
        // its chain, ahead of the chain's closing RETURN.
        if iptables(netns, &rule.args("-C")).await.is_ok() {
            tracing::debug!(chain = rule.chain, "rule already present");
            continue;
        }
        iptables(netns, &rule.args("-I")).await?;
        tracing::info!(chain = rule.chain, spec = ?rule.spec, why = rule.why, "host network rule added");
    }
    Ok(())
}

/// Runs `iptables ARGS` in `netns` (or here), bounded, with stderr in the
/// error. In a namespace it is spawned from a thread that entered it (what
/// `nsenter --net` does, without the extra process on the boot's path).
async fn iptables(netns: Option<&Path>, args: &[String]) -> Result<(), HostNetError> {
    let command = describe(netns, args);
    let mut cmd = Command::new("iptables");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match netns {
        Some(ns) => mountns::spawn_in_netns(cmd, ns.to_owned())
            .await
            .map_err(|e| HostNetError::Spawn {
                command: command.clone(),
                source: std::io::Error::other(e.to_string()),
            })?,
        None => cmd.spawn().map_err(|source| HostNetError::Spawn {
            command: command.clone(),
            source,
        })?,
    };
    let out = tokio::time::timeout(IPTABLES_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| HostNetError::Timeout {
            command: command.clone(),
        })?
        .map_err(|source| HostNetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HostNetError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// How an `iptables ARGS` run in `netns` is named in errors and logs.
pub fn describe(netns: Option<&Path>, args: &[String]) -> String {
    let mut command = String::from("iptables");
    for a in args {
        command.push(' ');
        command.push_str(a);
    }
    if let Some(ns) = netns {
        command.push_str(&format!(" (in {})", ns.display()));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerd_manages_the_network_only_when_it_is_the_hosts_own() {
        assert_eq!(
            HostNetwork::Own.dockerd_args(),
            ["--iptables=true", "--ip-masq=true", "--ip-forward=true"]
        );
        assert_eq!(
            HostNetwork::Shared.dockerd_args(),
            ["--iptables=false", "--ip-masq=false", "--ip-forward=false"]
        );
    }

    #[test]
    fn a_local_host_names_its_own_address_as_its_only_resolver() {
        let addr: IpAddr = "198.18.0.6".parse().unwrap();
        let conf = HostDns::OwnAddress(addr).resolv_conf().unwrap();
        let directives: Vec<&str> = conf
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert_eq!(
            directives,
            ["nameserver 198.18.0.6", "options timeout:1 attempts:1"]
        );
        assert_eq!(HostDns::Machine.resolv_conf(), None);
    }

    #[test]
    fn the_imds_rule_drops_forwarded_traffic_to_the_metadata_address() {
        let imds = RULES
            .iter()
            .find(|r| r.spec.iter().any(|s| s.starts_with(IMDS_ADDR)))
            .expect("an IMDS rule");
        assert_eq!((imds.table, imds.chain), ("filter", "DOCKER-USER"));
        assert_eq!(
            imds.args("-I"),
            [
                "-w",
                "-t",
                "filter",
                "-I",
                "DOCKER-USER",
                "-d",
                "169.254.169.254/32",
                "-j",
                "DROP"
            ]
        );
    }

    #[test]
    fn an_iptables_command_names_the_namespace_it_runs_in() {
        let args = vec!["-S".to_owned(), "DOCKER-USER".to_owned()];
        assert_eq!(
            describe(Some(Path::new("/run/netns/bta-0001")), &args),
            "iptables -S DOCKER-USER (in /run/netns/bta-0001)"
        );
        assert_eq!(describe(None, &args), "iptables -S DOCKER-USER");
    }

    #[tokio::test]
    async fn a_missing_namespace_fails_before_anything_runs() {
        let err = iptables(Some(Path::new("/nonexistent/netns/x")), &["-S".to_owned()])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, HostNetError::Spawn { command, .. } if command.contains("/nonexistent/netns/x")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_shared_network_gets_no_rules() {
        // Would fail (no such namespace) if it ran anything.
        apply(HostNetwork::Shared, Some(Path::new("/nonexistent/netns/x")))
            .await
            .unwrap();
    }
}
