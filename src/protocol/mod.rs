//! Bytes ↔ frames. Owns the request parser (client → proxy, RESP arrays and inline
//! commands, with Redis's exact rules and limits), the reply scanner (backend → proxy,
//! boundaries and types only), and every reply text the proxy writes (`texts`). Must
//! not do I/O or know about sessions.

pub mod reply;
pub mod request;
pub mod texts;

pub use reply::{Item, Reply, ReplyError, ReplyKind, ReplyLimits, ReplyScanner};
pub use request::{ProtocolError, Request, RequestLimits, RequestParser};
