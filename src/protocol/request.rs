//! Request parser: client bytes → `Request` (argv + canonical RESP frame to forward).
//!
//! Mirrors Redis 7.x `processInputBuffer` / `processInlineBuffer` /
//! `processMultibulkBuffer` / `sdssplitargs` exactly (see shared/research/redis-attacks.md §4).
//! Incremental: progress is kept between calls, bytes already scanned are never scanned again.
//! Bounded: never allocates from a declared length beyond what has arrived.

use bytes::{Bytes, BytesMut};

/// Input limits; defaults mirror Redis's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest bulk string (`proto-max-bulk-len`, 512 MiB).
    pub max_bulk_len: usize,
    /// Largest multibulk count (Redis 7: INT_MAX).
    pub max_multibulk_len: usize,
    /// Longest inline line / count line without a terminator (64 KiB).
    pub max_inline_len: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        todo!()
    }
}

/// A protocol error; `Display` is Redis's exact text without the `-ERR ` prefix,
/// e.g. `Protocol error: invalid multibulk length`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {}

impl Request {
    /// Canonical RESP array encoding of the argv: the bytes to forward.
    pub fn frame(&self) -> &Bytes {
        todo!()
    }
    pub fn argc(&self) -> usize {
        todo!()
    }
    pub fn arg(&self, _i: usize) -> Option<&[u8]> {
        todo!()
    }
    pub fn from_args<A: AsRef<[u8]>>(_args: &[A]) -> Request {
        todo!()
    }
}

/// Incremental parser state for one client connection.
#[derive(Debug)]
pub struct RequestParser {}

impl RequestParser {
    pub fn new(_limits: RequestLimits) -> Self {
        todo!()
    }
    /// Next complete request from the front of `buf`, consuming its bytes.
    /// `Ok(None)`: need more bytes. After an `Err`, the connection must be closed.
    pub fn parse(&mut self, _buf: &mut BytesMut) -> Result<Option<Request>, ProtocolError> {
        todo!()
    }
}
