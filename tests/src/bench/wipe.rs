//! P4: the agent's wipe of a busy host, both ways the agent has: replacing
//! dockerd on an empty data root (`berth_agent::docker::reset::Replacer`,
//! what the agent runs after a lease on a dockerd it started) and through
//! the Docker API (`berth_agent::docker::wipe::wipe`, its fallback), against
//! the docker CLI's `docker rm -f $(docker ps -aq)` + `docker system prune
//! -af --volumes` on the same host, populated the same way before each run;
//! the three take turns so that all see the same machine. The dockerd is
//! started exactly as the agent starts it, in a namespace of its own. After
//! each fresh wipe, the deletion of the old data root (background work in
//! recycle mode) is awaited and timed before the next population.
//!
//! A busy host: N running containers (spread over the volumes and
//! networks), images (imported from a busybox root filesystem, plus one
//! `docker build`, which leaves intermediate images behind as the legacy
//! builder's cache), named volumes and user networks. No image can be
//! pulled here, so everything is made from `/bin/busybox`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::task::JoinSet;

use berth_agent::docker::client::BollardDocker;
use berth_agent::docker::reset::{self, OldRoot, Replacer};

use super::boot::BareHost;
use super::procs::Env;
use super::{BenchError, Figure, Population, Result, Sizes, ms};

/// docker CLI commands run at once while populating.
const POPULATE_CONCURRENCY: usize = 4;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The P4 target.
const WIPE_TARGET_MS: f64 = 2000.0;

/// A busybox root filesystem as a tarball, for `docker import`, and a build
/// context that builds on top of the imported image.
#[derive(Debug, Clone)]
pub struct Rootfs {
    pub tar: PathBuf,
    pub context: PathBuf,
    pub docker_config: PathBuf,
}

impl Rootfs {
    pub async fn make(env: &Env) -> Result<Self> {
        let dir = env.state_dir.join("rootfs");
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).map_err(BenchError::io("creating the rootfs"))?;
        std::fs::copy(berth_testkit::busybox(), bin.join("busybox"))
            .map_err(BenchError::io("copying busybox"))?;
        for applet in ["sh", "sleep", "echo"] {
            let link = bin.join(applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link)
                    .map_err(BenchError::io("linking a busybox applet"))?;
            }
        }
        let tar = env.state_dir.join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .await
            .map_err(BenchError::io("running tar"))?;
        if !out.status.success() {
            return Err(BenchError::step(
                "tar",
                String::from_utf8_lossy(&out.stderr),
            ));
        }
        let context = env.state_dir.join("build-context");
        std::fs::create_dir_all(&context).map_err(BenchError::io("creating a build context"))?;
        std::fs::write(
            context.join("Dockerfile"),
            "FROM bimg0\nRUN echo built > /built\nRUN echo again > /again\n",
        )
        .map_err(BenchError::io("writing a Dockerfile"))?;
        let docker_config = env.state_dir.join("docker-config");
        std::fs::create_dir_all(&docker_config)
            .map_err(BenchError::io("creating DOCKER_CONFIG"))?;
        Ok(Rootfs {
            tar,
            context,
            docker_config,
        })
    }

    /// The stock docker CLI against one dockerd socket.
    pub fn docker(&self, socket: &Path) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", format!("unix://{}", socket.display()))
            .env("DOCKER_BUILDKIT", "0")
            .env("DOCKER_CONFIG", &self.docker_config)
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }
}

async fn docker_ok(rootfs: &Rootfs, socket: &Path, args: &[String]) -> Result<String> {
    let out = rootfs
        .docker(socket)
        .args(args)
        .output()
        .await
        .map_err(BenchError::io("running docker"))?;
    if !out.status.success() {
        return Err(BenchError::step(
            format!("docker {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs docker CLI commands, a few at a time.
async fn docker_all(rootfs: &Rootfs, socket: &Path, cmds: Vec<Vec<String>>) -> Result<()> {
    let mut set = JoinSet::new();
    let mut cmds = cmds.into_iter();
    loop {
        while set.len() < POPULATE_CONCURRENCY {
            let Some(args) = cmds.next() else { break };
            let (r, s) = (rootfs.clone(), socket.to_owned());
            set.spawn(async move { docker_ok(&r, &s, &args).await });
        }
        match set.join_next().await {
            None => return Ok(()),
            Some(Ok(r)) => {
                r?;
            }
            Some(Err(e)) => return Err(BenchError::step("populating", e)),
        }
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// Makes the dockerd behind `socket` busy with `pop`. Names carry a
/// number of their own per call, so that something an earlier wipe left
/// behind (which the run reports) does not stop the next population.
pub async fn populate(rootfs: &Rootfs, socket: &Path, pop: Population) -> Result<()> {
    static ROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let r = ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tar = rootfs.tar.to_string_lossy().into_owned();
    let imports = pop.images.saturating_sub(1).max(1);
    let base = format!("bimg{r}-0");
    docker_ok(
        rootfs,
        socket,
        &args(&["import", "-c", "ENV N=0", &tar, &base]),
    )
    .await?;
    let mut cmds: Vec<Vec<String>> = (1..imports)
        .map(|i| {
            let name = format!("bimg{r}-{i}");
            args(&["import", "-c", &format!("ENV N={i}"), &tar, &name])
        })
        .collect();
    cmds.extend((0..pop.volumes).map(|i| args(&["volume", "create", &format!("bvol{r}-{i}")])));
    cmds.extend((0..pop.networks).map(|i| args(&["network", "create", &format!("bnet{r}-{i}")])));
    docker_all(rootfs, socket, cmds).await?;
    if pop.images >= 2 {
        std::fs::write(
            rootfs.context.join("Dockerfile"),
            format!("FROM {base}\nRUN echo built > /built\nRUN echo again > /again\n"),
        )
        .map_err(BenchError::io("writing a Dockerfile"))?;
        let ctx = rootfs.context.to_string_lossy().into_owned();
        let tag = format!("bbuilt{r}");
        docker_ok(rootfs, socket, &args(&["build", "-q", "-t", &tag, &ctx])).await?;
    }
    let runs = (0..pop.containers)
        .map(|i| {
            let mut a = args(&["run", "-d"]);
            if pop.networks > 0 {
                a.extend(args(&[
                    "--network",
                    &format!("bnet{r}-{}", i % pop.networks),
                ]));
            }
            if pop.volumes > 0 {
                a.extend(args(&["-v", &format!("bvol{r}-{}:/data", i % pop.volumes)]));
            }
            a.extend(args(&[&base, "sleep", "3600"]));
            a
        })
        .collect();
    docker_all(rootfs, socket, runs).await?;
    let running = docker_ok(
        rootfs,
        socket,
        &args(&["ps", "-q", "--filter", &format!("ancestor={base}")]),
    )
    .await?;
    let n = running.lines().count();
    if n != pop.containers {
        return Err(BenchError::step(
            "populating",
            format!("{n} containers running, wanted {}", pop.containers),
        ));
    }
    Ok(())
}

/// What is left on a dockerd, as the docker CLI lists it (containers,
/// images incl. intermediate, volumes, non-default networks).
pub async fn leftovers(rootfs: &Rootfs, socket: &Path) -> Result<[usize; 4]> {
    let count = |s: String| s.lines().filter(|l| !l.trim().is_empty()).count();
    let c = count(docker_ok(rootfs, socket, &args(&["ps", "-aq"])).await?);
    let i = count(docker_ok(rootfs, socket, &args(&["images", "-aq"])).await?);
    let v = count(docker_ok(rootfs, socket, &args(&["volume", "ls", "-q"])).await?);
    let n = docker_ok(
        rootfs,
        socket,
        &args(&["network", "ls", "--format", "{{.Name}}"]),
    )
    .await?
    .lines()
    .filter(|n| !["bridge", "host", "none"].contains(n))
    .count();
    Ok([c, i, v, n])
}

/// The baseline: the docker CLI's own way to empty a host, timed as a whole.
pub async fn cli_wipe(rootfs: &Rootfs, socket: &Path) -> Result<Duration> {
    let host = format!("unix://{}", socket.display());
    let t = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg("docker rm -f $(docker ps -aq) >/dev/null 2>&1; docker system prune -af --volumes >/dev/null")
        .env("DOCKER_HOST", host)
        .env("DOCKER_CONFIG", &rootfs.docker_config)
        .env_remove("DOCKER_CONTEXT")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(BenchError::io("running the docker CLI wipe"))?;
    let took = t.elapsed();
    if !out.status.success() {
        return Err(BenchError::step(
            "docker system prune",
            String::from_utf8_lossy(&out.stderr),
        ));
    }
    Ok(took)
}

/// What one series measured, in ms per run.
struct Series {
    /// The agent's wipe as it runs after a lease on a dockerd it started:
    /// replacing dockerd on an empty data root.
    fresh: Vec<f64>,
    /// The old tree's deletion after each fresh wipe (in the background in
    /// recycle mode; awaited here before the next run).
    deletion: Vec<f64>,
    /// The agent's wipe through the Docker API (its fallback).
    api: Vec<f64>,
    /// The docker CLI's rm + prune.
    cli: Vec<f64>,
    notes: Vec<String>,
}

/// One dockerd, the three wipes taking turns, `runs` of each.
async fn series(
    replacer: &std::sync::Arc<Replacer>,
    rootfs: &Rootfs,
    socket: &Path,
    pop: Population,
    runs: usize,
) -> Result<Series> {
    let mut out = Series {
        fresh: vec![],
        deletion: vec![],
        api: vec![],
        cli: vec![],
        notes: vec![],
    };
    for _ in 0..runs {
        populate(rootfs, socket, pop).await?;
        let t = Instant::now();
        let report = replacer.wipe("bench").await;
        out.fresh.push(ms(t.elapsed()));
        let t = Instant::now();
        replacer.deleted().await;
        out.deletion.push(ms(t.elapsed()));
        if !report.verified && report.error.starts_with("replacing dockerd") {
            // No daemon is left to go on with.
            return Err(BenchError::step("the fresh-data-root wipe", report.error));
        }
        if !report.verified || report.method != reset::METHOD_FRESH {
            out.notes.push(format!(
                "agent wipe (fresh data root) not verified: {} ({})",
                report.error, report.method
            ));
        }
        check_empty(
            rootfs,
            socket,
            replacer,
            "agent wipe (fresh data root)",
            &mut out.notes,
        )
        .await?;

        populate(rootfs, socket, pop).await?;
        let docker = replacer_client(socket)?;
        let t = Instant::now();
        let report = berth_agent::docker::wipe::wipe(&docker, "bench").await;
        out.api.push(ms(t.elapsed()));
        if !report.verified {
            out.notes
                .push(format!("agent wipe (API) not verified: {}", report.error));
        }
        check_empty(rootfs, socket, replacer, "agent wipe (API)", &mut out.notes).await?;

        populate(rootfs, socket, pop).await?;
        out.cli.push(ms(cli_wipe(rootfs, socket).await?));
        check_empty(rootfs, socket, replacer, "docker CLI wipe", &mut out.notes).await?;
    }
    out.notes.dedup();
    Ok(out)
}

fn replacer_client(socket: &Path) -> Result<BollardDocker> {
    BollardDocker::new(socket).map_err(|e| BenchError::step("docker client", e))
}

/// Notes what a wipe left, and starts the next run from an empty host.
async fn check_empty(
    rootfs: &Rootfs,
    socket: &Path,
    replacer: &Replacer,
    what: &str,
    notes: &mut Vec<String>,
) -> Result<()> {
    let left = leftovers(rootfs, socket).await?;
    if left != [0; 4] {
        notes.push(format!(
            "{what} left (containers, images, volumes, networks) {left:?}"
        ));
        replacer.wipe("bench-reset").await;
        replacer.deleted().await;
    }
    Ok(())
}

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    let env = Env::new(&format!("{}4-", sizes.prefix.trim_end_matches('-')))?;
    let rootfs = Rootfs::make(&env).await?;
    let (mut host, _) = BareHost::start(&env).await?;
    let result = async {
        let (docker, _) = berth_agent::docker::dockerd::wait_ready(&mut host.child, &host.spec.paths, READY_TIMEOUT)
            .await
            .map_err(|e| BenchError::step("starting dockerd", e))?;
        // The replacer owns dockerd from here on, as in the agent; the host's
        // teardown ends whichever dockerd runs last.
        let child = std::mem::replace(&mut host.child, placeholder_child()?);
        let replacer = Replacer::new(
            host.spec.clone(),
            READY_TIMEOUT,
            OldRoot::DeleteInBackground,
            docker,
            child,
        );
        let socket = host.socket().to_owned();
        let mut figures = vec![];
        let pop = sizes.p4_population;
        let s = series(&replacer, &rootfs, &socket, pop, sizes.p4_runs).await?;
        let describe = |what: &str| {
            format!(
                "{what} of a host with {} running containers, {} images, {} volumes, {} networks, build cache",
                pop.containers, pop.images, pop.volumes, pop.networks
            )
        };
        const CLI: &str = "docker rm -f $(docker ps -aq) + docker system prune -af --volumes";
        let mut f = Figure::new("P4", describe("wipe (dockerd replaced on an empty data root)"), "ms")
            .samples(s.fresh)
            .baseline(CLI, s.cli.clone());
        let (sm, r) = (f.summary(), f.ratio());
        let clean = s.notes.iter().all(|n| !n.starts_with("agent"));
        f = f
            .check("<= 2 s", sm.is_some_and(|s| s.median <= WIPE_TARGET_MS))
            .check("<= 0.5x the docker CLI", r.is_some_and(|r| r <= 0.5))
            .check("verified empty every time", clean);
        for n in &s.notes {
            f = f.note(n.clone());
        }
        figures.push(f);
        figures.push(
            Figure::new("P4 API wipe", describe("wipe through the Docker API (the fallback)"), "ms")
                .samples(s.api)
                .baseline(CLI, s.cli),
        );
        figures.push(
            Figure::new(
                "P4 old data root deletion",
                "deleting the data root a P4 wipe moved aside (in the background, after the host is back)",
                "ms",
            )
            .samples(s.deletion),
        );
        for &c in &sizes.p4_growth {
            let pop = Population {
                containers: c,
                ..sizes.p4_population
            };
            let s = series(&replacer, &rootfs, &socket, pop, sizes.p4_growth_runs).await?;
            let mut f = Figure::new(
                format!("P4 @{c} containers"),
                format!("wipe (dockerd replaced) with {c} running containers (rest as P4); API wipe median {:.0} ms", median(&s.api)),
                "ms",
            )
            .samples(s.fresh)
            .baseline("docker rm -f + docker system prune -af --volumes", s.cli);
            for n in s.notes {
                f = f.note(n);
            }
            figures.push(f);
        }
        Ok::<_, BenchError>(figures)
    }
    .await;
    host.destroy().await?;
    drop(env);
    result
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A child that has already exited, to stand in `BareHost::child` once the
/// replacer owns dockerd.
fn placeholder_child() -> Result<tokio::process::Child> {
    Command::new("true")
        .stdin(Stdio::null())
        .spawn()
        .map_err(BenchError::io("spawning true"))
}
