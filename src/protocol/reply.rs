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

/// Largest bulk length Redis accepts by default (`proto-max-bulk-len`, 512 MiB).
pub const DEFAULT_MAX_BULK_LEN: usize = 512 * 1024 * 1024;
/// Default bound on aggregate nesting; Redis itself never nests replies this deep.
pub const DEFAULT_MAX_DEPTH: usize = 128;
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
        }
    }

    /// The limits this scanner enforces.
    pub fn limits(&self) -> ReplyLimits {
        self.limits
    }

    /// Whether part of a reply has been scanned but not yet returned.
    pub fn is_mid_reply(&self) -> bool {
        self.pos != 0 || self.bulk_end.is_some()
    }

    /// Next complete top-level reply from the front of `buf`, split off zero-copy.
    ///
    /// `Ok(None)`: need more bytes; the caller appends to `buf` and calls again (bytes
    /// already scanned are not rescanned). Between calls the caller must only append to
    /// `buf`. After an `Err` the state is undefined: close the backend connection.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        loop {
            if let Some((end, ty)) = self.bulk_end {
                if buf.len() < end {
                    return Ok(None);
                }
                finish_bulk(buf, self.pos, end, ty)?;
                self.bulk_end = None;
                self.pos = end;
                if self.complete_value() {
                    return Ok(Some(self.emit(buf)));
                }
                continue;
            }

            let start = self.pos;
            let Some(&ty) = buf.get(start) else {
                return Ok(None);
            };
            let max_line = match ty {
                b'+' | b'-' | b',' | b'(' => self.limits.max_bulk_len,
                _ => MAX_HEADER_LINE,
            };
            let Some(line_end) = self.find_line(buf, start + 1, max_line)? else {
                return Ok(None);
            };
            let line = buf.get(start + 1..line_end).unwrap_or_default();
            let after = line_end + 2;
            let top = self.stack.is_empty();

            let leaf = match ty {
                b'+' => ReplyKind::Simple,
                b'-' => ReplyKind::Error,
                b':' => {
                    parse_i64(line).ok_or(ReplyError::InvalidValue("integer"))?;
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
                            return Ok(Some(self.emit(buf)));
                        }
                        continue;
                    }
                }
                b';' | b'.' => return Err(ReplyError::Streamed),
                other => return Err(ReplyError::UnexpectedByte(other)),
            };

            if top {
                self.kind = leaf;
                self.value_start = start;
            }
            self.pos = after;
            if self.complete_value() {
                return Ok(Some(self.emit(buf)));
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
        match memchr::memchr2(b'\r', b'\n', hay) {
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
        self.scan_from = 0;
        self.has_attribute = false;
        self.value_start = 0;
        reply
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

/// Strict decimal i64: optional `-`, then 1..=19 digits, no overflow.
fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub(d)?
        } else {
            v.checked_add(d)?
        };
    }
    Some(v)
}

/// A length or count header: a valid i64 (`?` means streamed RESP3).
fn parse_len(s: &[u8]) -> Result<i64, ReplyError> {
    if s == b"?" {
        return Err(ReplyError::Streamed);
    }
    parse_i64(s).ok_or(ReplyError::InvalidLength)
}

/// RESP3 double: what Rust parses as f64 (covers `inf`, `-inf`, `nan`, exponents).
fn valid_double(s: &[u8]) -> bool {
    std::str::from_utf8(s)
        .ok()
        .is_some_and(|t| t.parse::<f64>().is_ok())
}

/// RESP3 big number: optional `-`, then one or more digits.
fn valid_big_number(s: &[u8]) -> bool {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

impl Reply {
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

    /// Value of an `:` integer reply.
    pub fn integer(&self) -> Option<i64> {
        let mut pos = self.value_start;
        match read_value(&self.frame, &mut pos)? {
            Value::Line(b':', line) => parse_i64(line),
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
                Value::Line(b':', line) => Item::Int(parse_i64(line)?),
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
            let len = parse_i64(line)?;
            if len < 0 {
                return Some(Value::Null);
            }
            let len = usize::try_from(len).ok()?;
            let body = b.get(*pos..pos.checked_add(len)?)?;
            *pos += len + 2;
            Some(Value::Bulk(ty, body))
        }
        b'*' | b'%' | b'~' | b'>' | b'|' => {
            let n = parse_i64(line)?;
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

    fn scan_all(input: &[u8]) -> Result<Vec<Reply>, ReplyError> {
        let mut sc = ReplyScanner::new(ReplyLimits::default());
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(r) = sc.next(&mut buf)? {
            out.push(r);
        }
        assert!(buf.is_empty(), "leftover bytes: {buf:?}");
        Ok(out)
    }

    #[test]
    fn smoke() {
        let r = scan_all(b"+OK\r\n$3\r\nbar\r\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].kind(), ReplyKind::Simple);
        assert_eq!(r[1].text(), Some(&b"bar"[..]));
    }
}
