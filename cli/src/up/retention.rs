//! Retention of the tenants' build cache: a size cap per tenant and the
//! garbage collection of what no tag holds any more.
//!
//! A tenant's usage is the sum of the distinct blobs (layers, image
//! configs, manifests) its tags reference, read from distribution's
//! filesystem storage (`docker/registry/v2/`: a tag is
//! `repositories/NS/REPO/_manifests/tags/TAG/current/link`, whose content
//! is the manifest's digest and whose modification time is when the tag
//! was last pushed). Above its cap ([`plan`]; its own `cache-cap=SIZE` in
//! the tenants file, else the pool-wide one: [`Caps`]), the tenant's least
//! recently pushed tags go, one at a time, until its usage is within the cap: a tag
//! is removed the way distribution's own tag deletion does, by removing
//! its `_manifests/tags/TAG` directory. Blobs other tenants' tags reference
//! are counted for each of them and stay as long as one does.
//!
//! distribution's garbage collector (`registry garbage-collect
//! --delete-untagged`) then deletes the manifests no tag names and the
//! blobs no manifest references. It is offline: it must not run while the
//! registry accepts pushes (a blob uploaded but not yet referenced would be
//! deleted under the push). So the pass runs with the cache registry
//! stopped: `berth up`'s supervisor stops it, removes the tags, collects,
//! and starts it again (`registries::supervise`). While it is stopped (a
//! few seconds for a small store), builds get no cache and pushes fail;
//! the pass therefore only stops the registry when there is something to
//! reclaim (a tenant above its cap, or manifests no tag names since a tag
//! was pushed again).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where distribution's filesystem driver keeps the registry under its
/// `rootdirectory`.
const V2: &str = "docker/registry/v2";

/// One tag of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// The tenant's namespace (the repository's first component).
    pub namespace: String,
    /// `NS/REPO:TAG`, for logs.
    pub name: String,
    /// `_manifests/tags/TAG`: removing it removes the tag.
    pub dir: PathBuf,
    /// When it was last pushed.
    pub pushed: SystemTime,
    /// The blobs it references (its manifest included), by digest, with
    /// their sizes.
    pub blobs: BTreeMap<String, u64>,
}

/// What a retention pass would do.
#[derive(Debug, Default)]
pub struct Plan {
    /// Each tenant's usage before the pass, in bytes.
    pub usage: BTreeMap<String, u64>,
    /// The tags to remove, oldest first per tenant.
    pub remove: Vec<Tag>,
    /// Manifests no tag names (a tag pushed again leaves its old one).
    pub untagged: usize,
}

impl Plan {
    /// Whether the registry must be stopped and collected.
    pub fn reclaims(&self) -> bool {
        !self.remove.is_empty() || self.untagged > 0
    }
}

/// The blob file of `digest` (`sha256:HEX`).
fn blob_data(root: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(
        root.join(V2)
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data"),
    )
}

/// The blobs a manifest references, itself included; an index's
/// manifests are followed one level down.
fn manifest_blobs(root: &Path, digest: &str, depth: u8, out: &mut BTreeMap<String, u64>) {
    let Some(path) = blob_data(root, digest) else {
        return;
    };
    let Ok(raw) = std::fs::read(&path) else {
        return;
    };
    out.insert(digest.to_owned(), raw.len() as u64);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
        return;
    };
    let mut add = |d: &serde_json::Value| {
        if let (Some(digest), Some(size)) = (d["digest"].as_str(), d["size"].as_u64()) {
            out.insert(digest.to_owned(), size);
        }
    };
    add(&v["config"]);
    for l in v["layers"].as_array().into_iter().flatten() {
        add(l);
    }
    if depth == 0 {
        for m in v["manifests"].as_array().into_iter().flatten() {
            if let Some(d) = m["digest"].as_str() {
                manifest_blobs(root, d, 1, out);
            }
        }
    }
}

/// Repositories under `dir` (a directory holding `_manifests`), as their
/// path below `repositories/`.
fn repositories(dir: &Path, name: &str, out: &mut Vec<(String, PathBuf)>) {
    if dir.join("_manifests").is_dir() {
        out.push((name.to_owned(), dir.to_owned()));
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if file.starts_with('_') || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        repositories(&e.path(), &format!("{name}/{file}"), out);
    }
}

/// Every tag of the store under `root` (distribution's `rootdirectory`),
/// and the number of manifests no tag names.
pub fn scan(root: &Path) -> (Vec<Tag>, usize) {
    let mut tags = vec![];
    let mut untagged = 0;
    let Ok(namespaces) = std::fs::read_dir(root.join(V2).join("repositories")) else {
        return (tags, 0);
    };
    for ns in namespaces.flatten() {
        let namespace = ns.file_name().to_string_lossy().into_owned();
        let mut repos = vec![];
        repositories(&ns.path(), &namespace, &mut repos);
        for (repo, dir) in repos {
            let mut named = BTreeSet::new();
            let tag_dir = dir.join("_manifests/tags");
            for t in std::fs::read_dir(&tag_dir).into_iter().flatten().flatten() {
                let link = t.path().join("current/link");
                let (Ok(digest), Ok(meta)) =
                    (std::fs::read_to_string(&link), std::fs::metadata(&link))
                else {
                    continue;
                };
                let digest = digest.trim().to_owned();
                let mut blobs = BTreeMap::new();
                manifest_blobs(root, &digest, 0, &mut blobs);
                named.extend(blobs.keys().cloned());
                tags.push(Tag {
                    namespace: namespace.clone(),
                    name: format!("{repo}:{}", t.file_name().to_string_lossy()),
                    dir: t.path(),
                    pushed: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    blobs,
                });
            }
            let revisions = dir.join("_manifests/revisions/sha256");
            for r in std::fs::read_dir(&revisions)
                .into_iter()
                .flatten()
                .flatten()
            {
                let digest = format!("sha256:{}", r.file_name().to_string_lossy());
                if !named.contains(&digest) {
                    untagged += 1;
                }
            }
        }
    }
    (tags, untagged)
}

/// The distinct bytes `tags` reference.
fn usage<'a>(tags: impl IntoIterator<Item = &'a Tag>) -> u64 {
    let mut all = BTreeMap::new();
    for t in tags {
        all.extend(t.blobs.iter().map(|(k, v)| (k.as_str(), *v)));
    }
    all.values().sum()
}

/// Each tenant's cap, by namespace.
#[derive(Debug, Clone, Default)]
pub struct Caps {
    /// `--cache-tenant-cap`: for the tenants without their own and the
    /// namespaces no tenant of the file has.
    pub pool_wide: u64,
    /// The tenants' own (`cache-cap=SIZE`), by namespace.
    pub own: BTreeMap<String, u64>,
}

impl Caps {
    /// Every tenant capped at `pool_wide`.
    pub fn uniform(pool_wide: u64) -> Self {
        Caps {
            pool_wide,
            own: BTreeMap::new(),
        }
    }

    /// The caps of the tenants file's `tenants`.
    pub fn of(pool_wide: u64, tenants: &berth_tls::Tenants) -> Self {
        let own = tenants
            .iter()
            .filter_map(|t| {
                let cap = t.limits.cache_cap_or(0);
                (cap > 0).then(|| (berth_tls::cache_namespace(&t.name), cap))
            })
            .collect();
        Caps { pool_wide, own }
    }

    /// The caps of the tenants file at `path`, read now (an edit needs no
    /// restart); the pool-wide cap for every tenant, with a warning, when
    /// it cannot be read.
    pub fn load(pool_wide: u64, path: &Path) -> Self {
        let tenants = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| berth_tls::Tenants::parse(&t).map_err(|e| e.to_string()));
        match tenants {
            Ok(t) => Self::of(pool_wide, &t),
            Err(e) => {
                eprintln!(
                    "berth up: build cache retention: warning: {}: {e}; every tenant gets the pool-wide cap",
                    path.display()
                );
                Self::uniform(pool_wide)
            }
        }
    }

    /// The cap of `namespace`.
    pub fn cap(&self, namespace: &str) -> u64 {
        self.own.get(namespace).copied().unwrap_or(self.pool_wide)
    }
}

/// What a pass over the store under `root` does with each tenant capped
/// as `caps` say.
pub fn plan(root: &Path, caps: &Caps) -> Plan {
    let (tags, untagged) = scan(root);
    let mut by_ns: BTreeMap<String, Vec<Tag>> = BTreeMap::new();
    for t in tags {
        by_ns.entry(t.namespace.clone()).or_default().push(t);
    }
    let mut plan = Plan {
        untagged,
        ..Plan::default()
    };
    for (ns, mut tags) in by_ns {
        let cap = caps.cap(&ns);
        plan.usage.insert(ns, usage(&tags));
        // Oldest last, so the next to go is popped.
        tags.sort_by(|a, b| b.pushed.cmp(&a.pushed).then(b.name.cmp(&a.name)));
        while usage(&tags) > cap {
            let Some(oldest) = tags.pop() else { break };
            plan.remove.push(oldest);
        }
    }
    plan
}

/// Removes the tags of `plan` (the registry must be stopped).
pub fn untag(plan: &Plan) -> Result<(), std::io::Error> {
    for t in &plan.remove {
        std::fs::remove_dir_all(&t.dir)?;
    }
    Ok(())
}

/// Bytes of the files under `dir`.
pub fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_usage(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{Hash, Hasher};

    /// A digest-shaped name for `data` (the pass never checks contents).
    fn digest(data: &[u8]) -> String {
        let mut out = String::from("sha256:");
        for i in 0..4u8 {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (i, data).hash(&mut h);
            out.push_str(&format!("{:016x}", h.finish()));
        }
        out
    }

    fn put_blob(root: &Path, data: &[u8]) -> String {
        let d = digest(data);
        let path = blob_data(root, &d).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
        d
    }

    /// Pushes `repo:tag` with one layer of `layer` bytes; returns the
    /// manifest's digest.
    fn push(root: &Path, repo: &str, tag: &str, layer: &[u8], at: u64) -> String {
        let l = put_blob(root, layer);
        let c = put_blob(root, format!("{{\"tag\":\"{tag}\"}}").as_bytes());
        let m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": c, "size": 12},
            "layers": [{"digest": l, "size": layer.len()}],
        });
        let m = put_blob(root, m.to_string().as_bytes());
        let dir = root
            .join(V2)
            .join("repositories")
            .join(repo)
            .join("_manifests");
        let rev = dir.join("revisions/sha256").join(&m[7..]);
        std::fs::create_dir_all(&rev).unwrap();
        std::fs::write(rev.join("link"), &m).unwrap();
        let cur = dir.join("tags").join(tag).join("current");
        std::fs::create_dir_all(&cur).unwrap();
        let link = cur.join("link");
        std::fs::write(&link, &m).unwrap();
        let f = std::fs::File::options().write(true).open(&link).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(at))
            .unwrap();
        m
    }

    #[test]
    fn a_tenant_over_its_cap_loses_its_oldest_tags_and_no_other_tenant_anything() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let kib = |n: u8| vec![n; 100 * 1024];
        push(root, "teama/app", "t1", &kib(1), 100);
        push(root, "teama/app", "t2", &kib(2), 200);
        push(root, "teama/other/deep", "t3", &kib(3), 300);
        // The same layer as t3: counted once for teama.
        push(root, "teama/app", "t4", &kib(3), 400);
        push(root, "teamb/app", "old", &kib(4), 1);
        let p = plan(root, &Caps::uniform(150 * 1024));
        let removed: Vec<_> = p.remove.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(removed, ["teama/app:t1", "teama/app:t2"]);
        assert!(p.usage["teama"] > 300 * 1024, "{:?}", p.usage);
        assert!(p.usage["teamb"] > 100 * 1024, "{:?}", p.usage);
        assert_eq!(p.untagged, 0);
        assert!(p.reclaims());
        untag(&p).unwrap();
        let (left, untagged) = scan(root);
        let mut left: Vec<_> = left.iter().map(|t| t.name.clone()).collect();
        left.sort();
        assert_eq!(
            left,
            ["teama/app:t4", "teama/other/deep:t3", "teamb/app:old"]
        );
        // t1's and t2's manifests are now untagged: the collector's work.
        assert_eq!(untagged, 2);
        // Nothing over the cap, nothing untagged: nothing to do.
        let p = plan(root, &Caps::uniform(150 * 1024));
        assert!(p.remove.is_empty());
    }

    #[test]
    fn each_tenant_is_held_to_its_own_cap() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let kib = |n: u8| vec![n; 100 * 1024];
        // "small" is given 150 KiB, "Big.Team" 500 KiB, the rest the
        // pool-wide 120 KiB.
        let tenants = berth_tls::Tenants::parse(&format!(
            "small {} cache-cap=150KiB\nBig.Team {} cache-cap=500KiB\nother {} cache-cap=0\n",
            berth_tls::TokenHash::of("s").to_hex(),
            berth_tls::TokenHash::of("b").to_hex(),
            berth_tls::TokenHash::of("o").to_hex(),
        ))
        .unwrap();
        let caps = Caps::of(120 * 1024, &tenants);
        let big = berth_tls::cache_namespace("Big.Team");
        assert_eq!(caps.cap("small"), 150 * 1024);
        assert_eq!(caps.cap(&big), 500 * 1024);
        assert_eq!(caps.cap("other"), 120 * 1024);
        assert_eq!(caps.cap("gone"), 120 * 1024);

        push(root, "small/app", "s1", &kib(1), 100);
        push(root, "small/app", "s2", &kib(2), 200);
        // Bigger than "small" and than the pool-wide cap, under its own.
        push(root, &format!("{big}/app"), "b1", &kib(3), 1);
        push(root, &format!("{big}/app"), "b2", &kib(4), 2);
        push(root, &format!("{big}/app"), "b3", &kib(5), 3);
        push(root, "other/app", "o1", &kib(6), 10);
        push(root, "other/app", "o2", &kib(7), 20);
        let p = plan(root, &caps);
        assert!(p.usage[&big] > 300 * 1024, "{:?}", p.usage);
        assert!(p.usage["small"] > 200 * 1024, "{:?}", p.usage);
        let removed: Vec<_> = p.remove.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(removed, ["other/app:o1", "small/app:s1"]);
        // The same store under the pool-wide cap alone: "Big.Team" too.
        let p = plan(root, &Caps::uniform(120 * 1024));
        assert_eq!(p.remove.len(), 4, "{:?}", p.remove);
        assert!(p.remove.iter().any(|t| t.namespace == big));
    }

    #[test]
    fn a_tag_pushed_again_leaves_an_untagged_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        push(root, "t/app", "cache", b"one", 1);
        let p = plan(root, &Caps::uniform(u64::MAX));
        assert!(!p.reclaims(), "{p:?}");
        push(root, "t/app", "cache", b"two", 2);
        let p = plan(root, &Caps::uniform(u64::MAX));
        assert_eq!(p.untagged, 1);
        assert!(p.remove.is_empty());
        assert!(p.reclaims());
        assert!(disk_usage(root) > 0);
    }
}
