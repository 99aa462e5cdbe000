//! Redis Cluster behind one endpoint: the pure decisions (hash slots, the slot map and
//! the choice between nodes' views, the slot of a request and how a multi-shard command
//! splits). I/O (the slot-map refresher, the session's per-node routing) builds on these.

pub mod aggregate;
pub mod keyslot;
pub mod route;
pub mod slotmap;
pub mod store;

pub use keyslot::{key_hash_slot, SLOTS};
pub use route::{request_slot, split_by_slot, KeySlot, SlotPart};
pub use slotmap::{choose_view, ClusterNode, NodesInfo, Shard, SlotMap, SlotMapError, View};
pub use store::{ClusterState, ClusterStore, RedirectKind, SlotMasterError};
