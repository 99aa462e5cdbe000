//! Reply scanner: backend bytes → `Reply` frames (boundary + top-level type), RESP2 and RESP3.
//! Incremental and bounded (lengths, nesting depth): a hijacked backend is hostile too.
//!
//! The scanner never decodes values into owned data: it finds where each top-level reply
//! ends, validates the framing strictly, and hands back the *same bytes* as a zero-copy
//! `Bytes` slice of the read buffer. Progress is kept between calls (an explicit stack of
//! remaining element counts, no recursion), so a reply arriving in many pieces is scanned
//! once in total. Small shallow accessors (`Reply::text`, `Reply::items`, ...) re-read a
//! finished frame for the few replies the proxy must understand (errors, pub/sub, ROLE).
//! It must not do I/O, and must not allocate from a length or count declared by the backend.

use bytes::{Bytes, BytesMut};

use super::request::string2ll;

/// Largest bulk length Redis accepts by default (`proto-max-bulk-len`, 512 MiB).
pub const DEFAULT_MAX_BULK_LEN: usize = super::PROTO_MAX_BULK_LEN;
/// Default bound on aggregate nesting. Redis 7's Lua replies nest up to 7,995 levels
/// (`EVAL` of a table nested N deep: N = 7,995 is returned, deeper ones end in
/// `-ERR reached lua stack limit` at that depth; measured on 7.0.15), so this admits
/// everything Redis produces; the scanner's stack is explicit, so depth costs 16 bytes a
/// level of heap, never call stack.
pub const DEFAULT_MAX_DEPTH: usize = 10_000;
/// A stack that grew past this many levels (a deep reply) is released afterwards.
const STACK_KEEP: usize = 256;
/// Longest length/count header line (`-9223372036854775808` is 20 bytes) before we give up.
const MAX_HEADER_LINE: usize = 32;

/// Bounds applied to backend replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLimits {
    /// Largest bulk / verbatim / blob-error payload, and longest simple line.
    pub max_bulk_len: usize,
    /// Deepest aggregate nesting (attributes count as a level).
    pub max_depth: usize,
}

impl Default for ReplyLimits {
    fn default() -> Self {
        ReplyLimits {
            max_bulk_len: DEFAULT_MAX_BULK_LEN,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Top-level type of a reply (the type of the value after any attributes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyKind {
    /// `+` simple string.
    Simple,
    /// `-` simple error.
    Error,
    /// `:` integer.
    Integer,
    /// `$` bulk string (non-null).
    Bulk,
    /// `_`, `$-1` or `*-1`.
    Null,
    /// `*` array (non-null).
    Array,
    /// `%` map.
    Map,
    /// `~` set.
    Set,
    /// `>` push (out-of-band: pub/sub messages, tracking invalidations).
    Push,
    /// `,` double.
    Double,
    /// `#` boolean.
    Boolean,
    /// `(` big number.
    BigNumber,
    /// `=` verbatim string.
    Verbatim,
    /// `!` blob error.
    BlobError,
}

/// A backend broke the protocol; the backend connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Unknown type byte at the start of a value.
    #[error("backend protocol error: unexpected byte 0x{0:02x}")]
    UnexpectedByte(u8),
    /// Streamed RESP3 (`$?`, `*?`, `;`, `.`): Redis never sends it.
    #[error("backend protocol error: streamed RESP3 types are not supported")]
    Streamed,
    /// A line not terminated by exactly `\r\n`, or a bulk payload not followed by `\r\n`.
    #[error("backend protocol error: line not terminated by CRLF")]
    BadTerminator,
    /// A length or count that is not a valid integer, or negative where not allowed.
    #[error("backend protocol error: invalid length")]
    InvalidLength,
    /// A value line that does not match its type (integer, double, boolean, ...).
    #[error("backend protocol error: invalid {0}")]
    InvalidValue(&'static str),
    /// Declared bulk length above `max_bulk_len`.
    #[error("backend protocol error: bulk length over limit ({len} > {limit})")]
    BulkTooLong {
        /// Declared length.
        len: u64,
        /// Configured limit.
        limit: usize,
    },
    /// A simple line longer than `max_bulk_len`.
    #[error("backend protocol error: line longer than {limit} bytes")]
    LineTooLong {
        /// Configured limit.
        limit: usize,
    },
    /// Aggregates nested deeper than `max_depth`.
    #[error("backend protocol error: nesting deeper than {limit}")]
    TooDeep {
        /// Configured limit.
        limit: usize,
    },
}

/// One complete top-level reply: its exact bytes and top-level type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The bytes to forward, attributes included.
    frame: Bytes,
    /// Type of the value (after attributes).
    kind: ReplyKind,
    /// Whether one or more `|` attributes precede the value.
    has_attribute: bool,
    /// Offset in `frame` of the value's type byte (0 unless attributes precede it).
    value_start: usize,
}

/// One element of a shallowly decoded aggregate (see [`Reply::items`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    /// Simple string, bulk string, or verbatim string without its `txt:` format prefix.
    Str(&'a [u8]),
    /// Integer.
    Int(i64),
    /// `_`, `$-1` or `*-1`.
    Null,
    /// Anything else: nested aggregates (skipped whole), errors, doubles, booleans, ...
    Other,
}

/// One open aggregate on the scanner's stack.
#[derive(Debug, Clone, Copy)]
struct Level {
    /// Elements still expected (for maps and attributes: 2 × pairs).
    remaining: u64,
    /// An attribute's completion does not count as an element of its parent.
    is_attr: bool,
}

/// Incremental scanner state for one backend connection.
#[derive(Debug)]
pub struct ReplyScanner {
    /// Bounds applied to every reply.
    limits: ReplyLimits,
    /// Open aggregates of the current reply; reused across replies (no per-reply alloc).
    stack: Vec<Level>,
    /// Offset in the buffer of the next byte to scan (everything before it is validated).
    pos: usize,
    /// While inside a bulk payload: offset just past its trailing `\r\n`, and its type byte.
    bulk_end: Option<(usize, u8)>,
    /// While a line is incomplete: where to resume the search for `\r`, so long lines
    /// arriving in pieces are not rescanned.
    scan_from: usize,
    /// Top-level kind of the current reply, once its value's type byte was seen.
    kind: ReplyKind,
    /// Whether the current reply began with an attribute.
    has_attribute: bool,
    /// Offset of the current reply's value (after leading attributes).
    value_start: usize,
    /// Offset in the buffer where the current reply begins: 0, unless `next_in_place`
    /// left complete replies before it (until `split_scanned`).
    frame_start: usize,
}

/// One reply that `ReplyScanner::next_in_place` found and left in the buffer: a `Reply`
/// without its bytes. `end` is its end offset in the bytes `split_scanned` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyShape {
    /// Offset just past the reply, from the start of the scanned run.
    pub end: usize,
    kind: ReplyKind,
    has_attribute: bool,
    /// Offset of the value's type byte from the reply's own start.
    value_start: usize,
}

impl ReplyShape {
    /// Top-level type (of the value after any attributes).
    pub fn kind(&self) -> ReplyKind {
        self.kind
    }

    /// `-` simple error or `!` blob error.
    pub fn is_error(&self) -> bool {
        matches!(self.kind, ReplyKind::Error | ReplyKind::BlobError)
    }
}

impl ReplyScanner {
    /// A scanner with the given limits and empty state.
    pub fn new(limits: ReplyLimits) -> Self {
        ReplyScanner {
            limits,
            stack: Vec::new(),
            pos: 0,
            bulk_end: None,
            scan_from: 0,
            kind: ReplyKind::Null,
            has_attribute: false,
            value_start: 0,
            frame_start: 0,
        }
    }

    /// The limits this scanner enforces.
    pub fn limits(&self) -> ReplyLimits {
        self.limits
    }

    /// Next complete top-level reply from the front of `buf`, split off zero-copy.
    ///
    /// `Ok(None)`: need more bytes; the caller appends to `buf` and calls again (bytes
    /// already scanned are not rescanned). Between calls the caller must only append to
    /// `buf`. After an `Err` the state is undefined: close the backend connection.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        debug_assert_eq!(
            self.frame_start, 0,
            "next after next_in_place without split_scanned"
        );
        if self.scan(buf)? {
            Ok(Some(self.emit(buf)))
        } else {
            Ok(None)
        }
    }

    /// Like `next`, but the complete reply stays in `buf`: its shape is returned, and
    /// the next call scans the reply after it. `split_scanned` then takes every reply
    /// found so far off `buf` as one `Bytes` (one split for a run of replies instead of
    /// one per reply). Same errors and `Ok(None)` as `next`.
    pub fn next_in_place(&mut self, buf: &mut BytesMut) -> Result<Option<ReplyShape>, ReplyError> {
        if !self.scan(buf)? {
            return Ok(None);
        }
        let shape = ReplyShape {
            end: self.pos,
            kind: self.kind,
            has_attribute: self.has_attribute,
            value_start: self.value_start.saturating_sub(self.frame_start),
        };
        self.frame_start = self.pos;
        self.reset_reply();
        Ok(Some(shape))
    }

    /// The replies `next_in_place` found since the last split, split off the front of
    /// `buf` zero-copy (empty when there are none). A reply still incomplete stays, and
    /// its scan goes on where it was.
    pub fn split_scanned(&mut self, buf: &mut BytesMut) -> Bytes {
        let k = std::mem::take(&mut self.frame_start);
        if k == 0 {
            return Bytes::new();
        }
        let run = buf.split_to(k).freeze();
        self.pos -= k;
        if let Some((end, ty)) = self.bulk_end {
            self.bulk_end = Some((end - k, ty));
        }
        self.scan_from = self.scan_from.saturating_sub(k);
        self.value_start = self.value_start.saturating_sub(k);
        run
    }

    /// Scan on; true when a complete top-level reply ends at `self.pos`.
    fn scan(&mut self, buf: &mut BytesMut) -> Result<bool, ReplyError> {
        loop {
            if let Some((end, ty)) = self.bulk_end {
                if buf.len() < end {
                    return Ok(false);
                }
                finish_bulk(buf, self.pos, end, ty)?;
                self.bulk_end = None;
                self.pos = end;
                if self.complete_value() {
                    return Ok(true);
                }
                continue;
            }

            let start = self.pos;
            let Some(&ty) = buf.get(start) else {
                return Ok(false);
            };
            // Reject a bad type byte before waiting for its line.
            let max_line = match ty {
                b'+' | b'-' | b',' | b'(' => self.limits.max_bulk_len,
                b':' | b'_' | b'#' | b'$' | b'=' | b'!' | b'*' | b'%' | b'~' | b'>' | b'|' => {
                    MAX_HEADER_LINE
                }
                b';' | b'.' => return Err(ReplyError::Streamed),
                other => return Err(ReplyError::UnexpectedByte(other)),
            };
            let Some(line_end) = self.find_line(buf, start + 1, max_line)? else {
                return Ok(false);
            };
            let line = buf.get(start + 1..line_end).unwrap_or_default();
            let after = line_end + 2;
            let top = self.stack.is_empty();

            let leaf = match ty {
                b'+' => ReplyKind::Simple,
                b'-' => ReplyKind::Error,
                b':' => {
                    string2ll(line).ok_or(ReplyError::InvalidValue("integer"))?;
                    ReplyKind::Integer
                }
                b'_' => {
                    if !line.is_empty() {
                        return Err(ReplyError::InvalidValue("null"));
                    }
                    ReplyKind::Null
                }
                b',' => {
                    if !valid_double(line) {
                        return Err(ReplyError::InvalidValue("double"));
                    }
                    ReplyKind::Double
                }
                b'#' => {
                    if line != b"t" && line != b"f" {
                        return Err(ReplyError::InvalidValue("boolean"));
                    }
                    ReplyKind::Boolean
                }
                b'(' => {
                    if !valid_big_number(line) {
                        return Err(ReplyError::InvalidValue("big number"));
                    }
                    ReplyKind::BigNumber
                }
                b'$' | b'=' | b'!' => {
                    let len = parse_len(line)?;
                    if len == -1 && ty == b'$' {
                        ReplyKind::Null
                    } else {
                        let len = u64::try_from(len).map_err(|_| ReplyError::InvalidLength)?;
                        let len = usize::try_from(len)
                            .ok()
                            .filter(|&l| l <= self.limits.max_bulk_len)
                            .ok_or(ReplyError::BulkTooLong {
                                len,
                                limit: self.limits.max_bulk_len,
                            })?;
                        if ty == b'=' && len < 4 {
                            return Err(ReplyError::InvalidValue("verbatim string"));
                        }
                        if top {
                            self.kind = match ty {
                                b'$' => ReplyKind::Bulk,
                                b'=' => ReplyKind::Verbatim,
                                _ => ReplyKind::BlobError,
                            };
                            self.value_start = start;
                        }
                        // Cannot overflow: len <= max_bulk_len and after <= buf.len().
                        let end = after.saturating_add(len).saturating_add(2);
                        self.pos = after;
                        self.bulk_end = Some((end, ty));
                        if end > buf.len() {
                            buf.reserve(end - buf.len());
                        }
                        continue;
                    }
                }
                b'*' | b'%' | b'~' | b'>' | b'|' => {
                    let count = parse_len(line)?;
                    if count == -1 && ty == b'*' {
                        ReplyKind::Null
                    } else {
                        let count = u64::try_from(count).map_err(|_| ReplyError::InvalidLength)?;
                        if self.stack.len() >= self.limits.max_depth {
                            return Err(ReplyError::TooDeep {
                                limit: self.limits.max_depth,
                            });
                        }
                        let is_attr = ty == b'|';
                        // count <= i64::MAX, so doubling fits in u64.
                        let remaining = if ty == b'%' || is_attr {
                            count * 2
                        } else {
                            count
                        };
                        self.pos = after;
                        if is_attr {
                            if top {
                                self.has_attribute = true;
                            }
                            if remaining > 0 {
                                self.stack.push(Level { remaining, is_attr });
                            }
                            continue;
                        }
                        if top {
                            self.kind = match ty {
                                b'*' => ReplyKind::Array,
                                b'%' => ReplyKind::Map,
                                b'~' => ReplyKind::Set,
                                _ => ReplyKind::Push,
                            };
                            self.value_start = start;
                        }
                        if remaining > 0 {
                            self.stack.push(Level { remaining, is_attr });
                            continue;
                        }
                        if self.complete_value() {
                            return Ok(true);
                        }
                        continue;
                    }
                }
                // Excluded by the type-byte check above.
                other => return Err(ReplyError::UnexpectedByte(other)),
            };

            if top {
                self.kind = leaf;
                self.value_start = start;
            }
            self.pos = after;
            if self.complete_value() {
                return Ok(true);
            }
        }
    }

    /// Finds the `\r\n` ending the line that starts at `from`; `Ok(None)` if not yet buffered.
    /// Returns the offset of the `\r`. A bare `\r` or `\n` inside the line is an error.
    fn find_line(
        &mut self,
        buf: &[u8],
        from: usize,
        max_line: usize,
    ) -> Result<Option<usize>, ReplyError> {
        let search = self.scan_from.max(from);
        let hay = buf.get(search..).unwrap_or_default();
        let too_long = |end: usize| {
            if end - from <= max_line {
                Ok(())
            } else if max_line == MAX_HEADER_LINE {
                Err(ReplyError::InvalidLength)
            } else {
                Err(ReplyError::LineTooLong { limit: max_line })
            }
        };
        match super::find_either(b'\r', b'\n', hay) {
            Some(off) => {
                let cr = search + off;
                too_long(cr)?;
                match (buf.get(cr), buf.get(cr + 1)) {
                    (Some(b'\r'), Some(b'\n')) => {
                        self.scan_from = 0;
                        Ok(Some(cr))
                    }
                    (Some(b'\r'), None) => {
                        self.scan_from = cr;
                        Ok(None)
                    }
                    _ => Err(ReplyError::BadTerminator),
                }
            }
            None => {
                too_long(buf.len())?;
                self.scan_from = buf.len();
                Ok(None)
            }
        }
    }

    /// Records that one value ended; true when that finished the top-level reply.
    fn complete_value(&mut self) -> bool {
        loop {
            let Some(level) = self.stack.last_mut() else {
                return true;
            };
            level.remaining -= 1;
            if level.remaining > 0 {
                return false;
            }
            let was_attr = level.is_attr;
            self.stack.pop();
            if was_attr {
                // An attribute prefixes the next value; it is not an element itself.
                return false;
            }
        }
    }

    /// Splits the finished reply off the front of `buf` and resets per-reply state.
    fn emit(&mut self, buf: &mut BytesMut) -> Reply {
        let frame = buf.split_to(self.pos).freeze();
        let reply = Reply {
            frame,
            kind: self.kind,
            has_attribute: self.has_attribute,
            value_start: self.value_start,
        };
        self.pos = 0;
        self.reset_reply();
        reply
    }

    /// Per-reply state back to its start (the position is the caller's).
    fn reset_reply(&mut self) {
        self.scan_from = 0;
        self.has_attribute = false;
        self.value_start = 0;
        if self.stack.capacity() > STACK_KEEP {
            self.stack = Vec::new();
        }
    }
}

/// Checks the `\r\n` after a bulk payload spanning `body..end-2` (and a verbatim's format).
fn finish_bulk(buf: &[u8], body: usize, end: usize, ty: u8) -> Result<(), ReplyError> {
    if buf.get(end.saturating_sub(2)..end) != Some(b"\r\n".as_slice()) {
        return Err(ReplyError::BadTerminator);
    }
    if ty == b'=' && buf.get(body + 3) != Some(&b':') {
        return Err(ReplyError::InvalidValue("verbatim string"));
    }
    Ok(())
}

/// A length or count header: canonical `0` or `-?[1-9][0-9]*` fitting i64 (Redis
/// `string2ll`; `?` means streamed RESP3). Callers accept a negative value only as the
/// `-1` null of `$` and `*`.
fn parse_len(s: &[u8]) -> Result<i64, ReplyError> {
    if s == b"?" {
        return Err(ReplyError::Streamed);
    }
    string2ll(s).ok_or(ReplyError::InvalidLength)
}

/// RESP3 double: `-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?`, or exactly `inf`, `-inf`, `nan`.
fn valid_double(s: &[u8]) -> bool {
    /// Strips one or more leading ASCII digits; `None` if there are none.
    fn digits(s: &[u8]) -> Option<&[u8]> {
        let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
        (n > 0).then(|| &s[n..])
    }
    if matches!(s, b"inf" | b"-inf" | b"nan") {
        return true;
    }
    let Some(mut rest) = digits(s.strip_prefix(b"-").unwrap_or(s)) else {
        return false;
    };
    if let Some(frac) = rest.strip_prefix(b".") {
        let Some(r) = digits(frac) else {
            return false;
        };
        rest = r;
    }
    if let Some((b'e' | b'E', exp)) = rest.split_first() {
        let exp = exp
            .strip_prefix(b"+")
            .or_else(|| exp.strip_prefix(b"-"))
            .unwrap_or(exp);
        let Some(r) = digits(exp) else {
            return false;
        };
        rest = r;
    }
    rest.is_empty()
}

/// RESP3 big number: optional `-`, then one or more digits.
fn valid_big_number(s: &[u8]) -> bool {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

impl Reply {
    /// The one complete reply at the start of `bytes` (tests building replies by hand).
    #[cfg(test)]
    pub(crate) fn parse_one(bytes: &[u8]) -> Reply {
        let mut buf = BytesMut::from(bytes);
        match ReplyScanner::new(ReplyLimits::default()).next(&mut buf) {
            Ok(Some(reply)) => reply,
            other => panic!("{bytes:?} is not one complete reply: {other:?}"),
        }
    }

    /// The reply `shape` describes, whose bytes are `frame` (a slice of the run
    /// `ReplyScanner::split_scanned` returned).
    pub fn from_shape(frame: Bytes, shape: &ReplyShape) -> Reply {
        Reply {
            frame,
            kind: shape.kind,
            has_attribute: shape.has_attribute,
            value_start: shape.value_start,
        }
    }

    /// The exact bytes of the reply (attributes included): what to forward.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The exact bytes of the reply, by value.
    pub fn into_frame(self) -> Bytes {
        self.frame
    }

    /// Top-level type (of the value after any attributes).
    pub fn kind(&self) -> ReplyKind {
        self.kind
    }

    /// Whether attributes precede the value.
    pub fn has_attribute(&self) -> bool {
        self.has_attribute
    }

    /// `-` simple error or `!` blob error.
    pub fn is_error(&self) -> bool {
        matches!(self.kind, ReplyKind::Error | ReplyKind::BlobError)
    }

    /// `>` push: out-of-band, not an answer to a request.
    pub fn is_push(&self) -> bool {
        self.kind == ReplyKind::Push
    }

    /// For errors, the first word of the text (`READONLY` for `-READONLY You can't ...`).
    pub fn error_code(&self) -> Option<&[u8]> {
        if !self.is_error() {
            return None;
        }
        let text = self.text()?;
        let end = memchr::memchr(b' ', text).unwrap_or(text.len());
        text.get(..end)
    }

    /// Text of a simple string, error, bulk string, blob error, or verbatim string
    /// (verbatim without its `txt:` format prefix); `None` for other kinds.
    pub fn text(&self) -> Option<&[u8]> {
        let mut pos = self.value_start;
        match read_value(&self.frame, &mut pos)? {
            Value::Line(b'+' | b'-', line) => Some(line),
            Value::Bulk(b'$' | b'!', body) => Some(body),
            Value::Bulk(b'=', body) => body.get(4..),
            _ => None,
        }
    }

    /// Shallow decode of a top-level array, push, set, or map (keys and values
    /// alternating); nested aggregates become [`Item::Other`], attributes are skipped.
    pub fn items(&self) -> Option<Vec<Item<'_>>> {
        if !matches!(
            self.kind,
            ReplyKind::Array | ReplyKind::Push | ReplyKind::Set | ReplyKind::Map
        ) {
            return None;
        }
        let b: &[u8] = &self.frame;
        let mut pos = self.value_start;
        let Value::Aggregate(_, count) = read_value(b, &mut pos)? else {
            return None;
        };
        // The frame is validated, so each element takes >= 3 bytes: this bounds the count.
        let count = usize::try_from(count).ok()?;
        let mut items = Vec::with_capacity(count.min(b.len() / 3));
        while items.len() < count {
            let item = match read_value(b, &mut pos)? {
                Value::Aggregate(b'|', n) => {
                    skip_values(b, &mut pos, n)?;
                    continue;
                }
                Value::Aggregate(_, n) => {
                    skip_values(b, &mut pos, n)?;
                    Item::Other
                }
                Value::Line(b'+', line) => Item::Str(line),
                Value::Line(b':', line) => Item::Int(string2ll(line)?),
                Value::Line(b'_', _) => Item::Null,
                Value::Bulk(b'$', body) => Item::Str(body),
                Value::Bulk(b'=', body) => Item::Str(body.get(4..)?),
                Value::Null => Item::Null,
                _ => Item::Other,
            };
            items.push(item);
        }
        Some(items)
    }
}

/// A fully decoded reply value (see [`Reply::tree`]), borrowing from the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node<'a> {
    /// Simple string, bulk string, or verbatim string without its format prefix.
    Str(&'a [u8]),
    /// Integer.
    Int(i64),
    /// `_`, `$-1` or `*-1`.
    Null,
    /// Array, set, push, or map (keys and values alternating).
    List(Vec<Node<'a>>),
    /// Anything else: errors, doubles, booleans, big numbers.
    Other,
}

impl Reply {
    /// Full decode of the reply, for the proxy's own requests (`COMMAND` metadata), not
    /// the forwarding path. Depth is bounded by the scanner's `max_depth`, which already
    /// validated the frame; attributes are skipped.
    pub fn tree(&self) -> Option<Node<'_>> {
        let b: &[u8] = &self.frame;
        let mut pos = self.value_start;
        read_node(b, &mut pos)
    }
}

fn read_node<'a>(b: &'a [u8], pos: &mut usize) -> Option<Node<'a>> {
    loop {
        return Some(match read_value(b, pos)? {
            Value::Aggregate(b'|', n) => {
                skip_values(b, pos, n)?;
                continue;
            }
            Value::Aggregate(_, n) => {
                let n = usize::try_from(n).ok()?;
                let mut items = Vec::with_capacity(n.min(b.len() / 3));
                for _ in 0..n {
                    items.push(read_node(b, pos)?);
                }
                Node::List(items)
            }
            Value::Line(b'+', line) => Node::Str(line),
            Value::Line(b':', line) => Node::Int(string2ll(line)?),
            Value::Line(b'_', _) => Node::Null,
            Value::Bulk(b'$', body) => Node::Str(body),
            Value::Bulk(b'=', body) => Node::Str(body.get(4..)?),
            Value::Null => Node::Null,
            _ => Node::Other,
        });
    }
}

/// One value header read from an already validated frame.
enum Value<'a> {
    /// A one-line value: type byte and line content.
    Line(u8, &'a [u8]),
    /// A bulk-like value: type byte and payload.
    Bulk(u8, &'a [u8]),
    /// `$-1` or `*-1`.
    Null,
    /// An aggregate header: type byte and number of values that follow (2 × pairs for
    /// maps and attributes).
    Aggregate(u8, u64),
}

/// Reads one value header at `*pos` (and a bulk payload), advancing `pos` past it.
fn read_value<'a>(b: &'a [u8], pos: &mut usize) -> Option<Value<'a>> {
    let ty = *b.get(*pos)?;
    let rest = b.get(*pos + 1..)?;
    let cr = memchr::memchr(b'\r', rest)?;
    let line = rest.get(..cr)?;
    *pos += 1 + cr + 2;
    match ty {
        b'$' | b'=' | b'!' => {
            let len = string2ll(line)?;
            if len < 0 {
                return Some(Value::Null);
            }
            let len = usize::try_from(len).ok()?;
            let body = b.get(*pos..pos.checked_add(len)?)?;
            *pos += len + 2;
            Some(Value::Bulk(ty, body))
        }
        b'*' | b'%' | b'~' | b'>' | b'|' => {
            let n = string2ll(line)?;
            if n < 0 {
                return Some(Value::Null);
            }
            let n = u64::try_from(n).ok()?;
            let n = if ty == b'%' || ty == b'|' { n * 2 } else { n };
            Some(Value::Aggregate(ty, n))
        }
        _ => Some(Value::Line(ty, line)),
    }
}

/// Skips `n` values (nested aggregates included) without recursion: a running count.
fn skip_values(b: &[u8], pos: &mut usize, mut n: u64) -> Option<()> {
    while n > 0 {
        match read_value(b, pos)? {
            // An attribute adds its pairs but is not itself one of the `n` values.
            Value::Aggregate(b'|', m) => n = n.checked_add(m)?,
            Value::Aggregate(_, m) => n = (n - 1).checked_add(m)?,
            _ => n -= 1,
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplyKind::*;

    #[test]
    fn tree_decodes_nested_replies() {
        let mut buf = BytesMut::from(
            &b"*4\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n%1\r\n+k\r\n_\r\n|1\r\n+a\r\n+b\r\n,1.5\r\n"[..],
        );
        let reply = ReplyScanner::new(ReplyLimits::default())
            .next(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(
            reply.tree(),
            Some(Node::List(vec![
                Node::Str(b"get"),
                Node::Int(2),
                Node::List(vec![
                    Node::Str(b"readonly"),
                    Node::List(vec![Node::Str(b"k"), Node::Null]),
                ]),
                Node::Other,
            ]))
        );
    }

    /// Scans `input` fed in pieces of `chunk` bytes; returns the frames and their kinds.
    fn scan_chunked(
        input: &[u8],
        chunk: usize,
        limits: ReplyLimits,
    ) -> Result<Vec<Reply>, ReplyError> {
        let mut sc = ReplyScanner::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(r) = sc.next(&mut buf)? {
                out.push(r);
            }
        }
        assert!(buf.is_empty(), "leftover bytes: {buf:?}");
        assert_eq!(sc.pos, 0);
        assert!(sc.stack.is_empty() && sc.bulk_end.is_none());
        Ok(out)
    }

    fn scan_all(input: &[u8]) -> Result<Vec<Reply>, ReplyError> {
        scan_chunked(input, input.len(), ReplyLimits::default())
    }

    fn scan_one(input: &[u8]) -> Reply {
        let mut r = scan_all(input).unwrap_or_else(|e| panic!("{e} for {input:?}"));
        assert_eq!(r.len(), 1, "{input:?}");
        r.remove(0)
    }

    /// Well-formed replies, as Redis 7 sends them: (bytes, kind, has_attribute).
    const VALID: &[(&[u8], ReplyKind, bool)] = &[
        (b"+OK\r\n", Simple, false),
        (b"+\r\n", Simple, false),
        (b"-ERR unknown command 'foo'\r\n", Error, false),
        (
            b"-READONLY You can't write against a read only replica.\r\n",
            Error,
            false,
        ),
        (b":0\r\n", Integer, false),
        (b":-9223372036854775808\r\n", Integer, false),
        (b":9223372036854775807\r\n", Integer, false),
        (b"$3\r\nbar\r\n", Bulk, false),
        (b"$0\r\n\r\n", Bulk, false),
        (b"$4\r\na\r\nb\r\n", Bulk, false),
        (b"$-1\r\n", Null, false),
        (b"*-1\r\n", Null, false),
        (b"_\r\n", Null, false),
        (b"*0\r\n", Array, false),
        (b"*2\r\n$3\r\nfoo\r\n$-1\r\n", Array, false),
        (b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n", Array, false),
        (b"*2\r\n*2\r\n:1\r\n:2\r\n*1\r\n*0\r\n", Array, false),
        (b",1.5\r\n", Double, false),
        (b",-0.25\r\n", Double, false),
        (b",1e+300\r\n", Double, false),
        (b",inf\r\n", Double, false),
        (b",-inf\r\n", Double, false),
        (b",nan\r\n", Double, false),
        (b"#t\r\n", Boolean, false),
        (b"#f\r\n", Boolean, false),
        (
            b"(3492890328409238509324850943850943825024385\r\n",
            BigNumber,
            false,
        ),
        (
            b"(-3492890328409238509324850943850943825024385\r\n",
            BigNumber,
            false,
        ),
        (b"!21\r\nSYNTAX invalid syntax\r\n", BlobError, false),
        (b"=15\r\ntxt:Some string\r\n", Verbatim, false),
        (b"=4\r\ntxt:\r\n", Verbatim, false),
        (b"%0\r\n", Map, false),
        // HELLO 3
        (
            b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.2.4\r\n\
              $5\r\nproto\r\n:3\r\n$2\r\nid\r\n:5\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n\
              $4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n",
            Map,
            false,
        ),
        (b"~2\r\n$1\r\na\r\n$1\r\nb\r\n", Set, false),
        (b"~0\r\n", Set, false),
        // CLIENT TRACKING invalidation
        (
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nfoo\r\n",
            Push,
            false,
        ),
        (b">2\r\n$10\r\ninvalidate\r\n_\r\n", Push, false),
        (
            b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n",
            Push,
            false,
        ),
        // Attributes: before a top-level value, several, empty, nested in aggregates.
        (
            b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n\
              *2\r\n:2039123\r\n:9543892\r\n",
            Array,
            true,
        ),
        (b"|1\r\n+a\r\n+b\r\n+OK\r\n", Simple, true),
        (
            b"|1\r\n+a\r\n+b\r\n|1\r\n+c\r\n+d\r\n$1\r\nx\r\n",
            Bulk,
            true,
        ),
        (b"|0\r\n:1\r\n", Integer, true),
        (b"|1\r\n+a\r\n|1\r\n+n\r\n+m\r\n+b\r\n_\r\n", Null, true),
        (b"*2\r\n:1\r\n|1\r\n+ttl\r\n:3600\r\n:2\r\n", Array, false),
        (b"*1\r\n|1\r\n+a\r\n*1\r\n+b\r\n+c\r\n", Array, false),
        (b"%1\r\n|0\r\n+k\r\n|1\r\n+a\r\n+b\r\n+v\r\n", Map, false),
        // Attributes nested in an attribute.
        (
            b"|1\r\n|1\r\n+x\r\n+y\r\n+a\r\n+b\r\n-ERR x\r\n",
            Error,
            true,
        ),
    ];

    #[test]
    fn every_type_alone() {
        for &(input, kind, attr) in VALID {
            let r = scan_one(input);
            assert_eq!(r.frame().as_ref(), input, "{input:?}");
            assert_eq!(r.kind(), kind, "{input:?}");
            assert_eq!(r.has_attribute(), attr, "{input:?}");
            assert_eq!(r.is_error(), matches!(kind, Error | BlobError));
            assert_eq!(r.is_push(), kind == Push);
        }
    }

    fn all_valid() -> Vec<u8> {
        VALID
            .iter()
            .flat_map(|(i, _, _)| i.iter().copied())
            .collect()
    }

    fn check_frames(replies: &[Reply]) {
        assert_eq!(replies.len(), VALID.len());
        for (r, &(input, kind, attr)) in replies.iter().zip(VALID) {
            assert_eq!(r.frame().as_ref(), input);
            assert_eq!(r.kind(), kind);
            assert_eq!(r.has_attribute(), attr);
        }
    }

    #[test]
    fn many_replies_in_one_buffer() {
        check_frames(&scan_all(&all_valid()).unwrap());
    }

    #[test]
    fn byte_by_byte() {
        check_frames(&scan_chunked(&all_valid(), 1, ReplyLimits::default()).unwrap());
        for chunk in [2, 3, 5, 7, 64] {
            check_frames(&scan_chunked(&all_valid(), chunk, ReplyLimits::default()).unwrap());
        }
    }

    #[test]
    fn split_at_every_boundary() {
        for &(input, kind, _) in VALID {
            for cut in 0..=input.len() {
                let mut sc = ReplyScanner::new(ReplyLimits::default());
                let mut buf = BytesMut::from(&input[..cut]);
                let first = sc.next(&mut buf).unwrap();
                if cut < input.len() {
                    assert_eq!(first, None, "{input:?} cut at {cut}");
                    buf.extend_from_slice(&input[cut..]);
                    let r = sc.next(&mut buf).unwrap().unwrap();
                    assert_eq!(r.frame().as_ref(), input);
                    assert_eq!(r.kind(), kind);
                } else {
                    assert_eq!(first.unwrap().frame().as_ref(), input);
                }
                assert!(buf.is_empty());
                assert_eq!(sc.next(&mut buf).unwrap(), None);
            }
        }
    }

    #[test]
    fn trailing_partial_reply_stays_in_buffer() {
        let mut sc = ReplyScanner::new(ReplyLimits::default());
        let mut buf = BytesMut::from(&b"+OK\r\n$5\r\nhel"[..]);
        assert_eq!(
            sc.next(&mut buf).unwrap().unwrap().frame().as_ref(),
            b"+OK\r\n"
        );
        assert_eq!(sc.next(&mut buf).unwrap(), None);
        assert!(sc.bulk_end.is_some());
        assert_eq!(buf.as_ref(), b"$5\r\nhel");
        buf.extend_from_slice(b"lo\r\n:1\r\n");
        assert_eq!(
            sc.next(&mut buf).unwrap().unwrap().text(),
            Some(&b"hello"[..])
        );
        assert_eq!(
            sc.next(&mut buf).unwrap().unwrap().frame().as_ref(),
            b":1\r\n"
        );
        assert_eq!(sc.next(&mut buf).unwrap(), None);
    }

    #[test]
    fn large_bulk_in_64k_chunks() {
        let len = 10 * 1024 * 1024;
        let mut input = format!("${len}\r\n").into_bytes();
        input.extend((0..len).map(|i| (i % 251) as u8));
        input.extend_from_slice(b"\r\n+OK\r\n");
        let mut sc = ReplyScanner::new(ReplyLimits::default());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for (i, piece) in input.chunks(64 * 1024).enumerate() {
            buf.extend_from_slice(piece);
            if i == 0 {
                // The header was seen: room for the whole payload is reserved at once.
                assert_eq!(sc.next(&mut buf).unwrap(), None);
                assert!(buf.capacity() >= len + 2);
            }
            while let Some(r) = sc.next(&mut buf).unwrap() {
                out.push(r);
            }
        }
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].kind(), Bulk);
        assert_eq!(out[0].frame().len(), input.len() - 5);
        assert_eq!(out[0].text().map(<[u8]>::len), Some(len));
        assert_eq!(out[1].frame().as_ref(), b"+OK\r\n");
    }

    #[test]
    fn huge_array_in_chunks() {
        let n = 100_000;
        let mut input = format!("*{n}\r\n").into_bytes();
        for i in 0..n {
            if i % 2 == 0 {
                input.extend_from_slice(format!(":{i}\r\n").as_bytes());
            } else {
                input.extend_from_slice(format!("$5\r\nv{:04}\r\n", i % 10_000).as_bytes());
            }
        }
        // Chunks of 1 byte: 1.1 million calls, which only finishes if nothing is rescanned.
        for chunk in [1, 1000, 65536] {
            let r = scan_chunked(&input, chunk, ReplyLimits::default()).unwrap();
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].frame().as_ref(), &input[..]);
            let items = r[0].items().unwrap();
            assert_eq!(items.len(), n);
            assert_eq!(items[2], Item::Int(2));
            assert_eq!(items[3], Item::Str(b"v0003"));
        }
    }

    #[test]
    fn long_simple_line_in_pieces() {
        let mut input = vec![b'+'];
        input.extend(std::iter::repeat(b'x').take(1_000_000));
        input.extend_from_slice(b"\r\n");
        let r = scan_chunked(&input, 100, ReplyLimits::default()).unwrap();
        assert_eq!(r[0].text().map(<[u8]>::len), Some(1_000_000));
    }

    #[test]
    fn depth_limit() {
        let limits = ReplyLimits::default();
        const D: usize = DEFAULT_MAX_DEPTH;
        let ok = [b"*1\r\n".repeat(D), b":1\r\n".to_vec()].concat();
        assert_eq!(scan_one(&ok).kind(), Array);
        let too_deep = [b"*1\r\n".repeat(D + 1), b":1\r\n".to_vec()].concat();
        assert_eq!(
            scan_all(&too_deep).unwrap_err(),
            ReplyError::TooDeep { limit: D }
        );
        // Empty aggregates count too: depth is about nesting, not storage.
        let empty_one_too_deep = [b"*1\r\n".repeat(D), b"*0\r\n".to_vec()].concat();
        assert!(scan_all(&empty_one_too_deep).is_err());
        let attr_deep = [b"*1\r\n".repeat(D), b"|1\r\n+a\r\n+b\r\n:1\r\n".to_vec()].concat();
        assert!(scan_all(&attr_deep).is_err());

        let million = b"*1\r\n".repeat(1_000_000);
        assert_eq!(
            scan_all(&million).unwrap_err(),
            ReplyError::TooDeep { limit: D }
        );
        let err = scan_chunked(&million, 4096, limits).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("backend protocol error: nesting deeper than {D}")
        );
        let mixed = b"%1\r\n~1\r\n>1\r\n|1\r\n".repeat(250_000);
        assert!(scan_chunked(&mixed, 1, limits).is_err());
    }

    #[test]
    fn malformed() {
        use ReplyError::*;
        let cases: &[(&[u8], ReplyError)] = &[
            (b"A\r\n", UnexpectedByte(b'A')),
            (b"\r\n", UnexpectedByte(b'\r')),
            (b"*1\r\nx\r\n", UnexpectedByte(b'x')),
            (b"+OK\n", BadTerminator),
            (b"+O\rK\r\n", BadTerminator),
            (b"+OK\n\r\n", BadTerminator),
            (b"$3\r\nbarX\r\n", BadTerminator),
            (b"$3\r\nbar\n\n", BadTerminator),
            (b"$3\n\nbar\r\n", BadTerminator),
            (b"$\r\n", InvalidLength),
            (b"$-2\r\n", InvalidLength),
            (b"$+3\r\nbar\r\n", InvalidLength),
            (b"$3x\r\nbar\r\n", InvalidLength),
            (b"$ 3\r\nbar\r\n", InvalidLength),
            (b"$9223372036854775808\r\n", InvalidLength),
            (b"$123456789012345678901234567890123\r\n", InvalidLength),
            (b"*-2\r\n", InvalidLength),
            (b"*9223372036854775808\r\n", InvalidLength),
            (b"%-1\r\n", InvalidLength),
            (b"~-1\r\n", InvalidLength),
            (b"|-1\r\n", InvalidLength),
            (b"!-1\r\n", InvalidLength),
            (b"=-1\r\n", InvalidLength),
            (b"*x\r\n", InvalidLength),
            (b":\r\n", InvalidValue("integer")),
            (b":12a\r\n", InvalidValue("integer")),
            (b":9223372036854775808\r\n", InvalidValue("integer")),
            (b":-\r\n", InvalidValue("integer")),
            (b"_x\r\n", InvalidValue("null")),
            (b",\r\n", InvalidValue("double")),
            (b",1.5x\r\n", InvalidValue("double")),
            (b"#x\r\n", InvalidValue("boolean")),
            (b"#\r\n", InvalidValue("boolean")),
            (b"#tt\r\n", InvalidValue("boolean")),
            (b"(\r\n", InvalidValue("big number")),
            (b"(12.5\r\n", InvalidValue("big number")),
            (b"=3\r\ntxt\r\n", InvalidValue("verbatim string")),
            (b"=5\r\ntxt-x\r\n", InvalidValue("verbatim string")),
            (b"$?\r\n", Streamed),
            (b"*?\r\n", Streamed),
            (b"%?\r\n", Streamed),
            (b";4\r\nHell\r\n", Streamed),
            (b".\r\n", Streamed),
            (b"*2\r\n+a\r\n.\r\n", Streamed),
            (
                b"$536870913\r\n",
                BulkTooLong {
                    len: 536_870_913,
                    limit: DEFAULT_MAX_BULK_LEN,
                },
            ),
            (
                b"!9223372036854775807\r\n",
                BulkTooLong {
                    len: i64::MAX as u64,
                    limit: DEFAULT_MAX_BULK_LEN,
                },
            ),
        ];
        for (input, err) in cases {
            assert_eq!(scan_all(input).unwrap_err(), *err, "{input:?}");
            // Same error when fed byte by byte.
            let got = scan_chunked(input, 1, ReplyLimits::default()).unwrap_err();
            assert_eq!(got, *err, "{input:?} byte by byte");
        }
        assert_eq!(
            ReplyError::UnexpectedByte(b'A').to_string(),
            "backend protocol error: unexpected byte 0x41"
        );
    }

    /// Integers, lengths and counts follow Redis `string2ll`; doubles the RESP3 grammar.
    #[test]
    fn strict_numbers() {
        use ReplyError::*;
        let accepted: &[(&[u8], ReplyKind)] = &[
            (b":0\r\n", Integer),
            (b":7\r\n", Integer),
            (b":-1\r\n", Integer),
            (b":10\r\n", Integer),
            (b":-9223372036854775808\r\n", Integer),
            (b"$0\r\n\r\n", Bulk),
            (b"$10\r\n0123456789\r\n", Bulk),
            (b"$-1\r\n", Null),
            (b"*-1\r\n", Null),
            (b"*0\r\n", Array),
            (
                b"*10\r\n:0\r\n:1\r\n:2\r\n:3\r\n:4\r\n:5\r\n:6\r\n:7\r\n:8\r\n:9\r\n",
                Array,
            ),
            (b"%0\r\n", Map),
            (b"~0\r\n", Set),
            (b">0\r\n", Push),
            (b"|0\r\n+a\r\n", Simple),
            (b"!0\r\n\r\n", BlobError),
            (b"=4\r\ntxt:\r\n", Verbatim),
            (b",0\r\n", Double),
            (b",-0\r\n", Double),
            (b",10\r\n", Double),
            (b",1.23\r\n", Double),
            (b",-1.5\r\n", Double),
            (b",-0.0\r\n", Double),
            (b",1.5e10\r\n", Double),
            (b",1E-3\r\n", Double),
            (b",1e+300\r\n", Double),
            (b",-2.5E+07\r\n", Double),
            (b",inf\r\n", Double),
            (b",-inf\r\n", Double),
            (b",nan\r\n", Double),
        ];
        for &(input, kind) in accepted {
            let r = scan_one(input);
            assert_eq!(r.kind(), kind, "{input:?}");
            let bytewise = scan_chunked(input, 1, ReplyLimits::default())
                .unwrap_or_else(|e| panic!("{e} for {input:?} byte by byte"));
            assert_eq!(bytewise.len(), 1, "{input:?}");
            assert_eq!(bytewise[0].frame().as_ref(), input);
            assert_eq!(bytewise[0].kind(), kind, "{input:?}");
        }
        assert_eq!(scan_one(b":-9223372036854775808\r\n").kind(), Integer);
        assert_eq!(scan_one(b":10\r\n").kind(), Integer);

        let rejected: &[(&[u8], ReplyError)] = &[
            // Integers: leading zeros, negative zero, signs, spaces, overflow.
            (b":007\r\n", InvalidValue("integer")),
            (b":00\r\n", InvalidValue("integer")),
            (b":01\r\n", InvalidValue("integer")),
            (b":-0\r\n", InvalidValue("integer")),
            (b":-00\r\n", InvalidValue("integer")),
            (b":-01\r\n", InvalidValue("integer")),
            (b":+1\r\n", InvalidValue("integer")),
            (b": 1\r\n", InvalidValue("integer")),
            (b":1 \r\n", InvalidValue("integer")),
            (b":--1\r\n", InvalidValue("integer")),
            (b":-9223372036854775809\r\n", InvalidValue("integer")),
            (b":0000000000000000000001\r\n", InvalidValue("integer")),
            (b"*1\r\n:-0\r\n", InvalidValue("integer")),
            // Lengths and counts: leading zeros, negative zero, non-canonical null.
            (b"$03\r\nbar\r\n", InvalidLength),
            (b"$00\r\n\r\n", InvalidLength),
            (b"$-0\r\n", InvalidLength),
            (b"$-00\r\n", InvalidLength),
            (b"$-01\r\n", InvalidLength),
            (b"*01\r\n:1\r\n", InvalidLength),
            (b"*00\r\n", InvalidLength),
            (b"*-0\r\n", InvalidLength),
            (b"*-00\r\n", InvalidLength),
            (b"*-01\r\n", InvalidLength),
            (b"*+1\r\n:1\r\n", InvalidLength),
            (b"%01\r\n", InvalidLength),
            (b"%-0\r\n", InvalidLength),
            (b"~00\r\n", InvalidLength),
            (b">-0\r\n", InvalidLength),
            (b"|01\r\n", InvalidLength),
            (b"!01\r\n", InvalidLength),
            (b"!-0\r\n", InvalidLength),
            (b"=04\r\n", InvalidLength),
            (b"=-0\r\n", InvalidLength),
            (b"*1\r\n$-01\r\n", InvalidLength),
            // Null only for `$` and `*`.
            (b"%-1\r\n", InvalidLength),
            (b">-1\r\n", InvalidLength),
            (b"!-1\r\n", InvalidLength),
            // Doubles: only the RESP3 grammar, not all of `f64::from_str`.
            (b",+1\r\n", InvalidValue("double")),
            (b",infinity\r\n", InvalidValue("double")),
            (b",INF\r\n", InvalidValue("double")),
            (b",Inf\r\n", InvalidValue("double")),
            (b",+inf\r\n", InvalidValue("double")),
            (b",NaN\r\n", InvalidValue("double")),
            (b",-nan\r\n", InvalidValue("double")),
            (b",nan0\r\n", InvalidValue("double")),
            (b",.5\r\n", InvalidValue("double")),
            (b",-.5\r\n", InvalidValue("double")),
            (b",1.\r\n", InvalidValue("double")),
            (b",1.e5\r\n", InvalidValue("double")),
            (b",-\r\n", InvalidValue("double")),
            (b",1e\r\n", InvalidValue("double")),
            (b",1e+\r\n", InvalidValue("double")),
            (b",1.5E-\r\n", InvalidValue("double")),
            (b",e5\r\n", InvalidValue("double")),
            (b",1e5.5\r\n", InvalidValue("double")),
            (b",1.2.3\r\n", InvalidValue("double")),
            (b",1,5\r\n", InvalidValue("double")),
            (b",--1\r\n", InvalidValue("double")),
            (b", 1\r\n", InvalidValue("double")),
            (b",1 \r\n", InvalidValue("double")),
            (b",0x10\r\n", InvalidValue("double")),
            (b",1_0\r\n", InvalidValue("double")),
            (b"*1\r\n,.5\r\n", InvalidValue("double")),
        ];
        for (input, err) in rejected {
            assert_eq!(scan_all(input).unwrap_err(), *err, "{input:?}");
            let got = scan_chunked(input, 1, ReplyLimits::default()).unwrap_err();
            assert_eq!(got, *err, "{input:?} byte by byte");
        }
    }

    #[test]
    fn header_without_terminator_is_bounded() {
        let mut sc = ReplyScanner::new(ReplyLimits::default());
        let mut buf = BytesMut::from(&b"$1"[..]);
        assert_eq!(sc.next(&mut buf).unwrap(), None);
        buf.extend_from_slice(&[b'0'; 40]);
        assert_eq!(sc.next(&mut buf).unwrap_err(), ReplyError::InvalidLength);
    }

    #[test]
    fn configured_limits() {
        let limits = ReplyLimits {
            max_bulk_len: 10,
            max_depth: 2,
        };
        let scan = |i: &[u8]| scan_chunked(i, i.len(), limits);
        assert!(scan(b"$10\r\n0123456789\r\n").is_ok());
        assert_eq!(
            scan(b"$11\r\n").unwrap_err(),
            ReplyError::BulkTooLong { len: 11, limit: 10 }
        );
        assert!(scan(b"=11\r\n").is_err());
        assert!(scan(b"!11\r\n").is_err());
        assert!(scan(b"+0123456789\r\n").is_ok());
        assert_eq!(
            scan(b"+0123456789A").unwrap_err(),
            ReplyError::LineTooLong { limit: 10 }
        );
        assert!(scan(b"-0123456789A\r\n").is_err());
        assert!(scan(b"*1\r\n*1\r\n:1\r\n").is_ok());
        assert_eq!(
            scan(b"*1\r\n*1\r\n*0\r\n").unwrap_err(),
            ReplyError::TooDeep { limit: 2 }
        );
        assert_eq!(ReplyLimits::default().max_bulk_len, 512 * 1024 * 1024);
        assert_eq!(ReplyLimits::default().max_depth, 10_000);
    }

    #[test]
    fn accessors() {
        let r = scan_one(b"-READONLY You can't write against a read only replica.\r\n");
        assert_eq!(r.error_code(), Some(&b"READONLY"[..]));
        assert_eq!(
            r.text(),
            Some(&b"READONLY You can't write against a read only replica."[..])
        );
        assert_eq!(scan_one(b"-ERR\r\n").error_code(), Some(&b"ERR"[..]));
        let blob = scan_one(b"!21\r\nSYNTAX invalid syntax\r\n");
        assert_eq!(blob.error_code(), Some(&b"SYNTAX"[..]));
        let attr_err = scan_one(b"|1\r\n+a\r\n+b\r\n-MOVED 1 x:1\r\n");
        assert_eq!(attr_err.error_code(), Some(&b"MOVED"[..]));
        assert_eq!(scan_one(b"+OK\r\n").error_code(), None);
        assert_eq!(scan_one(b"+OK\r\n").text(), Some(&b"OK"[..]));
        assert_eq!(scan_one(b"$3\r\nbar\r\n").text(), Some(&b"bar"[..]));
        assert_eq!(
            scan_one(b"=15\r\ntxt:Some string\r\n").text(),
            Some(&b"Some string"[..])
        );
        assert_eq!(scan_one(b"$-1\r\n").text(), None);
        assert_eq!(scan_one(b":42\r\n").text(), None);
        assert_eq!(scan_one(b"+OK\r\n").items(), None);
        assert_eq!(scan_one(b"*-1\r\n").items(), None);
        assert_eq!(scan_one(b"*0\r\n").items(), Some(vec![]));
        let r = scan_one(b"*4\r\n:1\r\n$3\r\nab\n\r\n:2\r\n$0\r\n\r\n");
        assert_eq!(r.kind(), Array);
    }

    #[test]
    fn items_for_pubsub_role_and_push() {
        let sub = scan_one(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n");
        assert_eq!(
            sub.items(),
            Some(vec![
                Item::Str(b"subscribe"),
                Item::Str(b"ch"),
                Item::Int(1)
            ])
        );
        let msg = scan_one(b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n");
        assert_eq!(
            msg.items(),
            Some(vec![
                Item::Str(b"message"),
                Item::Str(b"ch"),
                Item::Str(b"hello")
            ])
        );
        let inval = scan_one(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nfoo\r\n");
        assert_eq!(
            inval.items(),
            Some(vec![Item::Str(b"invalidate"), Item::Other])
        );
        // ROLE on a master with two replicas.
        let role = scan_one(
            b"*3\r\n$6\r\nmaster\r\n:3129659\r\n*2\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9001\r\n\
              $7\r\n3129242\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9002\r\n$7\r\n3129543\r\n",
        );
        assert_eq!(
            role.items(),
            Some(vec![
                Item::Str(b"master"),
                Item::Int(3_129_659),
                Item::Other
            ])
        );
        // ROLE on a replica.
        let role = scan_one(
            b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:9000\r\n$9\r\nconnected\r\n:3167038\r\n",
        );
        assert_eq!(
            role.items(),
            Some(vec![
                Item::Str(b"slave"),
                Item::Str(b"127.0.0.1"),
                Item::Int(9000),
                Item::Str(b"connected"),
                Item::Int(3_167_038),
            ])
        );
        // Mixed element kinds, nested aggregates and attributes are skipped whole.
        let mixed = scan_one(
            b"*9\r\n+s\r\n$-1\r\n*-1\r\n_\r\n=8\r\nmkd:# hi\r\n%1\r\n*1\r\n:1\r\n~1\r\n#t\r\n\
              |1\r\n+a\r\n*2\r\n:1\r\n:2\r\n:7\r\n-ERR e\r\n,1.5\r\n",
        );
        assert_eq!(
            mixed.items(),
            Some(vec![
                Item::Str(b"s"),
                Item::Null,
                Item::Null,
                Item::Null,
                Item::Str(b"# hi"),
                Item::Other,
                Item::Int(7),
                Item::Other,
                Item::Other,
            ])
        );
        let set = scan_one(b"~2\r\n+a\r\n:1\r\n");
        assert_eq!(set.items(), Some(vec![Item::Str(b"a"), Item::Int(1)]));
        let map = scan_one(b"%2\r\n+proto\r\n:3\r\n+modules\r\n*0\r\n");
        assert_eq!(
            map.items(),
            Some(vec![
                Item::Str(b"proto"),
                Item::Int(3),
                Item::Str(b"modules"),
                Item::Other
            ])
        );
        let attr_top = scan_one(b"|1\r\n+a\r\n+b\r\n*1\r\n:5\r\n");
        assert_eq!(attr_top.items(), Some(vec![Item::Int(5)]));
    }

    /// Tiny deterministic PRNG (xorshift64*) so the property test needs no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, max: u64) -> Vec<u8> {
            (0..self.below(max + 1))
                .map(|_| self.next() as u8)
                .collect()
        }
        fn text(&mut self, max: u64) -> Vec<u8> {
            (0..self.below(max + 1))
                .map(|_| b"abcXYZ 019:-_*$"[self.below(15) as usize])
                .collect()
        }
    }

    mod gen {
        use super::Rng;
        use redis_protocol::resp3::types::{OwnedFrame, VerbatimStringFormat};

        fn attrs(
            rng: &mut Rng,
            depth: u32,
        ) -> Option<redis_protocol::resp3::types::OwnedAttributes> {
            if rng.below(5) != 0 {
                return None;
            }
            let mut a = redis_protocol::resp3::types::OwnedAttributes::default();
            for _ in 0..rng.below(3) {
                a.insert(key(rng), frame(rng, depth + 1));
            }
            Some(a)
        }

        fn key(rng: &mut Rng) -> OwnedFrame {
            match rng.below(3) {
                0 => OwnedFrame::BlobString {
                    data: rng.bytes(8),
                    attributes: None,
                },
                1 => OwnedFrame::SimpleString {
                    data: rng.text(8),
                    attributes: None,
                },
                _ => OwnedFrame::Number {
                    data: rng.next() as i64,
                    attributes: None,
                },
            }
        }

        pub fn frame(rng: &mut Rng, depth: u32) -> OwnedFrame {
            let leaf_only = depth >= 5;
            let choice = rng.below(if leaf_only { 10 } else { 14 });
            let attributes = attrs(rng, depth);
            match choice {
                0 => OwnedFrame::BlobString {
                    data: rng.bytes(40),
                    attributes,
                },
                1 => OwnedFrame::BlobError {
                    data: rng.bytes(20),
                    attributes,
                },
                2 => OwnedFrame::SimpleString {
                    data: rng.text(20),
                    attributes,
                },
                3 => OwnedFrame::SimpleError {
                    data: String::from_utf8(rng.text(20)).unwrap_or_default(),
                    attributes,
                },
                4 => OwnedFrame::Boolean {
                    data: rng.below(2) == 0,
                    attributes,
                },
                5 => OwnedFrame::Null,
                6 => OwnedFrame::Number {
                    data: rng.next() as i64,
                    attributes,
                },
                7 => OwnedFrame::Double {
                    data: match rng.below(4) {
                        0 => f64::from_bits(rng.next()),
                        1 => f64::INFINITY,
                        2 => f64::NEG_INFINITY,
                        _ => (rng.next() as i64) as f64 / 1000.0,
                    },
                    attributes,
                },
                8 => {
                    let mut data = if rng.below(2) == 0 {
                        b"-".to_vec()
                    } else {
                        vec![]
                    };
                    data.extend((0..1 + rng.below(60)).map(|_| b'0' + rng.below(10) as u8));
                    OwnedFrame::BigNumber { data, attributes }
                }
                9 => OwnedFrame::VerbatimString {
                    data: rng.bytes(30),
                    format: if rng.below(2) == 0 {
                        VerbatimStringFormat::Text
                    } else {
                        VerbatimStringFormat::Markdown
                    },
                    attributes,
                },
                10 => OwnedFrame::Array {
                    data: (0..rng.below(6)).map(|_| frame(rng, depth + 1)).collect(),
                    attributes,
                },
                11 => OwnedFrame::Push {
                    data: (0..rng.below(6)).map(|_| frame(rng, depth + 1)).collect(),
                    attributes,
                },
                12 => {
                    let mut data = redis_protocol::resp3::types::FrameSet::default();
                    for _ in 0..rng.below(6) {
                        data.insert(key(rng));
                    }
                    OwnedFrame::Set { data, attributes }
                }
                _ => {
                    let mut data = redis_protocol::resp3::types::FrameMap::default();
                    for _ in 0..rng.below(5) {
                        data.insert(key(rng), frame(rng, depth + 1));
                    }
                    OwnedFrame::Map { data, attributes }
                }
            }
        }
    }

    fn expected_kind(f: &redis_protocol::resp3::types::OwnedFrame) -> ReplyKind {
        use redis_protocol::resp3::types::OwnedFrame as F;
        match f {
            F::BlobString { .. } => Bulk,
            F::BlobError { .. } => BlobError,
            F::SimpleString { .. } => Simple,
            F::SimpleError { .. } => Error,
            F::Boolean { .. } => Boolean,
            F::Null => Null,
            F::Number { .. } => Integer,
            F::Double { .. } => Double,
            F::BigNumber { .. } => BigNumber,
            F::VerbatimString { .. } => Verbatim,
            F::Array { .. } => Array,
            F::Push { .. } => Push,
            F::Set { .. } => Set,
            F::Map { .. } => Map,
            other => panic!("not generated: {other:?}"),
        }
    }

    #[test]
    fn cross_check_with_redis_protocol_encoder() {
        use redis_protocol::resp3::encode::complete::encode;
        use redis_protocol::resp3::types::Resp3Frame;

        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut with_attr = 0;
        for round in 0..300 {
            let frames: Vec<_> = (0..1 + rng.below(8))
                .map(|_| gen::frame(&mut rng, 0))
                .collect();
            let mut input = Vec::new();
            let mut spans = Vec::new();
            for f in &frames {
                let mut out = vec![0u8; f.encode_len(false)];
                let n = encode(&mut out, f, false).unwrap();
                assert_eq!(n, out.len());
                spans.push(out.clone());
                input.extend_from_slice(&out);
            }
            let chunk = 1 + rng.below(if round % 10 == 0 { 3 } else { 200 }) as usize;
            let replies = scan_chunked(&input, chunk, ReplyLimits::default())
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&input)));
            assert_eq!(replies.len(), frames.len());
            with_attr += replies.iter().filter(|r| r.has_attribute()).count();
            for ((r, f), span) in replies.iter().zip(&frames).zip(&spans) {
                assert_eq!(r.frame().as_ref(), &span[..]);
                assert_eq!(r.kind(), expected_kind(f));
                assert_eq!(r.has_attribute(), span.first() == Some(&b'|'));
                if let Some(items) = r.items() {
                    let expected = match f {
                        redis_protocol::resp3::types::OwnedFrame::Map { data, .. } => {
                            data.len() * 2
                        }
                        other => other.len(),
                    };
                    assert_eq!(items.len(), expected);
                }
            }
        }
        assert!(with_attr > 10, "generator should exercise attributes");
    }

    /// `next_in_place` + `split_scanned`, splitting after a random number of replies
    /// (sometimes with a reply half-read), gives the replies `next` gives.
    #[test]
    fn in_place_runs_give_the_replies_next_gives() {
        use redis_protocol::resp3::encode::complete::encode;
        use redis_protocol::resp3::types::Resp3Frame;

        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..300 {
            let mut input = Vec::new();
            for _ in 0..1 + rng.below(12) {
                let f = gen::frame(&mut rng, 0);
                let mut out = vec![0u8; f.encode_len(false)];
                let n = encode(&mut out, &f, false).unwrap();
                input.extend_from_slice(&out[..n]);
            }
            let chunk = 1 + rng.below(if round % 10 == 0 { 4 } else { 150 }) as usize;
            let want = scan_chunked(&input, chunk, ReplyLimits::default()).unwrap();

            let mut sc = ReplyScanner::new(ReplyLimits::default());
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut shapes = Vec::new();
            let mut split = |sc: &mut ReplyScanner, buf: &mut BytesMut, shapes: &mut Vec<_>| {
                let run = sc.split_scanned(buf);
                let mut start = 0;
                for shape in shapes.drain(..) {
                    let shape: ReplyShape = shape;
                    got.push(Reply::from_shape(run.slice(start..shape.end), &shape));
                    start = shape.end;
                }
                assert_eq!(start, run.len());
            };
            for piece in input.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(shape) = sc.next_in_place(&mut buf).unwrap() {
                    shapes.push(shape);
                    if rng.below(3) == 0 {
                        split(&mut sc, &mut buf, &mut shapes);
                    }
                }
                if rng.below(2) == 0 {
                    split(&mut sc, &mut buf, &mut shapes);
                }
            }
            split(&mut sc, &mut buf, &mut shapes);
            assert!(buf.is_empty(), "leftover bytes: {buf:?}");
            assert_eq!(got, want, "round {round}");
        }
    }

    #[test]
    fn cross_check_truncated_is_incomplete_never_error() {
        use redis_protocol::resp3::encode::complete::encode;
        use redis_protocol::resp3::types::Resp3Frame;

        let mut rng = Rng(42);
        for _ in 0..100 {
            let f = gen::frame(&mut rng, 0);
            let mut out = vec![0u8; f.encode_len(false)];
            encode(&mut out, &f, false).unwrap();
            for cut in 0..out.len() {
                let mut sc = ReplyScanner::new(ReplyLimits::default());
                let mut buf = BytesMut::from(&out[..cut]);
                assert_eq!(sc.next(&mut buf).unwrap(), None);
            }
        }
    }
}
