//! Reply scanner: backend bytes → `Reply` frames (boundary + top-level type), RESP2 and RESP3.
//! Incremental and bounded (lengths, nesting depth): a hijacked backend is hostile too.

use bytes::{Bytes, BytesMut};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLimits {
    pub max_bulk_len: usize,
    pub max_depth: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    Str(&'a [u8]),
    Int(i64),
    Null,
    Other,
}

#[derive(Debug)]
pub struct ReplyScanner {}
