//! Packaging checks: what turns berth into an AWS deployment. The Packer
//! template (formatting, a full `packer validate`, an HCL parse that checks
//! what the template uploads), the provisioning script run for real into a
//! throwaway root exactly as the template would stage it, the systemd units
//! (`systemd-analyze verify` with any stderr counted as a failure, and their
//! hardening scores), and the IAM policy documents.
//!
//! Nothing here talks to AWS or needs root. The tools are Debian's `packer`
//! (1.6.6) and `systemd-analyze`/`systemctl`, which scripts/test.sh installs;
//! as in the end-to-end tests, a missing tool fails the test with its name
//! unless `BERTH_SKIP_E2E=1` is set outside CI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_testkit::{bin, run, stderr, stdout};
use hcl::eval::{Context, Evaluate};
use hcl::{Block, Body, Expression, Value};

/// Agent flags that the packaging already uses but that land with the
/// configuration-file work (`--config FILE`). Every other flag in the unit
/// and every key of agent.toml must be in `--help` today.
const PENDING_AGENT_FLAGS: &[&str] = &[];

/// Highest accepted `systemd-analyze security` exposure per unit (0 = locked
/// down, 10 = unrestricted). The agent runs dockerd as root and may only use
/// options that do not leak into containers (see the unit), so it sits just
/// under Debian's own docker.service (9.6); the coordinator needs no
/// privilege at all. README.md records the measured values.
const MAX_EXPOSURE: &[(&str, f64)] = &[
    ("berth-agent.service", 9.2),
    ("berth-coordinator.service", 1.5),
    ("berth-mirror.service", 1.5),
];

/// Options a future "hardening" must not add to the agent's unit: each is
/// inherited by dockerd and every container (seccomp filters, the capability
/// bounding set, no_new_privs) and breaks privileged, setuid, i386 or JIT
/// workloads of builds. The unit explains each.
const AGENT_FORBIDDEN_OPTIONS: &[&str] = &[
    "NoNewPrivileges",
    "CapabilityBoundingSet",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectClock",
    "ProtectControlGroups",
    "ProtectKernelTunables",
    "PrivateDevices",
    "ProtectHostname",
    "RestrictNamespaces",
    "RestrictAddressFamilies",
    "SystemCallFilter",
    "SystemCallArchitectures",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "RestrictSUIDSGID",
    "PrivateNetwork",
    "User",
];

// ---------------------------------------------------------------- helpers

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn packer_dir() -> PathBuf {
    repo().join("packer")
}

/// The same contract as `berth_testkit::preflight`: skipped only with
/// `BERTH_SKIP_E2E=1` outside CI, otherwise every missing tool fails the
/// test with a message naming it and the Debian package that provides it.
fn require(tools: &[(&str, &str)]) -> bool {
    if std::env::var_os("BERTH_SKIP_E2E").is_some_and(|v| v == "1")
        && std::env::var_os("CI").is_none_or(|v| v != "true")
    {
        eprintln!("SKIPPED: BERTH_SKIP_E2E=1");
        return false;
    }
    for (tool, package) in tools {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        assert!(
            found,
            "packaging tests need `{tool}` on PATH (Debian package `{package}`); \
             run scripts/test.sh, which installs it, or set BERTH_SKIP_E2E=1 outside CI"
        );
    }
    true
}

/// Packer, with its update check ("checkpoint") off: the tests make no
/// network traffic.
fn packer() -> Command {
    let mut c = Command::new("packer");
    c.env("CHECKPOINT_DISABLE", "1").current_dir(repo());
    c
}

/// A directory removed with everything in it when the guard drops, also when
/// the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("berth-packaging-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a file, or a directory's contents recursively, like packer's file
/// provisioner: `src/` uploads the contents into `dst`, `src` the directory
/// itself below `dst`.
fn upload(src: &str, dst: &Path) {
    let from = Path::new(src);
    if from.is_file() {
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(from, dst).unwrap_or_else(|e| panic!("copy {src}: {e}"));
        std::fs::set_permissions(dst, from.metadata().unwrap().permissions()).unwrap();
        return;
    }
    assert!(
        from.is_dir(),
        "file provisioner source {src} does not exist"
    );
    let into = if src.ends_with('/') {
        dst.to_owned()
    } else {
        dst.join(from.file_name().unwrap())
    };
    std::fs::create_dir_all(&into).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let child = format!("{}/{name}", src.trim_end_matches('/'));
        if e.path().is_dir() {
            upload(&format!("{child}/"), &into.join(&name));
        } else {
            upload(&child, &into.join(&name));
        }
    }
}

// ---------------------------------------------------------------- HCL

/// berth.pkr.hcl, parsed, with a context that resolves what its file and
/// shell provisioners refer to: `path.root`, `var.*` (defaults, and the built
/// agent for `var.agent_binary`) and the locals that need no functions.
struct Template {
    body: Body,
    ctx: Context<'static>,
    locals: hcl::Map<String, Value>,
}

impl Template {
    fn load(agent_binary: &Path) -> Self {
        let file = packer_dir().join("berth.pkr.hcl");
        let body = hcl::parse(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
        let mut ctx = Context::new();
        let mut path = hcl::Map::new();
        path.insert(
            "root".to_owned(),
            Value::from(packer_dir().to_str().unwrap()),
        );
        ctx.declare_var("path", Value::Object(path));

        let mut vars = hcl::Map::new();
        for v in blocks(&body, "variable") {
            let name = v.labels()[0].as_str().to_owned();
            if let Some(default) = attr(v.body(), "default") {
                vars.insert(name, default.evaluate(&ctx).unwrap());
            }
        }
        vars.insert(
            "agent_binary".to_owned(),
            Value::from(agent_binary.to_str().unwrap()),
        );
        ctx.declare_var("var", Value::Object(vars));

        // timestamp() and friends are packer's; the locals using them are
        // not needed to stage files, so they are left out.
        let mut locals = hcl::Map::new();
        for l in blocks(&body, "locals") {
            for a in l.body().attributes() {
                if let Ok(v) = a.expr().evaluate(&ctx) {
                    locals.insert(a.key().to_owned(), v);
                    ctx.declare_var("local", Value::Object(locals.clone()));
                }
            }
        }
        Self { body, ctx, locals }
    }

    fn eval(&self, e: &Expression) -> Value {
        e.evaluate(&self.ctx)
            .unwrap_or_else(|err| panic!("cannot evaluate {e:?}: {err}"))
    }

    fn eval_str(&self, e: &Expression) -> String {
        match self.eval(e) {
            Value::String(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }

    fn build(&self) -> &Block {
        let builds: Vec<_> = blocks(&self.body, "build").collect();
        assert_eq!(builds.len(), 1, "berth.pkr.hcl must hold one build block");
        builds[0]
    }

    fn provisioners<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
        blocks(self.build().body(), "provisioner")
            .filter(move |p| p.labels().first().map(|l| l.as_str()) == Some(kind))
    }

    /// Where the file provisioners put berth's files on the build instance.
    fn staging(&self) -> String {
        match self.locals.get("staging") {
            Some(Value::String(s)) => s.clone(),
            other => panic!("local.staging must be a string, got {other:?}"),
        }
    }

    /// The file provisioners as (source, destination).
    fn uploads(&self) -> Vec<(String, String)> {
        self.provisioners("file")
            .map(|p| {
                let src = attr(p.body(), "source").expect("file provisioner without source");
                let dst = attr(p.body(), "destination").expect("without destination");
                (self.eval_str(src), self.eval_str(dst))
            })
            .collect()
    }

    /// The shell provisioner that runs provision.sh: (script, environment).
    fn provision_step(&self) -> (PathBuf, Vec<(String, String)>) {
        let step = self
            .provisioners("shell")
            .find(|p| attr(p.body(), "script").is_some())
            .expect("no shell provisioner runs a script");
        let script = self.eval_str(attr(step.body(), "script").unwrap());
        let env = match attr(step.body(), "environment_vars").map(|e| self.eval(e)) {
            Some(Value::Array(vars)) => vars
                .iter()
                .map(|v| {
                    let (k, v) = v.as_str().unwrap().split_once('=').unwrap();
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
            None => Vec::new(),
            other => panic!("environment_vars must be a list, got {other:?}"),
        };
        (PathBuf::from(script), env)
    }
}

fn blocks<'a>(body: &'a Body, ident: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
    body.blocks().filter(move |b| b.identifier() == ident)
}

fn attr<'a>(body: &'a Body, key: &str) -> Option<&'a Expression> {
    body.attributes().find(|a| a.key() == key).map(|a| a.expr())
}

// ---------------------------------------------------------------- systemd

/// A unit file as (section, key, value) in file order.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn unit_values(text: &str, key: &str) -> Vec<String> {
    unit_entries(text)
        .into_iter()
        .filter(|(_, k, _)| k == key)
        .map(|(_, _, v)| v)
        .collect()
}

fn unit_value(text: &str, key: &str) -> String {
    let v = unit_values(text, key);
    assert_eq!(v.len(), 1, "expected one {key}= in the unit, found {v:?}");
    v.into_iter().next().unwrap()
}

fn units() -> Vec<(String, String)> {
    let mut units: Vec<_> = std::fs::read_dir(repo().join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "service"))
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    units.sort();
    let names: Vec<_> = units.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "berth-agent.service",
            "berth-coordinator.service",
            "berth-mirror.service"
        ]
    );
    units
}

/// The unit with its ExecStart binary (a berth binary in /usr/local/bin)
/// pointed at the one cargo just built, written into `dir` under its own
/// name: `systemd-analyze verify` requires the binary to exist, and checks
/// the unit as it is otherwise.
/// A unit whose binary is not berth's (the mirror's distribution) must
/// name it where its Debian package installs it, which must exist here.
fn unit_with_built_binary(dir: &Path, name: &str, text: &str) -> PathBuf {
    let exec = unit_value(text, "ExecStart");
    let path = exec.split_whitespace().next().unwrap();
    if !is_berth_binary(path) {
        assert!(
            Path::new(path).is_file(),
            "{name}: ExecStart {path} does not exist (scripts/deps.sh installs it)"
        );
        let out = dir.join(name);
        std::fs::write(&out, text).unwrap();
        return out;
    }
    let binary = path
        .strip_prefix("/usr/local/bin/")
        .unwrap_or_else(|| panic!("{name}: ExecStart {path} is not in /usr/local/bin"));
    let built = bin(binary);
    let rewritten = text.replace(path, built.to_str().unwrap());
    let out = dir.join(name);
    std::fs::write(&out, rewritten).unwrap();
    out
}

/// berth's own daemons live in /usr/local/bin.
fn is_berth_binary(path: &str) -> bool {
    path.strip_prefix("/usr/local/bin/")
        .is_some_and(|b| b.starts_with("berth"))
}

/// Whether the YAML `text` (block style, as systemd/berth-mirror.yml is
/// written) has the nested key `path`.
fn yaml_has(text: &str, path: &[&str]) -> bool {
    let mut stack: Vec<(usize, String)> = vec![];
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_owned()));
        if stack
            .iter()
            .map(|(_, k)| k.as_str())
            .eq(path.iter().copied())
        {
            return true;
        }
    }
    false
}

/// `systemd-analyze verify`; Ok when it exits 0 and prints nothing on
/// stderr (unknown keys and bad values are only warnings there).
fn verify(unit: &Path) -> Result<(), String> {
    let o = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit));
    if o.status.success() && o.stderr.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", o.status, stderr(&o)))
    }
}

/// The overall exposure `systemd-analyze security --offline=true` reports.
fn exposure(unit: &Path) -> f64 {
    let o = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure line for {}: {}\n{}",
                unit.display(),
                out,
                stderr(&o)
            )
        });
    // "→ Overall exposure level for NAME: 1.2 OK 🙂"
    let score = line.rsplit_once(": ").unwrap().1;
    score
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("cannot parse the score in {line:?}: {e}"))
}

/// Long flags of `berth-agent` (and its subcommands' globals), from --help.
fn agent_flags() -> BTreeSet<String> {
    let o = run(Command::new(bin("berth-agent")).arg("--help"));
    let help = stdout(&o);
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.split('=').next().unwrap().to_owned())
        .filter(|w| !w.is_empty())
        .collect()
}

fn assert_agent_flag(flags: &BTreeSet<String>, flag: &str, origin: &str) {
    assert!(
        flags.contains(flag) || PENDING_AGENT_FLAGS.contains(&flag),
        "{origin} uses --{flag}, which `berth-agent --help` does not list ({flags:?})"
    );
}

// ---------------------------------------------------------------- tests

#[test]
fn packer_files_are_formatted() {
    if !require(&[("packer", "packer")]) {
        return;
    }
    let o = run(packer().args(["fmt", "-check", "-diff"]).arg(packer_dir()));
    assert!(
        o.status.success(),
        "`packer fmt -check packer/` failed: run `packer fmt packer/`\n{}{}",
        stdout(&o),
        stderr(&o)
    );
}

/// A full validate (not -syntax-only) of the template without
/// plugins.pkr.hcl, which Debian's packer 1.6.6 rejects. Full validation
/// prepares every provisioner, so it also proves that each file the
/// template uploads exists.
#[test]
fn packer_template_validates() {
    if !require(&[("packer", "packer")]) {
        return;
    }
    let template = packer_dir().join("berth.pkr.hcl");
    let agent = bin("berth-agent");
    let o = run(packer()
        .arg("validate")
        .arg(format!("-var=agent_binary={}", agent.display()))
        .arg(&template));
    assert!(
        o.status.success(),
        "packer validate failed:\n{}{}",
        stdout(&o),
        stderr(&o)
    );

    // The same validate with a missing agent binary must fail on that path:
    // proof that this is the full validation, which checks provisioners.
    let o = run(packer()
        .arg("validate")
        .arg("-var=agent_binary=/nonexistent/berth-agent")
        .arg(&template));
    assert!(
        !o.status.success(),
        "validate accepted a missing agent binary"
    );
    assert!(
        format!("{}{}", stdout(&o), stderr(&o)).contains("/nonexistent/berth-agent"),
        "validate failed for another reason:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
}

#[test]
fn packer_files_parse_and_template_uploads_what_provisioning_needs() {
    // Every .pkr.hcl parses, including the plugins file packer 1.6.6 refuses.
    let mut files: Vec<_> = std::fs::read_dir(packer_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(".pkr.hcl"))
        .collect();
    files.sort();
    // CI validates berth.pkr.hcl on its own, so a third file would never be
    // validated.
    assert_eq!(
        files.len(),
        2,
        "expected berth.pkr.hcl and plugins.pkr.hcl only: {files:?}"
    );
    for f in &files {
        hcl::parse(&std::fs::read_to_string(f).unwrap())
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", f.display()));
    }

    // plugins.pkr.hcl holds the plugin requirement and nothing else, and the
    // template holds no `packer` block, so validating it alone loses nothing.
    let plugins =
        hcl::parse(&std::fs::read_to_string(packer_dir().join("plugins.pkr.hcl")).unwrap())
            .unwrap();
    let idents: Vec<_> = plugins.blocks().map(Block::identifier).collect();
    assert_eq!(
        idents,
        ["packer"],
        "plugins.pkr.hcl must hold only the packer block"
    );
    assert_eq!(plugins.attributes().count(), 0);
    let required = blocks(plugins.blocks().next().unwrap().body(), "required_plugins")
        .next()
        .expect("no required_plugins block");
    let amazon = attr(required.body(), "amazon").expect("amazon plugin not required");
    let amazon = amazon.evaluate(&Context::new()).unwrap();
    assert_eq!(
        amazon.as_object().unwrap()["source"],
        Value::from("github.com/hashicorp/amazon")
    );

    let agent = bin("berth-agent");
    let t = Template::load(&agent);
    assert_eq!(blocks(&t.body, "packer").count(), 0);

    // One amazon-ebs source from Debian 12's official images, and the build
    // uses it.
    let sources: Vec<_> = blocks(&t.body, "source").collect();
    assert_eq!(sources.len(), 1);
    let labels: Vec<_> = sources[0].labels().iter().map(|l| l.as_str()).collect();
    assert_eq!(labels[0], "amazon-ebs");
    let filter = blocks(sources[0].body(), "source_ami_filter")
        .next()
        .expect("no source_ami_filter");
    assert_eq!(
        t.eval(attr(filter.body(), "owners").unwrap()),
        Value::from(vec!["136693071363"])
    );
    let filters = t.eval(attr(filter.body(), "filters").unwrap());
    assert_eq!(
        filters.as_object().unwrap()["name"],
        Value::from("debian-12-amd64-*")
    );
    for var in [
        "region",
        "instance_type",
        "subnet_id",
        "source_ami_name",
        "tags",
    ] {
        assert!(
            blocks(&t.body, "variable").any(|v| v.labels()[0].as_str() == var),
            "variable {var} is missing"
        );
    }
    assert_eq!(
        t.eval(attr(t.build().body(), "sources").unwrap()),
        Value::from(vec![format!("source.amazon-ebs.{}", labels[1])])
    );

    // Every upload's source exists (relative to packer/ through path.root)
    // and lands in the staging directory provision.sh reads.
    let staging = t.staging();
    let uploads = t.uploads();
    assert!(!uploads.is_empty());
    for (src, dst) in &uploads {
        assert!(
            Path::new(src).exists(),
            "upload source {src} does not exist"
        );
        assert!(
            dst.starts_with(&format!("{staging}/")),
            "upload {src} goes to {dst}, outside {staging}"
        );
    }
    assert!(uploads.iter().any(|(s, _)| Path::new(s) == agent));
    let (script, env) = t.provision_step();
    assert_eq!(script, packer_dir().join("scripts/provision.sh"));
    assert!(script.is_file());
    assert!(env.contains(&("BERTH_SRC".to_owned(), staging)));
    assert!(env.contains(&("BERTH_ROOT".to_owned(), "/".to_owned())));
}

/// Runs provision.sh for real, into a throwaway root, with exactly what the
/// template's file provisioners upload and the environment its shell
/// provisioner sets (re-rooted, and without apt). The root is seeded with
/// what a Debian build instance has, so the clean-up is checked too.
#[test]
fn provision_script_installs_the_agent_into_a_root() {
    if !require(&[("systemctl", "systemd"), ("bash", "bash")]) {
        return;
    }
    let tmp = TempDir::new("provision");
    let stage = tmp.path().join("stage");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let agent = bin("berth-agent");
    let t = Template::load(&agent);
    let staging = t.staging();
    for (src, dst) in t.uploads() {
        let rel = dst.strip_prefix(&format!("{staging}/")).unwrap();
        upload(&src, &stage.join(rel));
    }
    let (script, template_env) = t.provision_step();

    // Refuses to run apt against anything but the real root, before
    // touching the root.
    let o = run(Command::new("bash")
        .arg(&script)
        .env("BERTH_SRC", &stage)
        .env("BERTH_ROOT", &root)
        .env_remove("BERTH_SKIP_APT"));
    assert!(!o.status.success(), "provision.sh ran apt for a non-/ root");
    assert!(
        stderr(&o).contains("apt installs into / only"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

    // What the bake leaves behind on a Debian build instance.
    let seed = |rel: &str, content: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    };
    seed(
        "lib/systemd/system/docker.service",
        "[Service]\nExecStart=/usr/sbin/dockerd\n",
    );
    seed(
        "lib/systemd/system/docker.socket",
        "[Socket]\nListenStream=/run/docker.sock\n",
    );
    seed(
        "lib/systemd/system/containerd.service",
        "[Service]\nExecStart=/usr/bin/containerd\n",
    );
    std::fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants")).unwrap();
    std::fs::create_dir_all(root.join("etc/systemd/system/sockets.target.wants")).unwrap();
    symlink(
        "/lib/systemd/system/docker.service",
        root.join("etc/systemd/system/multi-user.target.wants/docker.service"),
    )
    .unwrap();
    symlink(
        "/lib/systemd/system/docker.socket",
        root.join("etc/systemd/system/sockets.target.wants/docker.socket"),
    )
    .unwrap();
    seed("etc/machine-id", "0123456789abcdef0123456789abcdef\n");
    seed("etc/ssh/ssh_host_ed25519_key", "private");
    seed("etc/ssh/sshd_config", "PermitRootLogin no\n");
    seed(
        "home/admin/.ssh/authorized_keys",
        "ssh-ed25519 AAAA packer_key\n",
    );
    seed("var/lib/cloud/instances/i-0123/sem/config_ssh", "");
    seed("var/log/syslog", "bake noise\n");
    seed("var/log/syslog.1", "older bake noise\n");
    seed(
        "var/log/cloud-init.log",
        "first boot of the build instance\n",
    );
    seed("var/cache/apt/archives/docker.io_20.10.24.deb", "deb");
    seed(
        "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease",
        "list",
    );
    seed("etc/docker/key.json", "{\"kid\":\"baked\"}");

    let o = run(Command::new("bash")
        .arg(&script)
        .envs(template_env)
        .env("BERTH_SRC", &stage)
        .env("BERTH_ROOT", &root)
        .env("BERTH_SKIP_APT", "1"));
    assert!(
        o.status.success(),
        "provision.sh failed:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
    let under = |p: &str| root.join(p.trim_start_matches('/'));

    // The installed unit's own paths exist under the root: the binary (the
    // one that was built), the config it is started with, its environment
    // file (private: it may hold the join credential) and its directories.
    let unit_path = under("/etc/systemd/system/berth-agent.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert_eq!(
        unit,
        std::fs::read_to_string(repo().join("systemd/berth-agent.service")).unwrap()
    );
    let exec = unit_value(&unit, "ExecStart");
    let mut args = exec.split_whitespace();
    let binary = under(args.next().unwrap());
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        std::fs::read(&agent).unwrap()
    );
    assert_eq!(
        binary.metadata().unwrap().permissions().mode() & 0o777,
        0o755
    );
    let flags = agent_flags();
    let args: Vec<_> = args.collect();
    let mut config = None;
    for (i, a) in args.iter().enumerate() {
        if let Some(flag) = a.strip_prefix("--") {
            assert_agent_flag(&flags, flag, "ExecStart");
            if flag == "config" {
                config = Some(args[i + 1]);
            }
        }
    }
    let config = under(config.expect("ExecStart passes no --config"));
    let toml: toml::Table = std::fs::read_to_string(&config)
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", config.display()));
    for key in toml.keys() {
        assert_agent_flag(&flags, key, "agent.toml");
    }
    assert_eq!(toml["provider"].as_str(), Some("ec2"));
    assert_eq!(toml["no-netns"].as_bool(), Some(true));
    let state_dir = toml["state-dir"].as_str().unwrap();
    assert!(under(state_dir).is_dir(), "state dir {state_dir} missing");
    let env_file = unit_value(&unit, "EnvironmentFile");
    let env_file = under(env_file.trim_start_matches('-'));
    assert!(env_file.is_file(), "{} missing", env_file.display());
    assert_eq!(
        env_file.metadata().unwrap().permissions().mode() & 0o777,
        0o600
    );
    let state = under(&format!("/var/lib/{}", unit_value(&unit, "StateDirectory")));
    assert!(state.is_dir());
    assert_eq!(
        state.metadata().unwrap().permissions().mode() & 0o777,
        0o700
    );
    // The unit keeps /etc/docker writable in a read-only /etc: it must exist.
    for rw in unit_values(&unit, "ReadWritePaths") {
        assert!(under(rw.trim_start_matches('-')).is_dir(), "{rw} missing");
    }

    // Enabled the way systemctl does it, for the target its [Install] names.
    let wanted_by = unit_value(&unit, "WantedBy");
    let link = under(&format!(
        "/etc/systemd/system/{wanted_by}.wants/berth-agent.service"
    ));
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("/etc/systemd/system/berth-agent.service")
    );

    // Nothing else can start dockerd: Docker's units are masked and their
    // enable links are gone.
    for u in ["docker.service", "docker.socket", "containerd.service"] {
        let p = under(&format!("/etc/systemd/system/{u}"));
        assert_eq!(
            std::fs::read_link(&p).ok().as_deref(),
            Some(Path::new("/dev/null")),
            "{u} not masked"
        );
    }
    assert!(!under("/etc/systemd/system/multi-user.target.wants/docker.service").exists());
    assert!(!under("/etc/systemd/system/sockets.target.wants/docker.socket").exists());

    // Every instance boots fresh.
    let machine_id = under("/etc/machine-id");
    assert_eq!(
        std::fs::read(&machine_id).unwrap(),
        b"",
        "machine-id not emptied"
    );
    assert!(!under("/etc/ssh/ssh_host_ed25519_key").exists());
    assert!(
        under("/etc/ssh/sshd_config").exists(),
        "removed more than the host keys"
    );
    assert!(!under("/home/admin/.ssh/authorized_keys").exists());
    assert_eq!(
        std::fs::read_dir(under("/var/lib/cloud")).unwrap().count(),
        0
    );
    assert!(!under("/var/log/cloud-init.log").exists());
    assert_eq!(std::fs::read(under("/var/log/syslog")).unwrap(), b"");
    assert!(!under("/var/log/syslog.1").exists());
    assert!(!under("/var/cache/apt/archives/docker.io_20.10.24.deb").exists());
    assert_eq!(
        std::fs::read_dir(under("/var/lib/apt/lists"))
            .unwrap()
            .count(),
        0
    );
    assert!(
        !under("/etc/docker/key.json").exists(),
        "engine key baked into the image"
    );

    // The template asks for the staging directory to go.
    assert!(
        !stage.exists(),
        "BERTH_REMOVE_SRC=1 left {}",
        stage.display()
    );
}

/// `systemd-analyze verify` of each unit with its binary present, failing on
/// any stderr, and a canary proving such a warning would be caught.
#[test]
fn systemd_units_verify_without_warnings() {
    if !require(&[("systemd-analyze", "systemd")]) {
        return;
    }
    let tmp = TempDir::new("verify");
    for (name, text) in units() {
        let unit = unit_with_built_binary(tmp.path(), &name, &text);
        if let Err(e) = verify(&unit) {
            panic!("systemd-analyze verify {name}: {e}");
        }
        let exec = unit_value(&text, "ExecStart");
        let binary = exec.split_whitespace().next().unwrap();
        assert_eq!(unit_value(&text, "Restart"), "always", "{name}");
        assert_eq!(
            unit_value(&text, "After"),
            "network-online.target",
            "{name}"
        );
        assert_eq!(
            unit_value(&text, "Wants"),
            "network-online.target",
            "{name}"
        );
        if !is_berth_binary(binary) {
            // distribution: REGISTRY_A_B overrides the key a.b of its
            // configuration, which must be there (an override of a key
            // that does not exist is a typo no one would notice).
            // docs/aws.md installs systemd/berth-mirror.yml there.
            let config = exec.split_whitespace().last().unwrap();
            assert_eq!(config, "/etc/berth/mirror.yml", "{name}");
            let yml = std::fs::read_to_string(repo().join("systemd/berth-mirror.yml")).unwrap();
            for env in unit_values(&text, "Environment") {
                let (var, _) = env.split_once('=').unwrap();
                let key = var.strip_prefix("REGISTRY_").unwrap_or_else(|| {
                    panic!("{name} sets {var}: distribution reads REGISTRY_* only")
                });
                let key = key.to_lowercase();
                let path: Vec<&str> = key.split('_').collect();
                assert!(
                    yaml_has(&yml, &path),
                    "{name} sets {var}: no {} in {config}",
                    path.join(".")
                );
            }
            assert_eq!(unit_value(&text, "Type"), "exec", "{name}");
            continue;
        }
        // Settings the unit passes through the environment must be env
        // twins the binary knows: clap ignores unknown variables silently.
        let help = stdout(&run(
            Command::new(bin(binary.rsplit('/').next().unwrap())).arg("--help")
        ));
        for env in unit_values(&text, "Environment") {
            let (var, _) = env.split_once('=').unwrap();
            assert!(
                help.contains(&format!("[env: {var}=")),
                "{name} sets {var}, which `{binary} --help` does not list"
            );
        }
        assert_eq!(unit_value(&text, "Type"), "notify", "{name}");
        // Both daemons ping the watchdog (systemd_e2e checks the pings).
        assert_eq!(unit_value(&text, "WatchdogSec"), "30s", "{name}");
    }

    // An unknown key: systemd-analyze exits 0 and only warns on stderr.
    let canary = tmp.path().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    let (name, text) = &units()[0];
    let broken = text.replace("[Service]\n", "[Service]\nProtectKernelModule=yes\n");
    let unit = unit_with_built_binary(&canary, name, &broken);
    let err = verify(&unit).expect_err("a misspelled option passed verification");
    assert!(err.contains("ProtectKernelModule"), "{err}");
}

#[test]
fn agent_unit_manages_dockerd_and_leaks_nothing_into_containers() {
    let (_, agent) = units().into_iter().next().unwrap();
    // On stop only the agent gets SIGTERM, so it can stop dockerd in order.
    assert_eq!(unit_value(&agent, "KillMode"), "mixed");
    assert_eq!(unit_value(&agent, "NotifyAccess"), "main");
    assert_eq!(unit_value(&agent, "Delegate"), "yes");
    let keys: BTreeSet<_> = unit_entries(&agent)
        .into_iter()
        .map(|(_, k, _)| k)
        .collect();
    for opt in AGENT_FORBIDDEN_OPTIONS {
        assert!(
            !keys.contains(*opt),
            "berth-agent.service sets {opt}, which containers inherit"
        );
    }

    let (_, coord) = units().into_iter().nth(1).unwrap();
    assert_eq!(unit_value(&coord, "DynamicUser"), "yes");
    assert_eq!(unit_value(&coord, "User"), "berth");
    assert_eq!(unit_value(&coord, "StateDirectory"), "berth-coordinator");
    assert_eq!(unit_value(&coord, "CapabilityBoundingSet"), "");

    // The mirror: unprivileged like the coordinator; its key handed over
    // as a credential, its cache in its StateDirectory.
    let (_, mirror) = units().into_iter().nth(2).unwrap();
    assert_eq!(unit_value(&mirror, "DynamicUser"), "yes");
    assert_eq!(unit_value(&mirror, "CapabilityBoundingSet"), "");
    let state = unit_value(&mirror, "StateDirectory");
    assert!(
        unit_values(&mirror, "Environment").contains(&format!(
            "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=%S/{state}"
        )),
        "the mirror's cache is not its StateDirectory"
    );
    let creds = unit_values(&mirror, "LoadCredential");
    for (cred, var) in [
        ("tls-cert", "REGISTRY_HTTP_TLS_CERTIFICATE"),
        ("tls-key", "REGISTRY_HTTP_TLS_KEY"),
    ] {
        assert!(
            creds
                .iter()
                .any(|c| c.starts_with(&format!("{cred}:/etc/berth/")))
        );
        assert!(
            unit_values(&mirror, "Environment").contains(&format!("{var}=%d/{cred}")),
            "{var} is not the {cred} credential"
        );
    }
    let yml = std::fs::read_to_string(repo().join("systemd/berth-mirror.yml")).unwrap();
    assert!(yaml_has(&yml, &["proxy", "remoteurl"]));
    assert!(
        yml.contains("addr: 127.0.0.1:5051"),
        "metrics leave loopback"
    );
}

#[test]
fn systemd_units_security_exposure_stays_low() {
    if !require(&[("systemd-analyze", "systemd")]) {
        return;
    }
    let tmp = TempDir::new("security");
    let max: BTreeMap<_, _> = MAX_EXPOSURE.iter().copied().collect();
    for (name, text) in units() {
        let unit = unit_with_built_binary(tmp.path(), &name, &text);
        let score = exposure(&unit);
        eprintln!("systemd-analyze security --offline=true {name}: {score}");
        assert!((0.0..=10.0).contains(&score), "{name}: {score}");
        let limit = max[name.as_str()];
        assert!(
            score <= limit,
            "{name}: exposure {score} is above {limit}; update the hardening or, \
             with a reason, MAX_EXPOSURE and README.md"
        );
    }
}

// ---------------------------------------------------------------- IAM

fn policy(name: &str) -> serde_json::Value {
    let p = repo().join("docs/iam").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

fn statements(policy: &serde_json::Value) -> &Vec<serde_json::Value> {
    assert_eq!(policy["Version"], "2012-10-17");
    policy["Statement"]
        .as_array()
        .expect("Statement is not a list")
}

fn actions(statement: &serde_json::Value) -> Vec<&str> {
    match &statement["Action"] {
        serde_json::Value::String(a) => vec![a.as_str()],
        serde_json::Value::Array(a) => a.iter().map(|a| a.as_str().unwrap()).collect(),
        other => panic!("bad Action {other}"),
    }
}

fn statement_for<'a>(policy: &'a serde_json::Value, action: &str) -> &'a serde_json::Value {
    let found: Vec<_> = statements(policy)
        .iter()
        .filter(|s| actions(s).contains(&action))
        .collect();
    assert_eq!(found.len(), 1, "expected one statement allowing {action}");
    found[0]
}

#[test]
fn iam_policies_are_least_privilege() {
    for name in ["agent-policy.json", "coordinator-policy.json"] {
        let p = policy(name);
        for s in statements(&p) {
            assert_eq!(s["Effect"], "Allow", "{name}: only allows, nothing to undo");
            for a in actions(s) {
                assert!(
                    (a.starts_with("ec2:") || a.starts_with("autoscaling:")) && !a.contains('*'),
                    "{name}: broad action {a}"
                );
            }
            // Only the describe calls, which have no resource-level
            // permissions, may name every resource.
            if s["Resource"] == "*" {
                let a = actions(s);
                assert!(
                    a == ["ec2:DescribeInstances"]
                        || a == ["autoscaling:DescribeAutoScalingGroups"],
                    "{name}: {s}"
                );
            } else {
                assert!(s["Condition"].is_object(), "{name}: unconditioned {s}");
            }
        }
    }

    // The agent may terminate its own instance, and only while it carries
    // its role's pool tag; nothing else.
    let agent = policy("agent-policy.json");
    let all: Vec<_> = statements(&agent).iter().flat_map(actions).collect();
    assert_eq!(all, ["ec2:TerminateInstances"]);
    let term = statement_for(&agent, "ec2:TerminateInstances");
    assert_eq!(term["Resource"], "${ec2:SourceInstanceARN}");
    assert_eq!(
        term["Condition"]["StringEquals"]["aws:ResourceTag/berth:pool"],
        "${aws:PrincipalTag/berth:pool}"
    );

    // The coordinator describes anything, but tags and terminates only
    // instances of its pool, and terminates only those it marked orphaned;
    // it changes the capacity of its pool's group only.
    let coord = policy("coordinator-policy.json");
    let all: BTreeSet<_> = statements(&coord).iter().flat_map(actions).collect();
    assert_eq!(
        all,
        BTreeSet::from([
            "autoscaling:DescribeAutoScalingGroups",
            "autoscaling:SetDesiredCapacity",
            "autoscaling:SetInstanceProtection",
            "autoscaling:TerminateInstanceInAutoScalingGroup",
            "ec2:CreateTags",
            "ec2:DescribeInstances",
            "ec2:TerminateInstances"
        ])
    );
    for a in [
        "autoscaling:SetDesiredCapacity",
        "autoscaling:SetInstanceProtection",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
    ] {
        let s = statement_for(&coord, a);
        assert_eq!(
            s["Condition"]["StringEquals"]["aws:ResourceTag/berth:pool"],
            "${aws:PrincipalTag/berth:pool}",
            "{a}"
        );
        assert!(
            s["Resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("arn:aws:autoscaling:")),
            "{a}: {s}"
        );
    }
    let term = statement_for(&coord, "ec2:TerminateInstances");
    assert_eq!(
        term["Condition"]["StringEquals"]["aws:ResourceTag/berth:pool"],
        "${aws:PrincipalTag/berth:pool}"
    );
    assert_eq!(
        term["Condition"]["Null"]["aws:ResourceTag/berth:orphan"],
        "false"
    );
    let tag = statement_for(&coord, "ec2:CreateTags");
    assert_eq!(
        tag["Condition"]["StringEquals"]["aws:ResourceTag/berth:pool"],
        "${aws:PrincipalTag/berth:pool}"
    );
    assert_eq!(
        tag["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"],
        serde_json::json!(["berth:orphan"])
    );
    assert_eq!(tag["Condition"]["Null"]["aws:TagKeys"], "false");

    let trust = policy("ec2-trust-policy.json");
    assert_eq!(
        statements(&trust)[0]["Principal"]["Service"],
        "ec2.amazonaws.com"
    );
}

/// docs/aws.md shows the policies inline; they must be the files' content.
#[test]
fn aws_doc_shows_the_policy_files() {
    let doc = std::fs::read_to_string(repo().join("docs/aws.md")).unwrap();
    let shown: Vec<serde_json::Value> = doc
        .split("```json\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .map(|b| serde_json::from_str(b).unwrap_or_else(|e| panic!("bad JSON in aws.md: {e}\n{b}")))
        .collect();
    for name in [
        "agent-policy.json",
        "coordinator-policy.json",
        "ec2-trust-policy.json",
    ] {
        assert!(
            shown.contains(&policy(name)),
            "docs/aws.md does not show docs/iam/{name} as it is"
        );
    }
}
