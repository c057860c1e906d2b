//! The deployable group (`deploy/berth-pool.json`, CloudFormation): valid
//! for `cfn-lint` (which also catches a broken copy, so the check can
//! fail), and holding what berth's security and capacity rules need: IMDSv2
//! required with hop limit 1, instances that terminate on shutdown, a warm
//! pool of stopped instances not reused on scale-in, no desired capacity
//! of the group's own (the coordinator owns it), 2376 only from the CI
//! runners, 9102 only from operators, 7070 from both (and the agents), and
//! the IAM policies of `docs/iam/` word for word. Nothing here talks to AWS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn template_path() -> PathBuf {
    repo().join("deploy").join("berth-pool.json")
}

fn template() -> Value {
    serde_json::from_str(&std::fs::read_to_string(template_path()).unwrap()).unwrap()
}

/// Same contract as `berth_testkit::preflight`: skipped only with
/// `BERTH_SKIP_E2E=1` outside CI; a missing `cfn-lint` fails the test.
fn require_cfn_lint() -> bool {
    if std::env::var_os("BERTH_SKIP_E2E").is_some_and(|v| v == "1")
        && std::env::var_os("CI").is_none_or(|v| v != "true")
    {
        eprintln!("SKIPPED: BERTH_SKIP_E2E=1");
        return false;
    }
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("cfn-lint").is_file()));
    assert!(
        found,
        "the deploy test needs `cfn-lint` on PATH (PyPI `cfn-lint`); run scripts/test.sh, which installs it"
    );
    true
}

fn cfn_lint(path: &Path) -> std::process::Output {
    Command::new("cfn-lint").arg(path).output().unwrap()
}

#[test]
fn the_template_passes_cfn_lint_and_a_broken_copy_does_not() {
    if !require_cfn_lint() {
        return;
    }
    let o = cfn_lint(&template_path());
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "cfn-lint: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // A misspelt property in a copy is caught.
    let mut broken = template();
    let md = &mut broken["Resources"]["HostLaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"];
    md["HttpToken"] = md["HttpTokens"].take();
    md.as_object_mut().unwrap().remove("HttpTokens");
    let dir = std::env::temp_dir().join(format!("berth-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("broken.json");
    std::fs::write(&copy, serde_json::to_string_pretty(&broken).unwrap()).unwrap();
    let o = cfn_lint(&copy);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!o.status.success(), "cfn-lint accepted a misspelt property");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("HttpToken"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn hosts_get_imdsv2_with_hop_limit_1_and_end_on_shutdown() {
    let t = template();
    let data = &t["Resources"]["HostLaunchTemplate"]["Properties"]["LaunchTemplateData"];
    assert_eq!(data["MetadataOptions"]["HttpTokens"], "required");
    assert_eq!(data["MetadataOptions"]["HttpPutResponseHopLimit"], 1);
    assert_eq!(data["InstanceInitiatedShutdownBehavior"], "terminate");
    assert_eq!(data["ImageId"]["Ref"], "AmiId");
}

#[test]
fn the_group_keeps_a_stopped_warm_pool_and_leaves_capacity_to_the_coordinator() {
    let t = template();
    let group = &t["Resources"]["HostGroup"]["Properties"];
    assert!(
        group.get("DesiredCapacity").is_none(),
        "the coordinator alone sets the desired capacity"
    );
    assert_eq!(group["NewInstancesProtectedFromScaleIn"], false);
    let warm = &t["Resources"]["HostWarmPool"];
    assert_eq!(warm["Properties"]["PoolState"], "Stopped");
    assert_eq!(
        warm["Properties"]["InstanceReusePolicy"]["ReuseOnScaleIn"],
        false
    );
    // Auto Scaling does not combine a warm pool with spot: one or the other.
    assert_eq!(warm["Condition"], "OnDemandOnly");
    assert_eq!(group["MixedInstancesPolicy"]["Fn::If"][0], "UsesSpot");
    let dist = &group["MixedInstancesPolicy"]["Fn::If"][1]["InstancesDistribution"];
    assert_eq!(
        dist["OnDemandPercentageAboveBaseCapacity"]["Ref"],
        "OnDemandPercentage"
    );
    assert_eq!(group["Tags"][0]["Key"], berth_aws::POOL_TAG);
}

/// (from, to, source parameter or resource) of a group's ingress rules.
fn ingress(t: &Value, group: &str) -> Vec<(u64, u64, String)> {
    t["Resources"][group]["Properties"]["SecurityGroupIngress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["IpProtocol"], "tcp", "{r}");
            assert!(r.get("CidrIp").is_none(), "an address range: {r}");
            (
                r["FromPort"].as_u64().unwrap(),
                r["ToPort"].as_u64().unwrap(),
                r["SourceSecurityGroupId"]["Ref"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect()
}

fn sources(rules: &[(u64, u64, String)], port: u64) -> Vec<&str> {
    let mut s: Vec<&str> = rules
        .iter()
        .filter(|(from, to, _)| (*from..=*to).contains(&port))
        .map(|(_, _, src)| src.as_str())
        .collect();
    s.sort_unstable();
    s
}

#[test]
fn each_port_is_open_only_to_its_callers() {
    let t = template();
    let hosts = ingress(&t, "HostSecurityGroup");
    assert_eq!(
        sources(&hosts, berth_proto::ports::DOCKER_FRONT.into()),
        ["CiRunnersSecurityGroupId"]
    );
    assert_eq!(
        sources(&hosts, berth_proto::ports::AGENT_STATUS.into()),
        ["OpsSecurityGroupId"]
    );
    // A port a build publishes is reachable from the CI runners.
    assert_eq!(sources(&hosts, 8080), ["CiRunnersSecurityGroupId"]);
    let coordinator = ingress(&t, "CoordinatorSecurityGroup");
    assert_eq!(
        sources(&coordinator, berth_proto::ports::COORDINATOR.into()),
        [
            "CiRunnersSecurityGroupId",
            "HostSecurityGroup",
            "OpsSecurityGroupId"
        ]
    );
    assert_eq!(
        sources(&coordinator, berth_proto::ports::COORDINATOR_OPS.into()),
        ["OpsSecurityGroupId"]
    );
}

#[test]
fn the_roles_carry_the_policies_of_docs_iam_word_for_word() {
    let t = template();
    let file = |name: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(repo().join("docs").join("iam").join(name)).unwrap(),
        )
        .unwrap()
    };
    for (role, policy) in [
        ("AgentRole", "agent-policy.json"),
        ("CoordinatorRole", "coordinator-policy.json"),
    ] {
        let props = &t["Resources"][role]["Properties"];
        assert_eq!(
            props["AssumeRolePolicyDocument"],
            file("ec2-trust-policy.json"),
            "{role}"
        );
        assert_eq!(
            props["Policies"][0]["PolicyDocument"],
            file(policy),
            "{role}"
        );
        // The policies scope by the role's berth:pool tag.
        assert_eq!(props["Tags"][0]["Key"], berth_aws::POOL_TAG, "{role}");
    }
}
