//! The host's life: [`state`] is the host state machine (pure `next`, table
//! tests), [`driver`] carries out its actions (Docker, the front, the
//! provider, the coordinator link), [`statefile`] keeps what a successor
//! agent on the same boot needs to take the host over.

pub mod driver;
pub mod state;
pub mod statefile;
