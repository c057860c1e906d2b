//! What berth's two daemons (`berth-agent`, `berth-coordinator`) share and
//! nothing else needs: telling systemd where they are in their life
//! ([`systemd`]) and the optional TOML configuration file whose keys are the
//! daemons' long flag names ([`config_file`]).
//!
//! Boundaries: no berth logic here; each daemon decides when it is ready
//! and which flags it has.

#![forbid(unsafe_code)]

pub mod config_file;
pub mod systemd;
