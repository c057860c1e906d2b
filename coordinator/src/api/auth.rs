//! Who may call what. CI calls `LeaseService` with a tenant token, operators
//! call `AdminService` with the token of a tenant marked `admin`, agents call
//! `AgentService` with the pool join token; each as `authorization: Bearer
//! TOKEN` metadata, checked by a tonic interceptor before any handler runs.
//! Tokens are compared by hash in constant time and never logged.
//!
//! The tenants file and the join token hash are read once, at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_tls::{Tenants, TokenHash};
use tonic::{Request, Status};

/// Who is calling, as established by the interceptor; handlers find it in
/// the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub admin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0} is required: without it no {1} could ever authenticate")]
    Missing(&'static str, &'static str),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Tenants {
        path: PathBuf,
        source: berth_tls::TlsError,
    },
    #[error("{0}: expected the sha256 of the join token as 64 hex digits")]
    JoinHash(PathBuf),
}

/// The credentials the coordinator accepts.
#[derive(Debug)]
pub struct Auth {
    tenants: Tenants,
    join: TokenHash,
}

impl Auth {
    pub fn new(tenants: Tenants, join: TokenHash) -> Self {
        Self { tenants, join }
    }

    /// Reads the tenants file and the join token hash file.
    pub fn load(tenants: Option<&Path>, join_hash: Option<&Path>) -> Result<Self, AuthError> {
        let tenants = tenants.ok_or(AuthError::Missing("--tenants", "CI build"))?;
        let join_hash = join_hash.ok_or(AuthError::Missing("--join-token-hash-file", "agent"))?;
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| AuthError::Read {
                path: p.to_owned(),
                source,
            })
        };
        Self::parse(&read(tenants)?, tenants, &read(join_hash)?, join_hash)
    }

    /// Parses a tenants file's and a join token hash file's contents;
    /// `tenants_from` and `join_from` name where they came from in errors.
    pub fn parse(
        tenants: &str,
        tenants_from: &Path,
        join_hash: &str,
        join_from: &Path,
    ) -> Result<Self, AuthError> {
        let parsed = Tenants::parse(tenants).map_err(|source| AuthError::Tenants {
            path: tenants_from.to_owned(),
            source,
        })?;
        if parsed.is_empty() {
            tracing::warn!(from = %tenants_from.display(), "the tenants file lists no tenant: every CI call will be refused");
        }
        let join = TokenHash::parse_hex(join_hash)
            .ok_or_else(|| AuthError::JoinHash(join_from.to_owned()))?;
        Ok(Self::new(parsed, join))
    }

    /// Each tenant's share of the pool, from the tenants file.
    pub fn limits(&self) -> std::collections::HashMap<String, berth_tls::TenantLimits> {
        self.tenants
            .iter()
            .map(|t| (t.name.clone(), t.limits))
            .collect()
    }

    fn token<'a>(req: &'a Request<()>, what: &str) -> Result<&'a str, Status> {
        let value = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "missing {what}: send `authorization: Bearer TOKEN`"
                ))
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        berth_tls::token::bearer(value).ok_or_else(|| {
            Status::unauthenticated("the authorization header must be `Bearer TOKEN`")
        })
    }

    fn tenant(&self, req: &Request<()>) -> Result<Caller, Status> {
        let token = Self::token(req, "tenant token")?;
        let t = self
            .tenants
            .authenticate(token)
            .ok_or_else(|| Status::unauthenticated("invalid tenant token"))?;
        Ok(Caller {
            tenant: t.name.clone(),
            admin: t.admin,
        })
    }
}

/// Interceptor of `LeaseService` (any tenant) and `AdminService` (admin
/// tenants only).
#[derive(Debug, Clone)]
pub struct TenantAuth {
    pub auth: Arc<Auth>,
    pub admin_only: bool,
}

impl tonic::service::Interceptor for TenantAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.auth.tenant(&req)?;
        if self.admin_only && !caller.admin {
            return Err(Status::permission_denied(format!(
                "tenant {} may not use the admin API",
                caller.tenant
            )));
        }
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// Interceptor of `AgentService`: the pool join token.
#[derive(Debug, Clone)]
pub struct AgentAuth(pub Arc<Auth>);

impl tonic::service::Interceptor for AgentAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let token = Auth::token(&req, "pool join token")?;
        if !self.0.join.matches(token) {
            tracing::warn!(peer = ?crate::listener::remote_addr(&req), "agent refused: wrong join token");
            return Err(Status::unauthenticated("invalid pool join token"));
        }
        Ok(req)
    }
}

/// The caller a request was admitted as.
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("request was not authenticated"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn auth() -> (Arc<Auth>, String, String, String) {
        let (ci, ops, join) = (
            berth_tls::token::generate(),
            berth_tls::token::generate(),
            berth_tls::token::generate(),
        );
        let text = format!(
            "{}{}",
            Tenants::line("ci", &ci, false),
            Tenants::line("ops", &ops, true)
        );
        let a = Auth::new(Tenants::parse(&text).unwrap(), TokenHash::of(&join));
        (Arc::new(a), ci, ops, join)
    }

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    #[test]
    fn tenants_admins_and_agents() {
        let (a, ci, ops, join) = auth();
        let mut lease = TenantAuth {
            auth: a.clone(),
            admin_only: false,
        };
        let mut admin = TenantAuth {
            auth: a.clone(),
            admin_only: true,
        };
        let mut agent = AgentAuth(a);

        let ok = lease.call(req(Some(&ci))).unwrap();
        assert_eq!(caller(&ok).unwrap().tenant, "ci");
        for bad in [None, Some("berth_nope"), Some(join.as_str())] {
            let e = lease.call(req(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert_eq!(
            admin.call(req(Some(&ci))).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(caller(&admin.call(req(Some(&ops))).unwrap()).unwrap().admin);
        assert!(agent.call(req(Some(&join))).is_ok());
        for bad in [None, Some(ci.as_str())] {
            let e = agent.call(req(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(!e.message().contains(&ci));
        }
        assert!(caller(&Request::new(())).is_err());
    }
}
