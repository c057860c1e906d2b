//! Wiping a host after its lease: leave any swarm the lease made or joined,
//! remove every container (killed), image, volume, non-default network,
//! managed plugin and all build cache, then look again (those, the swarm
//! state, and TCP listeners in the host's namespace other than the agent's
//! own) and report what is left. Written against [`DockerOps`] so it runs the same on
//! the real dockerd and on the fake in the tests.
//!
//! Containers go first because they pin images, volumes and networks; they
//! are killed and removed concurrently (bounded by
//! [`CONTAINER_CONCURRENCY`]). Then images, volumes, networks and build
//! cache go side by side, each kind with one prune call (dockerd deletes
//! the lot server-side, as `docker system prune` has it do) followed by
//! one-by-one removal of whatever the prune left ([`WIPE_CONCURRENCY`] at a
//! time). Errors do not stop the wipe: it removes what it can and the
//! verification decides, so a flaky call costs a host, never a leak.

use std::collections::HashSet;
use std::time::Instant;

use berth_proto::v1::WipeReport;
use futures::StreamExt;
use futures::stream;

use crate::docker::client::{DockerError, DockerOps, SwarmState};

/// Docker calls in flight at once during a wipe. dockerd serialises much of
/// its own work; 8 keeps its queue full without drowning a 2-core host.
pub const WIPE_CONCURRENCY: usize = 8;
/// Containers killed and removed at once. A forced removal mostly waits for
/// the process to die, so more of them overlap well; the docker CLI's
/// `rm -f` runs them all at once.
pub const CONTAINER_CONCURRENCY: usize = 32;
/// Image removal is repeated this many times at most: a parent image cannot
/// be removed before its children (409), so each pass peels a layer off.
pub const IMAGE_PASSES: usize = 5;
/// Passes over the volumes and networks a prune left. dockerd lets go of a
/// removed container's endpoints and volume references a moment after it
/// answers, so one can still be "in use" just after; it is tried again.
pub const LEFTOVER_PASSES: usize = 5;
/// Pause before each pass after the first.
pub const LEFTOVER_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
/// How many error messages end up in the report (the rest are counted).
const MAX_REPORTED_ERRORS: usize = 5;

/// Collects the errors of a wipe without letting them grow without bound.
#[derive(Default)]
struct Errors {
    messages: Vec<String>,
    more: usize,
}

impl Errors {
    fn push(&mut self, e: &DockerError) {
        if self.messages.len() < MAX_REPORTED_ERRORS {
            self.messages.push(e.to_string());
        } else {
            self.more += 1;
        }
    }

    fn render(&self) -> String {
        let mut s = self.messages.join("; ");
        if self.more > 0 {
            s.push_str(&format!("; and {} more", self.more));
        }
        s
    }
}

/// What was there (or is left) of each kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub containers: usize,
    pub images: usize,
    pub volumes: usize,
    pub networks: usize,
    pub build_cache: usize,
    pub plugins: usize,
}

impl Counts {
    pub fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

/// Lists everything once; a failed listing counts as an error and as zero.
/// Counting build cache asks for `system df`, which sizes every image and
/// volume: the verification needs it, the count before the wipe does not.
async fn census<D: DockerOps>(
    docker: &D,
    errors: &mut Errors,
    build_cache: bool,
) -> (Counts, bool) {
    let cache = async {
        if build_cache {
            docker.count_build_cache().await
        } else {
            Ok(0)
        }
    };
    let (c, i, v, n, b, p) = tokio::join!(
        docker.list_containers(),
        docker.list_images(),
        docker.list_volumes(),
        docker.list_networks(),
        cache,
        docker.list_plugins(),
    );
    let mut complete = true;
    let mut count = |r: Result<usize, DockerError>| match r {
        Ok(n) => n,
        Err(e) => {
            errors.push(&e);
            complete = false;
            0
        }
    };
    let counts = Counts {
        containers: count(c.map(|l| l.len())),
        images: count(i.map(|l| l.len())),
        volumes: count(v.map(|l| l.len())),
        networks: count(n.map(|l| l.iter().filter(|n| !n.is_default()).count())),
        build_cache: count(b),
        plugins: count(p.map(|l| l.len())),
    };
    (counts, complete)
}

/// What a daemon holds that a fresh one would not: containers, images,
/// volumes and networks of its own (build cache and plugins come with an
/// image or a container anyway). A host whose past nobody vouches for must
/// show all zero before it serves anyone.
pub async fn holdings<D: DockerOps>(docker: &D) -> Result<Counts, DockerError> {
    let (c, i, v, n) = tokio::join!(
        docker.list_containers(),
        docker.list_images(),
        docker.list_volumes(),
        docker.list_networks(),
    );
    Ok(Counts {
        containers: c?.len(),
        images: i?.len(),
        volumes: v?.len(),
        networks: n?.iter().filter(|n| !n.is_default()).count(),
        ..Counts::default()
    })
}

/// Runs `op` on every item, [`WIPE_CONCURRENCY`] at a time; "not found"
/// counts as done (a removal elsewhere got there first).
async fn remove_all<'a, D, F, Fut>(docker: &'a D, items: Vec<String>, op: F) -> Vec<DockerError>
where
    D: DockerOps,
    F: Fn(&'a D, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), DockerError>> + 'a,
{
    remove_bounded(docker, items, op, WIPE_CONCURRENCY).await
}

async fn remove_bounded<'a, D, F, Fut>(
    docker: &'a D,
    items: Vec<String>,
    op: F,
    concurrency: usize,
) -> Vec<DockerError>
where
    D: DockerOps,
    F: Fn(&'a D, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), DockerError>> + 'a,
{
    stream::iter(items)
        .map(|item| op(docker, item))
        .buffer_unordered(concurrency)
        .filter_map(|r| async move {
            match r {
                Ok(()) | Err(DockerError::NotFound { .. }) => None,
                Err(e) => Some(e),
            }
        })
        .collect()
        .await
}

async fn remove_images<D: DockerOps>(docker: &D, errors: &mut Errors) {
    let mut last: Vec<DockerError> = vec![];
    for _ in 0..IMAGE_PASSES {
        let ids = match docker.list_images().await {
            Ok(ids) if ids.is_empty() => return,
            Ok(ids) => ids,
            Err(e) => {
                errors.push(&e);
                return;
            }
        };
        let before: HashSet<String> = ids.iter().cloned().collect();
        last = remove_all(
            docker,
            ids,
            |d, id| async move { d.remove_image(&id).await },
        )
        .await;
        // Conflicts (parent before child) are expected and retried; give up
        // early only if a pass made no progress at all.
        let after = docker.list_images().await.unwrap_or_default();
        if after.iter().all(|id| before.contains(id)) && after.len() == before.len() {
            break;
        }
    }
    for e in &last {
        errors.push(e);
    }
}

/// Wipes everything and verifies. Never fails: failures show up in the
/// report (`verified == false`, `error`, counts left).
pub async fn wipe<D: DockerOps>(docker: &D, lease_id: &str) -> WipeReport {
    let started = Instant::now();
    let mut errors = Errors::default();
    let (before, _) = census(docker, &mut errors, false).await;

    // Out of any swarm first: a swarm manager would start its services'
    // tasks again as fast as their containers are removed.
    let mut swarm_left = false;
    match docker.swarm_state().await {
        Ok(SwarmState::Inactive) => {}
        Ok(SwarmState::Member(state)) => {
            tracing::info!(%state, "the daemon is in a swarm; leaving it");
            match docker.leave_swarm().await {
                Ok(()) => swarm_left = true,
                Err(e) => errors.push(&e),
            }
        }
        Err(e) => errors.push(&e),
    }

    // Containers next: they hold images, volumes and networks in use.
    match docker.list_containers().await {
        Ok(ids) => {
            for e in remove_bounded(
                docker,
                ids,
                |d, id| async move { d.remove_container(&id).await },
                CONTAINER_CONCURRENCY,
            )
            .await
            {
                errors.push(&e);
            }
        }
        Err(e) => errors.push(&e),
    }

    // The rest is independent once no container is left: one prune per
    // kind, then one by one whatever it left.
    let mut image_errors = Errors::default();
    let images = async {
        let pruned = docker.prune_images().await.err();
        remove_images(docker, &mut image_errors).await;
        pruned
    };
    let volumes = async {
        let mut errs: Vec<DockerError> = docker.prune_volumes().await.err().into_iter().collect();
        let mut last = vec![];
        for pass in 0..LEFTOVER_PASSES {
            let names = match docker.list_volumes().await {
                Ok(n) if n.is_empty() => break,
                Ok(n) => n,
                Err(e) => {
                    last = vec![e];
                    break;
                }
            };
            if pass > 0 {
                tokio::time::sleep(LEFTOVER_PAUSE).await;
            }
            last = remove_all(
                docker,
                names,
                |d, n| async move { d.remove_volume(&n).await },
            )
            .await;
            if last.is_empty() {
                break;
            }
        }
        errs.append(&mut last);
        errs
    };
    let networks = async {
        let mut errs: Vec<DockerError> = docker.prune_networks().await.err().into_iter().collect();
        let mut last = vec![];
        for pass in 0..LEFTOVER_PASSES {
            let ids: Vec<String> = match docker.list_networks().await {
                Ok(nets) => nets
                    .into_iter()
                    .filter(|n| !n.is_default())
                    .map(|n| n.id)
                    .collect(),
                Err(e) => {
                    last = vec![e];
                    break;
                }
            };
            if ids.is_empty() {
                break;
            }
            if pass > 0 {
                tokio::time::sleep(LEFTOVER_PAUSE).await;
            }
            last = remove_all(
                docker,
                ids,
                |d, id| async move { d.remove_network(&id).await },
            )
            .await;
            if last.is_empty() {
                break;
            }
        }
        errs.append(&mut last);
        errs
    };
    let plugins = async {
        match docker.list_plugins().await {
            Ok(names) => {
                remove_all(
                    docker,
                    names,
                    |d, n| async move { d.remove_plugin(&n).await },
                )
                .await
            }
            Err(e) => vec![e],
        }
    };
    let (image_prune_error, volume_errors, network_errors, plugin_errors, pruned) = tokio::join!(
        images,
        volumes,
        networks,
        plugins,
        docker.prune_build_cache(),
    );
    for e in image_prune_error
        .iter()
        .chain(&volume_errors)
        .chain(&network_errors)
        .chain(&plugin_errors)
    {
        errors.push(e);
    }
    errors.messages.extend(image_errors.messages);
    errors.more += image_errors.more;
    let reclaimed = match pruned {
        Ok(bytes) => bytes,
        Err(e) => {
            errors.push(&e);
            0
        }
    };

    // Verification: look again, from scratch.
    let mut verify_errors = Errors::default();
    let (left, complete) = census(docker, &mut verify_errors, true).await;
    let swarm_after = match docker.swarm_state().await {
        Ok(s) => Some(s),
        Err(e) => {
            verify_errors.push(&e);
            None
        }
    };
    let listeners = match docker.stray_listeners().await {
        Ok(l) => Some(l),
        Err(e) => {
            verify_errors.push(&e);
            None
        }
    };
    for m in verify_errors.messages {
        errors.messages.push(format!("verify: {m}"));
    }
    if let Some(SwarmState::Member(state)) = &swarm_after {
        errors
            .messages
            .push(format!("verify: the daemon is still in a swarm ({state})"));
    }
    if let Some(l) = listeners.as_ref().filter(|l| !l.is_empty()) {
        errors.messages.push(format!(
            "verify: TCP listeners left in the host's namespace: {l:?}"
        ));
    }
    let verified = complete
        && left.is_zero()
        && swarm_after == Some(SwarmState::Inactive)
        && listeners.as_ref().is_some_and(Vec::is_empty);
    if verified && !errors.messages.is_empty() {
        // Errors that the verification shows did no harm (e.g. a container
        // that exited and was auto-removed mid-wipe) are not worth a host.
        tracing::debug!(errors = %errors.render(), "wipe verified despite call errors");
    }

    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    WipeReport {
        lease_id: lease_id.to_owned(),
        verified,
        containers_removed: n(before.containers.saturating_sub(left.containers)),
        images_removed: n(before.images.saturating_sub(left.images)),
        volumes_removed: n(before.volumes.saturating_sub(left.volumes)),
        networks_removed: n(before.networks.saturating_sub(left.networks)),
        build_cache_reclaimed_bytes: reclaimed,
        containers_left: n(left.containers),
        images_left: n(left.images),
        volumes_left: n(left.volumes),
        networks_left: n(left.networks),
        build_cache_left: n(left.build_cache),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        error: if verified {
            String::new()
        } else {
            errors.render()
        },
        plugins_removed: n(before.plugins.saturating_sub(left.plugins)),
        plugins_left: n(left.plugins),
        swarm_left,
        swarm_state_after: swarm_after
            .map(|s| s.name().to_owned())
            .unwrap_or_else(|| "unknown".into()),
        listeners_left: listeners
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect(),
        method: crate::docker::reset::METHOD_API.to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory dockerd for wipe and driver tests.

    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::docker::client::{DockerError, DockerOps, NetworkRef, SwarmState};

    #[derive(Default)]
    pub struct State {
        pub containers: BTreeSet<String>,
        /// image id -> parent id (children must go first, like dockerd).
        pub images: BTreeMap<String, Option<String>>,
        pub volumes: BTreeSet<String>,
        /// Volumes a container still uses: removing them conflicts.
        pub volumes_in_use: BTreeMap<String, String>,
        pub networks: BTreeMap<String, String>,
        pub build_cache: usize,
        /// Images that refuse to go (a stuck dockerd).
        pub sticky_images: BTreeSet<String>,
        pub fail_listing_volumes: bool,
        /// Networks still "in use" for one more removal attempt (dockerd
        /// releasing a removed container's endpoint late); prune skips them.
        pub busy_once: BTreeSet<String>,
        /// `Some(state)` while the daemon is in a swarm.
        pub swarm: Option<String>,
        /// While in a swarm, removed containers of services come back.
        pub swarm_tasks: BTreeSet<String>,
        pub plugins: BTreeSet<String>,
        /// TCP listeners no container holds (a process left behind).
        pub strays: Vec<std::net::SocketAddr>,
    }

    #[derive(Default)]
    pub struct FakeDocker {
        pub state: Mutex<State>,
        pub in_flight: AtomicUsize,
        pub max_in_flight: AtomicUsize,
        pub calls: AtomicUsize,
    }

    impl FakeDocker {
        /// A host after a typical build: containers, a chain of images,
        /// volumes (one used by a container), user networks, build cache.
        pub fn busy() -> Self {
            let d = FakeDocker::default();
            {
                let mut s = d.state.lock().unwrap();
                for i in 0..20 {
                    s.containers.insert(format!("c{i}"));
                }
                s.images.insert("base".into(), None);
                s.images.insert("mid".into(), Some("base".into()));
                s.images.insert("top".into(), Some("mid".into()));
                s.images.insert("other".into(), None);
                s.volumes.insert("v1".into());
                s.volumes.insert("v2".into());
                s.volumes_in_use.insert("v1".into(), "c3".into());
                for (id, name) in [
                    ("n0", "bridge"),
                    ("n1", "host"),
                    ("n2", "none"),
                    ("n3", "app"),
                    ("n4", "db"),
                ] {
                    s.networks.insert(id.into(), name.into());
                }
                s.build_cache = 3;
            }
            d
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }

        async fn op<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            // Yield so that concurrent calls really overlap.
            tokio::task::yield_now().await;
            let r = f(&mut self.lock());
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            r
        }
    }

    fn nf(op: &'static str, target: &str) -> DockerError {
        DockerError::NotFound {
            op,
            target: target.into(),
        }
    }

    fn conflict(op: &'static str, target: &str, message: &str) -> DockerError {
        DockerError::Conflict {
            op,
            target: target.into(),
            message: message.into(),
        }
    }

    impl DockerOps for FakeDocker {
        async fn list_containers(&self) -> Result<Vec<String>, DockerError> {
            self.op(|s| Ok(s.containers.iter().cloned().collect()))
                .await
        }
        async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
            self.op(|s| {
                if !s.containers.remove(id) {
                    return Err(nf("remove container", id));
                }
                s.volumes_in_use.retain(|_, c| c != id);
                // A swarm manager starts a service's task again.
                if s.swarm.is_some() && s.swarm_tasks.contains(id) {
                    s.containers.insert(id.to_owned());
                }
                Ok(())
            })
            .await
        }
        async fn list_images(&self) -> Result<Vec<String>, DockerError> {
            self.op(|s| Ok(s.images.keys().cloned().collect())).await
        }
        async fn remove_image(&self, id: &str) -> Result<(), DockerError> {
            self.op(|s| {
                if s.sticky_images.contains(id) {
                    return Err(conflict("remove image", id, "stuck"));
                }
                if !s.images.contains_key(id) {
                    return Err(nf("remove image", id));
                }
                if s.images.values().any(|p| p.as_deref() == Some(id)) {
                    return Err(conflict(
                        "remove image",
                        id,
                        "image has dependent child images",
                    ));
                }
                s.images.remove(id);
                Ok(())
            })
            .await
        }
        async fn list_volumes(&self) -> Result<Vec<String>, DockerError> {
            self.op(|s| {
                if s.fail_listing_volumes {
                    return Err(DockerError::Timeout {
                        op: "list volumes",
                        target: String::new(),
                        timeout: std::time::Duration::from_secs(1),
                    });
                }
                Ok(s.volumes.iter().cloned().collect())
            })
            .await
        }
        async fn remove_volume(&self, name: &str) -> Result<(), DockerError> {
            self.op(|s| {
                if s.volumes_in_use.contains_key(name) {
                    return Err(conflict("remove volume", name, "volume is in use"));
                }
                if s.volumes.remove(name) {
                    Ok(())
                } else {
                    Err(nf("remove volume", name))
                }
            })
            .await
        }
        async fn list_networks(&self) -> Result<Vec<NetworkRef>, DockerError> {
            self.op(|s| {
                Ok(s.networks
                    .iter()
                    .map(|(id, name)| NetworkRef {
                        id: id.clone(),
                        name: name.clone(),
                    })
                    .collect())
            })
            .await
        }
        async fn remove_network(&self, id: &str) -> Result<(), DockerError> {
            self.op(|s| match s.networks.get(id).map(String::as_str) {
                _ if s.busy_once.remove(id) => {
                    Err(conflict("remove network", id, "has active endpoints"))
                }
                None => Err(nf("remove network", id)),
                Some("bridge" | "host" | "none") => {
                    Err(conflict("remove network", id, "predefined"))
                }
                Some(_) => {
                    s.networks.remove(id);
                    Ok(())
                }
            })
            .await
        }
        async fn prune_images(&self) -> Result<usize, DockerError> {
            self.op(|s| {
                // Like dockerd: every image that is not stuck and not the
                // parent of one that stays.
                let keep: std::collections::BTreeSet<String> = s
                    .sticky_images
                    .iter()
                    .flat_map(|id| {
                        let mut chain = vec![id.clone()];
                        let mut cur = s.images.get(id).cloned().flatten();
                        while let Some(p) = cur {
                            chain.push(p.clone());
                            cur = s.images.get(&p).cloned().flatten();
                        }
                        chain
                    })
                    .collect();
                let before = s.images.len();
                s.images.retain(|id, _| keep.contains(id));
                Ok(before - s.images.len())
            })
            .await
        }
        async fn prune_volumes(&self) -> Result<usize, DockerError> {
            self.op(|s| {
                let before = s.volumes.len();
                let used: BTreeSet<String> = s.volumes_in_use.keys().cloned().collect();
                s.volumes.retain(|v| used.contains(v));
                Ok(before - s.volumes.len())
            })
            .await
        }
        async fn prune_networks(&self) -> Result<usize, DockerError> {
            self.op(|s| {
                let before = s.networks.len();
                let busy = s.busy_once.clone();
                s.networks.retain(|id, name| {
                    busy.contains(id) || ["bridge", "host", "none"].contains(&name.as_str())
                });
                Ok(before - s.networks.len())
            })
            .await
        }
        async fn prune_build_cache(&self) -> Result<u64, DockerError> {
            self.op(|s| {
                let n = s.build_cache as u64;
                s.build_cache = 0;
                Ok(n * 1000)
            })
            .await
        }
        async fn count_build_cache(&self) -> Result<usize, DockerError> {
            self.op(|s| Ok(s.build_cache)).await
        }
        async fn swarm_state(&self) -> Result<SwarmState, DockerError> {
            self.op(|s| {
                Ok(match &s.swarm {
                    None => SwarmState::Inactive,
                    Some(state) => SwarmState::Member(state.clone()),
                })
            })
            .await
        }
        async fn leave_swarm(&self) -> Result<(), DockerError> {
            self.op(|s| {
                s.swarm = None;
                s.swarm_tasks.clear();
                Ok(())
            })
            .await
        }
        async fn list_plugins(&self) -> Result<Vec<String>, DockerError> {
            self.op(|s| Ok(s.plugins.iter().cloned().collect())).await
        }
        async fn remove_plugin(&self, name: &str) -> Result<(), DockerError> {
            self.op(|s| {
                if s.plugins.remove(name) {
                    Ok(())
                } else {
                    Err(nf("remove plugin", name))
                }
            })
            .await
        }
        async fn stray_listeners(&self) -> Result<Vec<std::net::SocketAddr>, DockerError> {
            self.op(|s| Ok(s.strays.clone())).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeDocker;
    use super::*;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn wipes_everything_and_verifies() {
        let d = FakeDocker::busy();
        let r = wipe(&d, "l1").await;
        assert!(r.verified, "{r:?}");
        assert_eq!(r.lease_id, "l1");
        assert_eq!(
            (
                r.containers_removed,
                r.images_removed,
                r.volumes_removed,
                r.networks_removed
            ),
            (20, 4, 2, 2)
        );
        assert_eq!(r.build_cache_reclaimed_bytes, 3000);
        assert_eq!(
            (
                r.containers_left,
                r.images_left,
                r.volumes_left,
                r.networks_left,
                r.build_cache_left
            ),
            (0, 0, 0, 0, 0)
        );
        assert!(r.error.is_empty());
        let s = d.state.lock().unwrap();
        assert!(s.containers.is_empty() && s.images.is_empty() && s.volumes.is_empty());
        assert_eq!(s.networks.len(), 3, "default networks stay");
    }

    #[tokio::test]
    async fn removals_run_concurrently_but_bounded() {
        let d = FakeDocker::busy();
        wipe(&d, "l1").await;
        let max = d.max_in_flight.load(Ordering::SeqCst);
        assert!(max > 1, "removals should overlap, max in flight {max}");
        // Containers at most CONTAINER_CONCURRENCY; then per kind at most
        // WIPE_CONCURRENCY, images, volumes, networks and the build cache
        // prune side by side.
        assert!(
            max <= CONTAINER_CONCURRENCY.max(3 * WIPE_CONCURRENCY + 1),
            "max in flight {max}"
        );
    }

    #[tokio::test]
    async fn leftovers_fail_verification_and_are_reported() {
        let d = FakeDocker::busy();
        d.state.lock().unwrap().sticky_images.insert("other".into());
        let r = wipe(&d, "l1").await;
        assert!(!r.verified);
        assert_eq!(r.images_left, 1);
        assert_eq!(r.images_removed, 3);
        assert!(r.error.contains("stuck"), "{}", r.error);
    }

    #[tokio::test]
    async fn failed_listing_during_verification_is_not_verified() {
        let d = FakeDocker::busy();
        d.state.lock().unwrap().fail_listing_volumes = true;
        let r = wipe(&d, "l1").await;
        assert!(!r.verified);
        assert!(
            r.error.contains("verify: docker list volumes"),
            "{}",
            r.error
        );
    }

    #[tokio::test]
    async fn a_network_released_late_is_removed_on_a_later_pass() {
        let d = FakeDocker::busy();
        d.state.lock().unwrap().busy_once.insert("n3".into());
        let r = wipe(&d, "l1").await;
        assert!(r.verified, "{r:?}");
        assert_eq!((r.networks_removed, r.networks_left), (2, 0));
    }

    #[tokio::test]
    async fn empty_host_is_verified_with_nothing_removed() {
        let d = FakeDocker::default();
        let r = wipe(&d, "l1").await;
        assert!(r.verified);
        assert_eq!(
            r.containers_removed + r.images_removed + r.volumes_removed + r.networks_removed,
            0
        );
    }

    #[tokio::test]
    async fn a_swarm_is_left_before_its_tasks_are_removed_and_plugins_go() {
        let d = FakeDocker::busy();
        {
            let mut s = d.state.lock().unwrap();
            s.swarm = Some("active".into());
            s.containers.insert("svc.1".into());
            s.swarm_tasks.insert("svc.1".into());
            s.plugins.insert("evil/volume-driver:latest".into());
        }
        let r = wipe(&d, "l1").await;
        assert!(r.verified, "{r:?}");
        assert!(r.swarm_left);
        assert_eq!(r.swarm_state_after, "inactive");
        assert_eq!((r.containers_removed, r.containers_left), (21, 0));
        assert_eq!((r.plugins_removed, r.plugins_left), (1, 0));
        assert!(r.listeners_left.is_empty());
    }

    #[tokio::test]
    async fn a_listener_left_in_the_namespace_fails_verification() {
        let d = FakeDocker::busy();
        d.state.lock().unwrap().strays = vec!["0.0.0.0:2377".parse().unwrap()];
        let r = wipe(&d, "l1").await;
        assert!(!r.verified);
        assert_eq!(r.listeners_left, vec!["0.0.0.0:2377".to_owned()]);
        assert!(r.error.contains("TCP listeners left"), "{}", r.error);
        // Everything else was still removed.
        assert_eq!(r.containers_left + r.images_left + r.volumes_left, 0);
    }
}
