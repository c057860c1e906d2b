//! Everything that touches the host's Docker: [`daemon`] is the seam the
//! assembly boots or adopts the daemon through, [`dockerd`] starts the
//! daemon (in a mount namespace of its own, [`mountns`], where
//! `/var/run/docker.sock` is the host's dockerd), [`client`] is the Docker
//! API behind the `DockerOps` trait,
//! [`front`] is the mutual-TLS front that admits only the current lease,
//! [`wipe`] removes and verifies all Docker state through the API, [`reset`]
//! empties the host faster by replacing dockerd on an empty data root,
//! [`listeners`] checks that dockerd listens on no TCP port, [`health`]
//! watches the daemon, and [`registries`] is what the daemon is told about
//! the pool's registry mirror and registries.

pub mod client;
pub mod daemon;
pub mod dockerd;
pub mod front;
pub mod health;
pub mod listeners;
pub mod mountns;
pub mod registries;
pub mod reset;
pub mod wipe;
