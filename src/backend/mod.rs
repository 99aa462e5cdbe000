//! Everything on the Redis side of the proxy: connections to backends (`link`), role
//! probers (`prober`) and the topology store with the confirmed-master decision
//! (`topology`).

pub mod link;
pub mod prober;
pub mod sentinel;
pub mod topology;

pub use link::{BackendError, BackendLink, Handshake, LinkAuth, ReadReplyError};
pub use topology::{
    BackendState, Bounds, Evidence, Liveness, MasterCache, Role, Standing, Topology, TopologyStore,
};
