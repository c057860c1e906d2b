//! A pool's credentials on disk, laid out the same way by `berth up`, the
//! EC2 test world and the benchmarks: the tenants file (one admin tenant
//! whose token is kept beside it for the CLI), the join token the agents
//! present and its SHA-256, which is all the coordinator keeps of it.
//!
//! ```text
//! STATE_DIR/tenants             NAME SHA256 [admin] per line   (coordinator --tenants)
//! STATE_DIR/join-token          the join token                 (agent --join-token-file)
//! STATE_DIR/join-token.sha256   its hash                       (coordinator --join-token-hash-file)
//! STATE_DIR/cli/token           the admin tenant's token       (berth --token-file)
//! STATE_DIR/cli/ca.pem          the pool CA, for the CLI       (berth --ca; copied by berth up)
//! ```

use std::path::{Path, PathBuf};

use crate::{Tenants, TlsError, TokenHash, files, token};

/// Where a pool's credentials live under its state dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCredentials {
    pub tenants: PathBuf,
    pub join_token: PathBuf,
    pub join_token_hash: PathBuf,
    pub cli_dir: PathBuf,
    pub cli_token: PathBuf,
    pub cli_ca: PathBuf,
}

impl PoolCredentials {
    /// The paths, whether or not the files exist yet.
    pub fn paths(state_dir: &Path) -> Self {
        let cli_dir = state_dir.join("cli");
        Self {
            tenants: state_dir.join("tenants"),
            join_token: state_dir.join("join-token"),
            join_token_hash: state_dir.join("join-token.sha256"),
            cli_token: cli_dir.join("token"),
            cli_ca: cli_dir.join("ca.pem"),
            cli_dir,
        }
    }

    /// Creates what is missing, every secret 0600 and `cli/` 0700. Tokens
    /// made by an earlier run are kept, so a CLI set up once keeps working
    /// across restarts; the `admin` tenant's line is rewritten and every
    /// other tenant an operator added to the file stays.
    pub fn ensure(state_dir: &Path, admin: &str) -> Result<Self, TlsError> {
        let c = Self::paths(state_dir);
        files::create_private_dir(&c.cli_dir)?;
        let cli_token = read_or_make(&c.cli_token)?;
        let mut tenants = Tenants::line(admin, &cli_token, true);
        if let Ok(old) = std::fs::read_to_string(&c.tenants) {
            for line in old.lines() {
                if line.split_whitespace().next() != Some(admin) && !line.trim().is_empty() {
                    tenants.push_str(line);
                    tenants.push('\n');
                }
            }
        }
        files::write_private(&c.tenants, tenants.as_bytes())?;
        let join = read_or_make(&c.join_token)?;
        let hash = TokenHash::of(&join).to_hex();
        files::write_private(&c.join_token_hash, format!("{hash}\n").as_bytes())?;
        Ok(c)
    }

    /// The admin tenant's token (what the CLI sends).
    pub fn admin_token(&self) -> Result<String, TlsError> {
        files::read_secret(&self.cli_token)
    }

    /// The pool join token (what agents send).
    pub fn join_token(&self) -> Result<String, TlsError> {
        files::read_secret(&self.join_token)
    }
}

/// The token in `path`, or a new one written there.
fn read_or_make(path: &Path) -> Result<String, TlsError> {
    match files::read_secret(path) {
        Ok(t) => Ok(t),
        Err(_) => {
            let t = token::generate();
            files::write_private(path, format!("{t}\n").as_bytes())?;
            Ok(t)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn credentials_are_made_once_kept_and_private() {
        let dir = std::env::temp_dir().join(format!("berth-tls-pool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let c = PoolCredentials::ensure(&dir, "local").unwrap();
        let (admin, join) = (c.admin_token().unwrap(), c.join_token().unwrap());
        // An operator adds a tenant; a second start keeps it and both tokens.
        let mut t = std::fs::read_to_string(&c.tenants).unwrap();
        t.push_str(&Tenants::line("team-a", &token::generate(), false));
        std::fs::write(&c.tenants, t).unwrap();
        let again = PoolCredentials::ensure(&dir, "local").unwrap();
        assert_eq!(again, c);
        assert_eq!(again.admin_token().unwrap(), admin);
        assert_eq!(again.join_token().unwrap(), join);
        let tenants = Tenants::parse(&std::fs::read_to_string(&c.tenants).unwrap()).unwrap();
        assert!(
            tenants
                .authenticate(&admin)
                .is_some_and(|t| t.admin && t.name == "local")
        );
        assert_eq!(tenants.len(), 2);
        let hash = std::fs::read_to_string(&c.join_token_hash).unwrap();
        assert_eq!(hash.trim(), TokenHash::of(&join).to_hex());
        for p in [&c.tenants, &c.join_token, &c.join_token_hash, &c.cli_token] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let mode = std::fs::metadata(&c.cli_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
