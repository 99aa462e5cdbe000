//! Everything on the Redis side of the proxy: connections to backends (`link`).
//! Role probing and the topology store grow here.

pub mod link;

pub use link::{BackendError, BackendLink, Handshake};
