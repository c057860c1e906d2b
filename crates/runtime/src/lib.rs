//! What berth's binaries (`berth-agent`, `berth-coordinator`, `berth`) share
//! and nothing else needs: log set-up ([`telemetry`]), signals turned into
//! one shutdown token ([`shutdown`]), jittered backoff ([`backoff`]), error
//! chains ([`error_chain`]), files written whole or not at all ([`fs`]),
//! telling systemd where a daemon is in its life ([`systemd`]), the
//! daemons' plain-HTTP endpoints (`http`, feature `http`) and the
//! optional TOML configuration file whose keys are the long flag names
//! ([`config_file`]) and sizes such as `10GiB` ([`size`]).
//!
//! Boundaries: no berth logic here; each binary decides when it is ready,
//! which flags it has and what its shutdown does.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config_file;
pub mod fs;
#[cfg(feature = "http")]
pub mod http;
pub mod shutdown;
pub mod size;
pub mod systemd;
pub mod telemetry;

/// An error with every cause in its chain, `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        // Many errors repeat their source in their own message.
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
        let e = Repeats(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "wrapped: inner");
    }
}
