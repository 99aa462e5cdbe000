//! Bytes ↔ frames. Owns the request parser (client → proxy, RESP arrays and inline
//! commands, with Redis's exact rules and limits), the reply scanner (backend → proxy,
//! boundaries and types only), and every reply text the proxy writes (`texts`). Must
//! not do I/O or know about sessions.

/// Redis's default `proto-max-bulk-len` (512 MiB): the longest bulk string it accepts,
/// so the longest it can store and send back. The one definition of this limit.
pub const PROTO_MAX_BULK_LEN: usize = 512 * 1024 * 1024;

pub mod reply;
pub mod request;
pub mod texts;

pub use reply::{Item, Node, Reply, ReplyError, ReplyKind, ReplyLimits, ReplyScanner};
pub use request::{ProtocolError, Request, RequestLimits, RequestParser};
