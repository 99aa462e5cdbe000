//! Bytes ↔ frames. Owns the request parser (client → proxy, RESP arrays and inline
//! commands, with Redis's exact rules and limits) and the reply scanner (backend → proxy,
//! boundaries and types only). Must not do I/O or know about sessions.

pub mod reply;
pub mod request;

pub use reply::{Item, Node, Reply, ReplyError, ReplyKind, ReplyLimits, ReplyScanner};
pub use request::{ProtocolError, Request, RequestLimits, RequestParser};
