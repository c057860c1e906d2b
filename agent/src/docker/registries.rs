//! The registries a host's dockerd knows before any build names one: the
//! pool's pull-through mirror for Docker Hub (`registry-mirrors` in the
//! host's `daemon.json`), and the pool's own registries (the mirror, the
//! tenants' build cache) whose TLS certificates the pool CA issued.
//!
//! dockerd trusts a registry's CA through `/etc/docker/certs.d/HOST:PORT/
//! ca.crt` and has no flag to move that directory. Each host's dockerd runs
//! in a mount namespace of its own ([`mountns`](crate::docker::mountns)),
//! where the host's `HOST_DIR/etc-docker` is bound over `/etc/docker`: the
//! certificates written here are seen by that dockerd alone, the machine's
//! `/etc/docker` (and whatever client certificates an operator keeps
//! there) is out of its sight, and the directory goes with the host.
//!
//! Nothing here is a secret: the mirror needs no credentials from a host
//! (the upstream's stay with the mirror), and a lease's build-cache
//! credentials live on the CI machine, never on the host.

use std::path::{Path, PathBuf};

/// The file dockerd reads a registry's CA from, inside `certs.d/HOST:PORT/`.
pub const CA_FILE: &str = "ca.crt";

/// What is wrong with a registry setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error(
        "registry mirror {0:?} must be https://HOST[:PORT] (TLS only, no path, no credentials)"
    )]
    BadMirror(String),
    #[error("pool registry {0:?} must be HOST:PORT (an IP address or DNS name, and a port)")]
    BadRegistry(String),
    #[error("{0} needs --registry-ca: the pool's registries are trusted through the pool CA")]
    NoCa(&'static str),
}

/// The host's registry settings, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    /// `registry-mirrors` for Docker Hub, as `https://HOST[:PORT]`.
    pub mirrors: Vec<String>,
    /// `HOST:PORT` of every registry trusted through [`Registries::ca_pem`]:
    /// the mirrors' and the extra ones named.
    pub trusted: Vec<String>,
    /// The CA (PEM) the pool's registries' certificates chain to.
    pub ca_pem: Option<String>,
}

impl Registries {
    /// Checks `mirrors` (`https://HOST[:PORT]`) and `extra` (`HOST:PORT`):
    /// both end up in dockerd's configuration and in directory names.
    pub fn new(
        mirrors: &[String],
        extra: &[String],
        ca_pem: Option<String>,
    ) -> Result<Self, RegistryError> {
        let mut trusted: Vec<String> = vec![];
        let mut checked_mirrors = vec![];
        for m in mirrors {
            let host_port =
                mirror_host_port(m).ok_or_else(|| RegistryError::BadMirror(m.clone()))?;
            checked_mirrors.push(format!("https://{host_port}"));
            if !trusted.contains(&host_port) {
                trusted.push(host_port);
            }
        }
        for r in extra {
            if !valid_host_port(r) {
                return Err(RegistryError::BadRegistry(r.clone()));
            }
            if !trusted.contains(r) {
                trusted.push(r.clone());
            }
        }
        if ca_pem.is_none() && !extra.is_empty() {
            return Err(RegistryError::NoCa("--pool-registry"));
        }
        Ok(Self {
            mirrors: checked_mirrors,
            trusted,
            ca_pem,
        })
    }

    /// The host's `daemon.json`: the mirrors, nothing else (an empty object
    /// still keeps a machine-wide `/etc/docker/daemon.json` out).
    pub fn daemon_json(&self) -> String {
        let mut doc = serde_json::Map::new();
        if !self.mirrors.is_empty() {
            doc.insert("registry-mirrors".to_owned(), self.mirrors.clone().into());
        }
        let mut out = serde_json::Value::Object(doc).to_string();
        out.push('\n');
        out
    }

    /// Writes `etc_docker/certs.d/HOST:PORT/ca.crt` for every trusted
    /// registry (with a CA); `etc_docker` itself is made if missing.
    pub fn write_certs(&self, etc_docker: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(etc_docker)?;
        let Some(ca) = &self.ca_pem else {
            return Ok(());
        };
        for host_port in &self.trusted {
            let dir = certs_dir(etc_docker, host_port);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(CA_FILE), ca)?;
        }
        Ok(())
    }
}

/// `etc_docker/certs.d/HOST:PORT`.
pub fn certs_dir(etc_docker: &Path, host_port: &str) -> PathBuf {
    etc_docker.join("certs.d").join(host_port)
}

/// `HOST:PORT` of `https://HOST[:PORT][/]`, with the port made explicit
/// (dockerd looks certificates up under the URL's host as written, so the
/// mirror is named with its port everywhere).
fn mirror_host_port(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let host_port = if valid_host_port(rest) {
        rest.to_owned()
    } else if valid_host(rest) {
        format!("{rest}:443")
    } else {
        return None;
    };
    Some(host_port)
}

/// `HOST:PORT`: an IPv4 address or DNS name, and a port 1..=65535.
/// (IPv6 literals are not accepted: certs.d names them without brackets on
/// some versions and with on others.)
pub fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    valid_host(host)
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_and_registries_are_checked() {
        let r = Registries::new(
            &[
                "https://198.18.0.1:5000".into(),
                "https://mirror.internal/".into(),
            ],
            &["198.18.0.1:5001".into()],
            Some("PEM".into()),
        )
        .unwrap();
        assert_eq!(
            r.mirrors,
            ["https://198.18.0.1:5000", "https://mirror.internal:443"]
        );
        assert_eq!(
            r.trusted,
            ["198.18.0.1:5000", "mirror.internal:443", "198.18.0.1:5001"]
        );
        for bad in [
            "http://198.18.0.1:5000",
            "https://198.18.0.1:5000/v2",
            "https://u:p@host:5000",
            "https://../x:5000",
            "https://host:0",
            "https://host:99999",
            "https://",
            "198.18.0.1:5000",
        ] {
            assert_eq!(
                Registries::new(&[bad.into()], &[], None),
                Err(RegistryError::BadMirror(bad.into())),
                "{bad}"
            );
        }
        for bad in [
            "host",
            "host:",
            ":5000",
            "a/b:1",
            "..:1",
            "[::1]:5000",
            "h:5x",
        ] {
            assert_eq!(
                Registries::new(&[], &[bad.into()], Some("PEM".into())),
                Err(RegistryError::BadRegistry(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            Registries::new(&[], &["h:1".into()], None),
            Err(RegistryError::NoCa("--pool-registry"))
        );
    }

    #[test]
    fn daemon_json_names_only_the_mirrors() {
        assert_eq!(Registries::default().daemon_json(), "{}\n");
        let r = Registries::new(&["https://10.0.0.5:5000".into()], &[], None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.daemon_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"registry-mirrors": ["https://10.0.0.5:5000"]})
        );
        assert!(!r.daemon_json().contains("hosts"));
    }

    #[test]
    fn certificates_land_in_certs_d() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc-docker");
        let r = Registries::new(
            &["https://10.0.0.5:5000".into()],
            &["10.0.0.5:5001".into()],
            Some("CA PEM".into()),
        )
        .unwrap();
        r.write_certs(&etc).unwrap();
        for hp in ["10.0.0.5:5000", "10.0.0.5:5001"] {
            let f = etc.join("certs.d").join(hp).join(CA_FILE);
            assert_eq!(std::fs::read_to_string(f).unwrap(), "CA PEM");
        }
        // Without a CA only the directory dockerd's /etc/docker is bound to.
        let bare = dir.path().join("bare");
        Registries::default().write_certs(&bare).unwrap();
        assert!(bare.is_dir());
        assert!(!bare.join("certs.d").exists());
    }
}
