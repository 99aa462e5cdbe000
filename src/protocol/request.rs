//! Request parser: client bytes → `Request` (argv + canonical RESP frame to forward).
//!
//! Mirrors Redis 7.x `processInputBuffer` / `processInlineBuffer` /
//! `processMultibulkBuffer` / `sdssplitargs` exactly (see shared/research/redis-attacks.md §4).
//! Incremental: progress is kept between calls, bytes already scanned are never scanned again.
//! Bounded: never allocates from a declared length beyond what has arrived, except one
//! `reserve` for a bulk of at least 32 KiB whose header has arrived (as Redis does), capped by
//! `max_bulk_len`. The frame handed out is always canonical RESP, so lenient framing
//! accepted from the client can never reach the backend as something else.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Redis `PROTO_INLINE_MAX_SIZE`: longest inline line / count line without terminator.
pub const DEFAULT_MAX_INLINE_LEN: usize = 64 * 1024;
/// Redis `proto-max-bulk-len` default.
pub const DEFAULT_MAX_BULK_LEN: usize = super::PROTO_MAX_BULK_LEN;
/// Redis 7 multibulk count bound (`INT_MAX`).
pub const DEFAULT_MAX_MULTIBULK_LEN: usize = i32::MAX as usize;
/// Pre-authentication multibulk count bound (CVE-2021-32675 fix).
pub const UNAUTHENTICATED_MAX_MULTIBULK_LEN: usize = 10;
/// Pre-authentication bulk length bound (CVE-2021-32675 fix).
pub const UNAUTHENTICATED_MAX_BULK_LEN: usize = 16384;
/// Redis `PROTO_MBULK_BIG_ARG`: from this size on, buffer room for the whole bulk is reserved.
const BIG_ARG: usize = 32 * 1024;
/// Redis `LONG_STR_SIZE`: `string2ll` rejects strings this long or longer.
const LONG_STR_SIZE: usize = 21;
/// Arguments stored without a heap allocation.
const INLINE_SPANS: usize = 8;

/// Input limits; defaults mirror Redis's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest bulk string (`proto-max-bulk-len`, 512 MiB).
    pub max_bulk_len: usize,
    /// Largest multibulk count (Redis 7: INT_MAX).
    pub max_multibulk_len: usize,
    /// Longest inline line / count line without a terminator (64 KiB).
    pub max_inline_len: usize,
    /// Also apply Redis's pre-auth bounds (10 elements, 16384-byte bulks) and their messages.
    pub unauthenticated: bool,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_bulk_len: DEFAULT_MAX_BULK_LEN,
            max_multibulk_len: DEFAULT_MAX_MULTIBULK_LEN,
            max_inline_len: DEFAULT_MAX_INLINE_LEN,
            unauthenticated: false,
        }
    }
}

/// A protocol error; `Display` is Redis's exact text without the `-ERR ` prefix,
/// e.g. `Protocol error: invalid multibulk length`.
///
/// One exception: for `ExpectedDollar` with a byte ≥ 0x80 Redis sends the raw byte, which a
/// `String` cannot hold; `Display` writes `\xHH` there and [`ProtocolError::to_reply`] gives
/// the exact wire bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Inline line longer than `max_inline_len` without `\n`.
    #[error("Protocol error: too big inline request")]
    TooBigInlineRequest,
    /// `sdssplitargs` failed: unterminated quote, or closing quote not followed by a space.
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// `*` count line longer than `max_inline_len` without `\r`.
    #[error("Protocol error: too big mbulk count string")]
    TooBigMultibulkCount,
    /// Count is not a canonical integer or exceeds `max_multibulk_len`.
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    /// Count above the pre-auth bound.
    #[error("Protocol error: unauthenticated multibulk length")]
    UnauthenticatedMultibulkLength,
    /// An element did not start with `$` (the byte found).
    #[error("Protocol error: expected '$', got '{}'", ShownByte(*.0))]
    ExpectedDollar(u8),
    /// `$` length line longer than `max_inline_len` without `\r`.
    #[error("Protocol error: too big bulk count string")]
    TooBigBulkCount,
    /// Bulk length is not a canonical integer, negative, or exceeds `max_bulk_len`.
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// Bulk length above the pre-auth bound.
    #[error("Protocol error: unauthenticated bulk length")]
    UnauthenticatedBulkLength,
}

impl ProtocolError {
    /// The exact bytes Redis sends for this error: `-ERR <text>\r\n`.
    pub fn to_reply(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        out.put_slice(b"-ERR ");
        match self {
            ProtocolError::ExpectedDollar(byte) => {
                out.put_slice(b"Protocol error: expected '$', got '");
                out.put_u8(redis_error_byte(*byte));
                out.put_slice(b"'");
            }
            other => out.put_slice(other.to_string().as_bytes()),
        }
        out.put_slice(b"\r\n");
        out.freeze()
    }
}

/// Redis maps `\r` and `\n` inside error texts to spaces (`addReplyErrorFormat`).
fn redis_error_byte(byte: u8) -> u8 {
    match byte {
        b'\r' | b'\n' => b' ',
        other => other,
    }
}

/// `Display` form of the byte in `expected '$', got '%c'`.
struct ShownByte(u8);

impl std::fmt::Display for ShownByte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let byte = redis_error_byte(self.0);
        if byte.is_ascii() {
            write!(f, "{}", char::from(byte))
        } else {
            write!(f, "\\x{byte:02x}")
        }
    }
}

/// Byte range of one argument inside a frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// A span kept inline: 32-bit offsets, so a request (moved through the session by value)
/// stays small. A frame of 4 GiB or more keeps its spans in the `Large` form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PackedSpan {
    start: u32,
    end: u32,
}

impl PackedSpan {
    fn pack(span: Span) -> Option<PackedSpan> {
        Some(PackedSpan {
            start: u32::try_from(span.start).ok()?,
            end: u32::try_from(span.end).ok()?,
        })
    }

    fn unpack(self) -> Span {
        Span {
            start: self.start as usize,
            end: self.end as usize,
        }
    }
}

/// Argument ranges; up to `INLINE_SPANS` without a heap allocation.
#[derive(Debug, Clone)]
enum Spans {
    Small {
        len: u8,
        items: [PackedSpan; INLINE_SPANS],
    },
    Large(Vec<Span>),
}

impl Spans {
    fn new() -> Self {
        Spans::Small {
            len: 0,
            items: [PackedSpan::default(); INLINE_SPANS],
        }
    }

    #[inline]
    fn push(&mut self, span: Span) {
        match self {
            Spans::Small { len, items } => {
                let slot = items.get_mut(usize::from(*len));
                if let (Some(slot), Some(packed)) = (slot, PackedSpan::pack(span)) {
                    *slot = packed;
                    *len += 1;
                } else {
                    self.spill(span);
                }
            }
            Spans::Large(vec) => vec.push(span),
        }
    }

    /// Move the inline spans to a vector and add `span` (more arguments than fit
    /// inline, or offsets past what a packed span holds): out of the inlined path.
    #[cold]
    #[inline(never)]
    fn spill(&mut self, span: Span) {
        let Spans::Small { len, items } = self else {
            return;
        };
        // Grows with arrived elements only, never from the declared count.
        let mut spilled = Vec::with_capacity(INLINE_SPANS * 2);
        spilled.extend(items.iter().take(usize::from(*len)).map(|p| p.unpack()));
        spilled.push(span);
        *self = Spans::Large(spilled);
    }

    /// Empty again (the inline slots are not rewritten: `len` bounds what is read).
    fn clear(&mut self) {
        match self {
            Spans::Small { len, .. } => *len = 0,
            Spans::Large(_) => *self = Spans::new(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Spans::Small { len, .. } => usize::from(*len),
            Spans::Large(vec) => vec.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, i: usize) -> Option<Span> {
        match self {
            Spans::Small { len, items } => items
                .get(..usize::from(*len))
                .and_then(|items| items.get(i))
                .map(|p| p.unpack()),
            Spans::Large(vec) => vec.get(i).copied(),
        }
    }

    fn iter(&self) -> impl ExactSizeIterator<Item = Span> + Clone + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or_default())
    }
}

/// One parsed command.
#[derive(Debug, Clone)]
pub struct Request {
    /// Canonical RESP array of the argv; for canonical input, a slice of the read buffer.
    frame: Bytes,
    /// Where each argument lies inside `frame`.
    spans: Spans,
}

/// Equal when the argv is equal (the frame is canonical, so it determines the argv).
impl PartialEq for Request {
    fn eq(&self, other: &Self) -> bool {
        self.frame == other.frame
    }
}

impl Eq for Request {}

impl Request {
    /// Canonical RESP array encoding of the argv: the bytes to forward.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The frame alone, once the arguments are no longer needed.
    pub fn into_frame(self) -> Bytes {
        self.frame
    }

    /// Number of arguments (`argv[0]` is the command name).
    pub fn argc(&self) -> usize {
        self.spans.len()
    }

    /// Argument `i`, or `None` past the end.
    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        let span = self.spans.get(i)?;
        self.frame.get(span.start..span.end)
    }

    /// All arguments in order.
    pub fn args(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.spans
            .iter()
            .map(|span| self.frame.get(span.start..span.end).unwrap_or(&[]))
    }

    /// Builds a canonical request from an argv (proxy-generated commands, tests).
    /// An empty argv gives `*0\r\n`, which Redis ignores.
    pub fn from_args<A: AsRef<[u8]>>(args: &[A]) -> Request {
        encode(args.iter().map(AsRef::as_ref))
    }
}

/// Encodes an argv as a canonical RESP array in one exactly sized allocation.
fn encode<'a, I>(args: I) -> Request
where
    I: Iterator<Item = &'a [u8]> + Clone,
{
    let mut argc = 0usize;
    let mut size = 0usize;
    for arg in args.clone() {
        argc += 1;
        size = size.saturating_add(decimal_len(arg.len()) + 5 + arg.len());
    }
    size = size.saturating_add(decimal_len(argc) + 3);
    let mut out = BytesMut::with_capacity(size);
    let mut spans = Spans::new();
    let mut digits = itoa::Buffer::new();
    out.put_u8(b'*');
    out.put_slice(digits.format(argc).as_bytes());
    out.put_slice(b"\r\n");
    for arg in args {
        out.put_u8(b'$');
        out.put_slice(digits.format(arg.len()).as_bytes());
        out.put_slice(b"\r\n");
        let start = out.len();
        out.put_slice(arg);
        spans.push(Span {
            start,
            end: out.len(),
        });
        out.put_slice(b"\r\n");
    }
    Request {
        frame: out.freeze(),
        spans,
    }
}

/// Number of decimal digits of `n`.
fn decimal_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// Where the parser is inside the current command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between commands: the next byte decides inline or multibulk.
    Start,
    /// Looking for the `\n` ending an inline line.
    Inline,
    /// Looking for the `\r` ending the `*<count>` line.
    Count,
    /// Looking for the `\r` ending a `$<len>` line at `pos`.
    BulkHeader,
    /// Waiting for `len` payload bytes plus two (unchecked) terminator bytes at `pos`.
    Payload { len: usize },
}

/// Incremental parser state for one client connection.
///
/// Offsets are relative to the front of the caller's buffer, which always starts at the
/// current command: between calls the caller may only append to the buffer.
#[derive(Debug)]
pub struct RequestParser {
    /// Limits in force; may change between calls (e.g. after authentication).
    limits: RequestLimits,
    /// Progress inside the current command.
    state: State,
    /// Start of the current line or payload (all bytes before it belong to this command).
    pos: usize,
    /// Where the terminator search resumes: bytes in `pos..scan` were already searched.
    scan: usize,
    /// A NUL byte came before the terminator: Redis's `strchr` stops there and waits.
    nul_blocked: bool,
    /// Elements of the current multibulk not yet complete.
    remaining: usize,
    /// Every skipped terminator so far was exactly `\r\n` (zero-copy forward possible).
    canonical: bool,
    /// Argument ranges of the current multibulk, relative to the front of the buffer.
    spans: Spans,
}

impl Default for RequestParser {
    fn default() -> Self {
        RequestParser::new(RequestLimits::default())
    }
}

impl RequestParser {
    /// A parser at the start of a connection.
    pub fn new(limits: RequestLimits) -> Self {
        RequestParser {
            limits,
            state: State::Start,
            pos: 0,
            scan: 0,
            nul_blocked: false,
            remaining: 0,
            canonical: true,
            spans: Spans::new(),
        }
    }

    /// Limits in force.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// Replaces the limits; checks not yet made use the new values.
    pub fn set_limits(&mut self, limits: RequestLimits) {
        self.limits = limits;
    }

    /// Whether a command has started but is not complete (for idle timeouts).
    pub fn in_progress(&self) -> bool {
        self.state != State::Start
    }

    /// Next complete request from the front of `buf`, consuming its bytes.
    /// `Ok(None)`: need more bytes. After an `Err`, the connection must be closed.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ProtocolError> {
        if self.state == State::Start {
            if let Some((spans, end)) = self.complete_plain_multibulk(buf) {
                return Ok(Some(Request {
                    frame: buf.split_to(end).freeze(),
                    spans,
                }));
            }
        }
        loop {
            match self.state {
                State::Start => {
                    let Some(&first) = buf.first() else {
                        return Ok(None);
                    };
                    self.begin(if first == b'*' {
                        State::Count
                    } else {
                        State::Inline
                    });
                }
                State::Inline => {
                    let Some(newline) =
                        self.find_line_end(buf, b'\n', ProtocolError::TooBigInlineRequest)?
                    else {
                        return Ok(None);
                    };
                    let mut end = newline;
                    if newline > 0 && buf.get(newline - 1) == Some(&b'\r') {
                        end = newline - 1;
                    }
                    let line = buf.get(..end).unwrap_or(&[]);
                    let request = parse_inline(line)?;
                    buf.advance(newline + 1);
                    self.state = State::Start;
                    if request.is_some() {
                        return Ok(request);
                    }
                    // Empty line or only spaces: no command, go on with the rest.
                }
                State::Count => {
                    let Some(cr) =
                        self.find_line_end(buf, b'\r', ProtocolError::TooBigMultibulkCount)?
                    else {
                        return Ok(None);
                    };
                    // Redis waits for the byte after `\r` but never checks it is `\n`.
                    let Some(&after) = buf.get(cr + 1) else {
                        return Ok(None);
                    };
                    let count = buf
                        .get(1..cr)
                        .and_then(string2ll)
                        .ok_or(ProtocolError::InvalidMultibulkLength)?;
                    if count > 0 && !fits(count, self.limits.max_multibulk_len) {
                        return Err(ProtocolError::InvalidMultibulkLength);
                    }
                    if self.limits.unauthenticated
                        && count > 0
                        && !fits(count, UNAUTHENTICATED_MAX_MULTIBULK_LEN)
                    {
                        return Err(ProtocolError::UnauthenticatedMultibulkLength);
                    }
                    let end = cr + 2;
                    let Ok(count) = usize::try_from(count) else {
                        // Count < 0: the frame is silently ignored.
                        buf.advance(end);
                        self.state = State::Start;
                        continue;
                    };
                    if count == 0 {
                        buf.advance(end);
                        self.state = State::Start;
                        continue;
                    }
                    self.canonical = after == b'\n';
                    self.remaining = count;
                    self.next_line(end);
                }
                State::BulkHeader => {
                    let Some(cr) =
                        self.find_line_end(buf, b'\r', ProtocolError::TooBigBulkCount)?
                    else {
                        return Ok(None);
                    };
                    let Some(&after) = buf.get(cr + 1) else {
                        return Ok(None);
                    };
                    let first = buf.get(self.pos).copied().unwrap_or(b'\r');
                    if first != b'$' {
                        return Err(ProtocolError::ExpectedDollar(first));
                    }
                    let len = buf
                        .get(self.pos + 1..cr)
                        .and_then(string2ll)
                        .ok_or(ProtocolError::InvalidBulkLength)?;
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|&len| len <= self.limits.max_bulk_len)
                        .ok_or(ProtocolError::InvalidBulkLength)?;
                    if self.limits.unauthenticated && len > UNAUTHENTICATED_MAX_BULK_LEN {
                        return Err(ProtocolError::UnauthenticatedBulkLength);
                    }
                    self.canonical &= after == b'\n';
                    self.pos = cr + 2;
                    self.state = State::Payload { len };
                    self.reserve_payload(buf, len);
                }
                State::Payload { len } => {
                    let end = self.pos.saturating_add(len);
                    // Redis skips the two bytes after the payload without checking them.
                    let Some(trailer) = buf.get(end..end.saturating_add(2)) else {
                        return Ok(None);
                    };
                    self.canonical &= trailer == b"\r\n";
                    self.spans.push(Span {
                        start: self.pos,
                        end,
                    });
                    self.remaining = self.remaining.saturating_sub(1);
                    if self.remaining == 0 {
                        return Ok(Some(self.finish_multibulk(buf, end + 2)));
                    }
                    self.next_line(end + 2);
                }
            }
        }
    }

    /// The common case in one pass: a complete multibulk at the front of `buf`, in
    /// canonical form (`\r\n` everywhere), whose count and lengths are plain decimals
    /// (`0` or no leading zero) within every limit. Its argument spans and its length.
    ///
    /// Anything else (incomplete, non-canonical, a sign, an error to report, a limit hit)
    /// is `None` and consumes nothing: the state machine then reads the same bytes. So
    /// this only ever accepts what the state machine accepts, with the same result; it
    /// runs once per command start, never again for the rest of a partial command.
    fn complete_plain_multibulk(&self, buf: &[u8]) -> Option<(Spans, usize)> {
        if buf.first() != Some(&b'*') {
            return None;
        }
        let limits = &self.limits;
        let (count, mut pos) = plain_header(buf, 0, limits.max_inline_len)?;
        let count_limit = if limits.unauthenticated {
            limits
                .max_multibulk_len
                .min(UNAUTHENTICATED_MAX_MULTIBULK_LEN)
        } else {
            limits.max_multibulk_len
        };
        if count == 0 || count > count_limit {
            return None;
        }
        let len_limit = if limits.unauthenticated {
            limits.max_bulk_len.min(UNAUTHENTICATED_MAX_BULK_LEN)
        } else {
            limits.max_bulk_len
        };
        let mut spans = Spans::new();
        for _ in 0..count {
            if buf.get(pos) != Some(&b'$') {
                return None;
            }
            let (len, start) = plain_header(buf, pos, limits.max_inline_len)?;
            if len > len_limit {
                return None;
            }
            let end = start.checked_add(len)?;
            if buf.get(end..end.checked_add(2)?)? != b"\r\n" {
                return None;
            }
            spans.push(Span { start, end });
            pos = end + 2;
        }
        Some((spans, pos))
    }

    /// Resets per-command progress.
    fn begin(&mut self, state: State) {
        self.state = state;
        self.pos = 0;
        self.scan = 0;
        self.nul_blocked = false;
        self.remaining = 0;
        self.canonical = true;
        self.spans.clear();
    }

    /// Moves to the `$<len>` line starting at `pos`.
    fn next_line(&mut self, pos: usize) {
        self.state = State::BulkHeader;
        self.pos = pos;
        self.scan = pos;
        self.nul_blocked = false;
    }

    /// Finds `needle` in the line starting at `self.pos`, resuming where the last call stopped.
    ///
    /// Redis searches with `strchr`, which also stops at a NUL byte: then no terminator is
    /// found, ever, and Redis keeps buffering until the line is too big. We do the same (the
    /// connection hangs until the limit or the idle timeout), which keeps the two parsers in
    /// agreement. The limit is applied as Redis applies it to bytes arriving one at a time
    /// (error once more than `max_inline_len` bytes are buffered without terminator), so the
    /// result does not depend on how the input was split into reads; Redis, reading 16 KiB
    /// at a time, may accept a slightly longer line whose terminator arrives in the same read.
    fn find_line_end(
        &mut self,
        buf: &[u8],
        needle: u8,
        too_big: ProtocolError,
    ) -> Result<Option<usize>, ProtocolError> {
        let limit = self.limits.max_inline_len;
        if !self.nul_blocked {
            let window_end = buf
                .len()
                .min(self.pos.saturating_add(limit).saturating_add(1));
            let from = self.scan.max(self.pos);
            if let Some(window) = buf.get(from..window_end) {
                match super::find_either(needle, 0, window) {
                    Some(offset) => {
                        let at = from + offset;
                        if window.get(offset) == Some(&needle) {
                            self.scan = at;
                            return Ok(Some(at));
                        }
                        self.nul_blocked = true;
                        self.scan = at;
                    }
                    None => self.scan = window_end,
                }
            }
        }
        if buf.len().saturating_sub(self.pos) > limit {
            Err(too_big)
        } else {
            Ok(None)
        }
    }

    /// Reserves room for the rest of a big bulk once, so the read loop does not regrow the
    /// buffer (and copy it) many times. Never more than the declared length still missing.
    fn reserve_payload(&self, buf: &mut BytesMut, len: usize) {
        if len < BIG_ARG {
            return;
        }
        let have = buf.len().saturating_sub(self.pos);
        let missing = len
            .saturating_add(2)
            .saturating_sub(have)
            .min(self.limits.max_bulk_len);
        buf.reserve(missing);
    }

    /// Splits the completed multibulk (`end` bytes) off `buf`.
    fn finish_multibulk(&mut self, buf: &mut BytesMut, end: usize) -> Request {
        self.state = State::Start;
        let spans = std::mem::replace(&mut self.spans, Spans::new());
        if self.canonical {
            // Zero-copy: the received bytes are already the canonical encoding.
            return Request {
                frame: buf.split_to(end).freeze(),
                spans,
            };
        }
        let raw: &[u8] = buf;
        let request = encode(
            spans
                .iter()
                .map(|span| raw.get(span.start..span.end).unwrap_or(&[])),
        );
        buf.advance(end);
        request
    }
}

/// A header line at `at` (`*` or `$`, then digits, then `\r\n`) whose number is `0` or
/// has no leading zero and at most 18 digits, its `\r` within `max_line` bytes of `at`
/// (where the state machine's search for it stops): the number and the offset after
/// the line. `None` for anything else, including a line not complete yet.
fn plain_header(buf: &[u8], at: usize, max_line: usize) -> Option<(usize, usize)> {
    let digits_at = at + 1;
    let mut value: u64 = 0;
    let mut i = digits_at;
    while let Some(&b) = buf.get(i) {
        if !b.is_ascii_digit() {
            break;
        }
        if i - digits_at == 18 {
            return None;
        }
        value = value * 10 + u64::from(b - b'0');
        i += 1;
    }
    let digits = i - digits_at;
    let leading_zero = digits > 1 && buf.get(digits_at) == Some(&b'0');
    if digits == 0 || leading_zero || i - at > max_line {
        return None;
    }
    if buf.get(i..i + 2)? != b"\r\n" {
        return None;
    }
    Some((usize::try_from(value).ok()?, i + 2))
}

/// Whether a non-negative `count` is at most `max`.
fn fits(count: i64, max: usize) -> bool {
    u64::try_from(count)
        .ok()
        .and_then(|c| usize::try_from(c).ok())
        .is_some_and(|c| c <= max)
}

/// Redis `string2ll` (src/util.c): `0` or `-?[1-9][0-9]*`, fitting i64, shorter than 21 bytes.
/// Also the reply scanner's rule for integers and length/count headers.
pub(crate) fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= LONG_STR_SIZE {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut value: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        0i64.checked_sub_unsigned(value)
    } else {
        i64::try_from(value).ok()
    }
}

/// Splits an inline line (without its `\n` / `\r\n`) and encodes it; `None` for no args.
///
/// Allocates the unescaped bytes and the frame (and a span list above 8 args): inline
/// commands are rare (telnet, scripts, attacks) and always re-encoded.
fn parse_inline(line: &[u8]) -> Result<Option<Request>, ProtocolError> {
    let mut unescaped = Vec::with_capacity(line.len());
    let mut spans = Spans::new();
    split_args(line, &mut unescaped, &mut spans)?;
    if spans.is_empty() {
        return Ok(None);
    }
    Ok(Some(encode(spans.iter().map(|span| {
        unescaped.get(span.start..span.end).unwrap_or(&[])
    }))))
}

/// C `isspace` in the C locale.
fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Value of an ASCII hex digit.
fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Redis `sdssplitargs` (src/sds.c), step for step; the end of `line` plays the C NUL.
/// Appends each argument's bytes to `out` and its range to `spans`.
fn split_args(line: &[u8], out: &mut Vec<u8>, spans: &mut Spans) -> Result<(), ProtocolError> {
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut p = 0usize;
    loop {
        while at(p) != 0 && is_space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Ok(());
        }
        let start = out.len();
        let mut in_double = false;
        let mut in_single = false;
        let mut done = false;
        while !done {
            let c = at(p);
            if in_double {
                let hex = (c == b'\\' && at(p + 1) == b'x')
                    .then(|| Some(hex_value(at(p + 2))? * 16 + hex_value(at(p + 3))?))
                    .flatten();
                if let Some(byte) = hex {
                    out.push(byte);
                    p += 3;
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    out.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    // A closing quote must be followed by a space or the end.
                    let next = at(p + 1);
                    if next != 0 && !is_space(next) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    done = true;
                } else if c == 0 {
                    return Err(ProtocolError::UnbalancedQuotes);
                } else {
                    out.push(c);
                }
            } else if in_single {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    out.push(b'\'');
                } else if c == b'\'' {
                    let next = at(p + 1);
                    if next != 0 && !is_space(next) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    done = true;
                } else if c == 0 {
                    return Err(ProtocolError::UnbalancedQuotes);
                } else {
                    out.push(c);
                }
            } else {
                match c {
                    // Not \v or \f: those are part of an unquoted token.
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    other => out.push(other),
                }
            }
            if at(p) != 0 {
                p += 1;
            }
        }
        spans.push(Span {
            start,
            end: out.len(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_spill_past_inline_count_and_past_32_bit_offsets() {
        let span = |start, end| Span { start, end };
        let mut many = Spans::new();
        for i in 0..INLINE_SPANS + 3 {
            many.push(span(i * 10, i * 10 + 3));
        }
        assert!(matches!(many, Spans::Large(_)));
        assert_eq!(many.len(), INLINE_SPANS + 3);
        assert_eq!(many.get(INLINE_SPANS + 2), Some(span(100, 103)));
        assert_eq!(many.iter().nth(1), Some(span(10, 13)));

        let far = u32::MAX as usize + 7;
        let mut big = Spans::new();
        big.push(span(4, 9));
        big.push(span(far, far + 2));
        assert!(matches!(big, Spans::Large(_)));
        assert_eq!(big.get(0), Some(span(4, 9)));
        assert_eq!(big.get(1), Some(span(far, far + 2)));
        assert_eq!(big.get(2), None);
    }

    /// What parsing an input produced: requests, then the error or the unconsumed bytes.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        requests: Vec<Request>,
        error: Option<ProtocolError>,
        leftover: usize,
    }

    fn drain(parser: &mut RequestParser, buf: &mut BytesMut, out: &mut Outcome) -> bool {
        loop {
            match parser.parse(buf) {
                Ok(Some(request)) => out.requests.push(request),
                Ok(None) => return true,
                Err(e) => {
                    out.error = Some(e);
                    return false;
                }
            }
        }
    }

    /// Feeds `input` in pieces cut at `cuts` (ascending offsets).
    fn run_cuts(input: &[u8], limits: RequestLimits, cuts: &[usize]) -> Outcome {
        let mut parser = RequestParser::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Outcome {
            requests: Vec::new(),
            error: None,
            leftover: 0,
        };
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(input.get(from..cut).unwrap_or(&[]));
            from = cut;
            if !drain(&mut parser, &mut buf, &mut out) {
                return out;
            }
        }
        out.leftover = buf.len();
        out
    }

    fn run_whole(input: &[u8], limits: RequestLimits) -> Outcome {
        run_cuts(input, limits, &[])
    }

    /// Parses whole, byte by byte, and split at every boundary; all must agree.
    fn run_all_ways(input: &[u8], limits: RequestLimits) -> Outcome {
        let whole = run_whole(input, limits);
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            run_cuts(input, limits, &bytewise),
            whole,
            "byte by byte: {input:?}"
        );
        for cut in 1..input.len() {
            assert_eq!(
                run_cuts(input, limits, &[cut]),
                whole,
                "split at {cut}: {input:?}"
            );
        }
        whole
    }

    fn argvs(out: &Outcome) -> Vec<Vec<Vec<u8>>> {
        out.requests
            .iter()
            .map(|r| r.args().map(<[u8]>::to_vec).collect())
            .collect()
    }

    fn small_limits() -> RequestLimits {
        RequestLimits {
            max_inline_len: 16,
            ..RequestLimits::default()
        }
    }

    fn unauth_limits() -> RequestLimits {
        RequestLimits {
            unauthenticated: true,
            ..RequestLimits::default()
        }
    }

    type Case = (
        &'static [u8],
        &'static [&'static [&'static [u8]]],
        Option<ProtocolError>,
    );

    /// The one-pass path (`complete_plain_multibulk`) takes whole frames only; at each of
    /// its edges the answer must be the state machine's (byte by byte and at every split,
    /// the state machine reads the input), whichever side of the edge the input is on.
    #[test]
    fn the_one_pass_path_agrees_with_the_state_machine_at_its_edges() {
        let many: Vec<u8> = {
            let mut v = b"*12\r\n".to_vec();
            for i in 0..12 {
                v.extend_from_slice(format!("$2\r\na{}\r\n", i % 10).as_bytes());
            }
            v
        };
        let long_len = format!("*1\r\n${}\r\n", "9".repeat(19)).into_bytes();
        let inputs: Vec<&[u8]> = vec![
            b"*1\r\n$4\r\nPING\r\n",
            b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            b"*01\r\n$4\r\nPING\r\n",
            b"*1\r\n$04\r\nPING\r\n",
            b"*1\r\n$00\r\n\r\n",
            b"*+1\r\n$4\r\nPING\r\n",
            b"*1\r\n$+4\r\nPING\r\n",
            b"*1\r\n$-1\r\n",
            b"*-1\r\n*1\r\n$4\r\nPING\r\n",
            b"*0\r\n*1\r\n$4\r\nPING\r\n",
            b"*1\n$4\r\nPING\r\n",
            b"*1\r\r$4\r\nPING\r\n",
            b"*1\r\n$4\rxPING\r\n",
            b"*1\r\n$4\r\nPINGxx",
            b"*1\r\n$4\r\nPING\n\n",
            b"*1\r\n$0\r\n\r\n",
            b"*1\r\n$4 \r\nPING\r\n",
            b"*1\r\n%4\r\nPING\r\n",
            b"*1\r\n$4\r\nPI\0G\r\n",
            b"*1\r\n$1\0\r\nP\r\n",
            b"*2\r\n$4\r\nPING\r\n",
            b"*11\r\n",
            b"*10\r\n$1\r\na\r\n",
            b"*1\r\n$16385\r\n",
            b"*1\r\n$16384\r\n",
            b"*1\r\n$12345\r\nab",
            b"*1\r\n$123456\r\nab",
            b"*1\r\n$1234567\r\nab",
            b"*1\r\n$999999999999999999\r\n",
            &long_len,
            &many,
        ];
        let tiny = RequestLimits {
            max_inline_len: 5,
            ..small_limits()
        };
        for limits in [
            RequestLimits::default(),
            small_limits(),
            unauth_limits(),
            tiny,
        ] {
            for input in &inputs {
                run_all_ways(input, limits);
            }
        }
    }

    #[test]
    fn table() {
        use ProtocolError::*;
        let cases: &[(RequestLimits, Case)] = &[
            // Multibulk, canonical and lenient (research §4.1).
            (
                RequestLimits::default(),
                (b"*1\r\n$4\r\nPING\r\n", &[&[b"PING"]], None),
            ),
            (
                RequestLimits::default(),
                (
                    b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$0\r\n\r\n",
                    &[&[b"SET", b"a", b""]],
                    None,
                ),
            ),
            (
                RequestLimits::default(),
                (
                    b"*1\r\n$4\r\nPINGxx*1\r\n$4\r\nPING\r\n",
                    &[&[b"PING"], &[b"PING"]],
                    None,
                ),
            ),
            (
                RequestLimits::default(),
                (b"*1\rX$4\r\nPING\r\n", &[&[b"PING"]], None),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n$4\rXPING\n\n", &[&[b"PING"]], None),
            ),
            (RequestLimits::default(), (b"*-10\r\n*0\r\n", &[], None)),
            (
                RequestLimits::default(),
                (b"*-1\r\n*0\r\nPING\n", &[&[b"PING"]], None),
            ),
            (
                RequestLimits::default(),
                (
                    b"*2\r\n$4\r\nPI\0G\r\n$2\r\n\r\n\r\n",
                    &[&[b"PI\0G", b"\r\n"]],
                    None,
                ),
            ),
            // Incomplete multibulk: waits.
            (
                RequestLimits::default(),
                (b"*2\r\n$4\r\nPING\r\n$1\r\n", &[], None),
            ),
            (RequestLimits::default(), (b"*1\r", &[], None)),
            (RequestLimits::default(), (b"*1\r\nX", &[], None)),
            // Multibulk errors.
            (
                RequestLimits::default(),
                (b"*01\r\n", &[], Some(InvalidMultibulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*+1\r\n", &[], Some(InvalidMultibulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"* 1\r\n", &[], Some(InvalidMultibulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*-0\r\n", &[], Some(InvalidMultibulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*\r\n", &[], Some(InvalidMultibulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*1x\r\n", &[], Some(InvalidMultibulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*2147483648\r\n", &[], Some(InvalidMultibulkLength)),
            ),
            (
                RequestLimits::default(),
                (
                    b"*99999999999999999999\r\n",
                    &[],
                    Some(InvalidMultibulkLength),
                ),
            ),
            (RequestLimits::default(), (b"*2147483647\r\n", &[], None)),
            (
                RequestLimits::default(),
                (b"*1\r\nX\r\n", &[], Some(ExpectedDollar(b'X'))),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n*1\r\n", &[], Some(ExpectedDollar(b'*'))),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n\r\r\n", &[], Some(ExpectedDollar(b'\r'))),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n$-1\r\n", &[], Some(InvalidBulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n$04\r\nPING\r\n", &[], Some(InvalidBulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n$\r\n", &[], Some(InvalidBulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n$536870913\r\n", &[], Some(InvalidBulkLength)),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n$536870912\r\n", &[], None),
            ),
            // NUL before the `\r`: Redis's strchr never finds the line end and waits.
            (
                RequestLimits::default(),
                (b"*1\0\r\n$4\r\nPING\r\n", &[], None),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n\0$4\r\nPING\r\n", &[], None),
            ),
            (
                RequestLimits::default(),
                (b"*1\r\n$4\0\r\nPING\r\n", &[], None),
            ),
            // Line limits (small limit: 16 bytes).
            (small_limits(), (b"*123456789012345", &[], None)),
            (
                small_limits(),
                (b"*12345678901234567", &[], Some(TooBigMultibulkCount)),
            ),
            (
                small_limits(),
                (b"*1\0aaaaaaaaaaaaaaa", &[], Some(TooBigMultibulkCount)),
            ),
            (small_limits(), (b"*1\r\n$123456789012345", &[], None)),
            (
                small_limits(),
                (b"*1\r\n$1234567890123456", &[], Some(TooBigBulkCount)),
            ),
            (
                small_limits(),
                (
                    b"*1\r\n$0\0\r\n$4\r\nPING\r\nPING\r\n",
                    &[],
                    Some(TooBigBulkCount),
                ),
            ),
            (small_limits(), (b"0123456789abcdef", &[], None)),
            (
                small_limits(),
                (b"0123456789abcdef\n", &[&[b"0123456789abcdef"]], None),
            ),
            (
                small_limits(),
                (b"0123456789abcdefg", &[], Some(TooBigInlineRequest)),
            ),
            (
                small_limits(),
                (
                    b"PING\0\nPING\nPING\nPING\n",
                    &[],
                    Some(TooBigInlineRequest),
                ),
            ),
            // Bulk payload is not limited by the line limit.
            (
                small_limits(),
                (
                    b"*1\r\n$20\r\n01234567890123456789\r\n",
                    &[&[b"01234567890123456789"]],
                    None,
                ),
            ),
            // Unauthenticated bounds.
            (unauth_limits(), (b"*10\r\n", &[], None)),
            (
                unauth_limits(),
                (b"*11\r\n", &[], Some(UnauthenticatedMultibulkLength)),
            ),
            (unauth_limits(), (b"*-11\r\n", &[], None)),
            (
                unauth_limits(),
                (b"*01\r\n", &[], Some(InvalidMultibulkLength)),
            ),
            (unauth_limits(), (b"*1\r\n$16384\r\n", &[], None)),
            (
                unauth_limits(),
                (b"*1\r\n$16385\r\n", &[], Some(UnauthenticatedBulkLength)),
            ),
            (
                unauth_limits(),
                (b"*1\r\n$-1\r\n", &[], Some(InvalidBulkLength)),
            ),
            // Inline.
            (RequestLimits::default(), (b"PING\r\n", &[&[b"PING"]], None)),
            (
                RequestLimits::default(),
                (b"PING\r\r\n", &[&[b"PING"]], None),
            ),
            (RequestLimits::default(), (b"PING", &[], None)),
            (
                RequestLimits::default(),
                (
                    b"PING\nSLAVEOF a b\n",
                    &[&[b"PING"], &[b"SLAVEOF", b"a", b"b"]],
                    None,
                ),
            ),
            (
                RequestLimits::default(),
                (b"\n\r\n \t\r\n\x0b\x0c\n", &[], None),
            ),
            (
                RequestLimits::default(),
                (b"\n\nPING\n", &[&[b"PING"]], None),
            ),
            (
                RequestLimits::default(),
                (b"$4\r\nPING\r\n", &[&[b"$4"], &[b"PING"]], None),
            ),
            (
                RequestLimits::default(),
                (b"\x16\x03\x01 x\n", &[&[b"\x16\x03\x01", b"x"]], None),
            ),
            (
                RequestLimits::default(),
                (b"sLaVe\"OF\" a b\n", &[&[b"sLaVeOF", b"a", b"b"]], None),
            ),
            (
                RequestLimits::default(),
                (b"\"\\x73laveof\"\n", &[&[b"slaveof"]], None),
            ),
            (
                RequestLimits::default(),
                (b"'REPLICAOF'\n", &[&[b"REPLICAOF"]], None),
            ),
            (
                RequestLimits::default(),
                (b"\x0b\x0c\rSLAVEOF\n", &[&[b"SLAVEOF"]], None),
            ),
            (
                RequestLimits::default(),
                (b"ECHO a\x0bb\x0cc\n", &[&[b"ECHO", b"a\x0bb\x0cc"]], None),
            ),
            (
                RequestLimits::default(),
                (b"ECHO \"a\"\x0bb\n", &[&[b"ECHO", b"a", b"b"]], None),
            ),
            (
                RequestLimits::default(),
                (b"ECHO \"\\x4\"\n", &[&[b"ECHO", b"x4"]], None),
            ),
            (
                RequestLimits::default(),
                (b"ECHO \"\\x4g\"\n", &[&[b"ECHO", b"x4g"]], None),
            ),
            (
                RequestLimits::default(),
                (
                    b"ECHO \"\\x41\\q\\n\\r\\t\\b\\a\\\\\\\"\"\n",
                    &[&[b"ECHO", b"Aq\n\r\t\x08\x07\\\""]],
                    None,
                ),
            ),
            (
                RequestLimits::default(),
                (b"ECHO 'a\\'b\\n\"'\n", &[&[b"ECHO", b"a'b\\n\""]], None),
            ),
            (
                RequestLimits::default(),
                (b"ECHO x\"y\"\n", &[&[b"ECHO", b"xy"]], None),
            ),
            (
                RequestLimits::default(),
                (b"ECHO \"\" ''\n", &[&[b"ECHO", b"", b""]], None),
            ),
            (
                RequestLimits::default(),
                (
                    b"SET k \"a b\"\t'c d'\r\n",
                    &[&[b"SET", b"k", b"a b", b"c d"]],
                    None,
                ),
            ),
            (
                RequestLimits::default(),
                (b"ECHO x\"y\"z\n", &[], Some(UnbalancedQuotes)),
            ),
            (
                RequestLimits::default(),
                (b"ECHO 'y'z\n", &[], Some(UnbalancedQuotes)),
            ),
            (
                RequestLimits::default(),
                (b"ECHO \"y\n", &[], Some(UnbalancedQuotes)),
            ),
            (
                RequestLimits::default(),
                (b"ECHO 'y\n", &[], Some(UnbalancedQuotes)),
            ),
            (
                RequestLimits::default(),
                (b"ECHO \"y\\\"\n", &[], Some(UnbalancedQuotes)),
            ),
            (
                RequestLimits::default(),
                (b"ECHO \"y\\\n", &[], Some(UnbalancedQuotes)),
            ),
            (
                RequestLimits::default(),
                (
                    b"PING\nECHO \"y\nPING\n",
                    &[&[b"PING"]],
                    Some(UnbalancedQuotes),
                ),
            ),
            // NUL in an inline line: Redis's strchr stops there and waits for ever.
            (RequestLimits::default(), (b"PING\0\nPING\n", &[], None)),
            (
                RequestLimits::default(),
                (b"PING\nPI\0NG\nPING\n", &[&[b"PING"]], None),
            ),
            // Mixed pipeline.
            (
                RequestLimits::default(),
                (
                    b"PING\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nQUIT\r\n",
                    &[&[b"PING"], &[b"GET", b"k"], &[b"QUIT"]],
                    None,
                ),
            ),
        ];
        for (limits, (input, expected, error)) in cases {
            let out = run_all_ways(input, *limits);
            let expected: Vec<Vec<Vec<u8>>> = expected
                .iter()
                .map(|argv| argv.iter().map(|a| a.to_vec()).collect())
                .collect();
            assert_eq!(argvs(&out), expected, "argv of {input:?}");
            assert_eq!(&out.error, error, "error of {input:?}");
            for request in &out.requests {
                let again = Request::from_args(&request.args().collect::<Vec<_>>());
                assert_eq!(
                    request.frame(),
                    again.frame(),
                    "canonical frame of {input:?}"
                );
            }
        }
    }

    #[test]
    fn attack_names_lowercase_to_takeover_commands() {
        let inputs: &[&[u8]] = &[
            b"sLaVe\"OF\" 1.2.3.4 6379\n",
            b"\"\\x73laveof\" 1.2.3.4 6379\n",
            b"'REPLICAOF' 1.2.3.4 6379\n",
            b"\x0b\x0c\rslaveof 1.2.3.4 6379\n",
            b"SLA\"VEOF\" 1.2.3.4 6379\n",
        ];
        for input in inputs {
            let out = run_all_ways(input, RequestLimits::default());
            assert_eq!(out.requests.len(), 1, "{input:?}");
            let name = out.requests[0].arg(0).unwrap().to_ascii_lowercase();
            assert!(name == b"slaveof" || name == b"replicaof", "{input:?}");
            assert_eq!(out.requests[0].argc(), 3);
        }
    }

    #[test]
    fn error_texts() {
        use ProtocolError::*;
        let texts = [
            (
                TooBigInlineRequest,
                "Protocol error: too big inline request",
            ),
            (
                UnbalancedQuotes,
                "Protocol error: unbalanced quotes in request",
            ),
            (
                TooBigMultibulkCount,
                "Protocol error: too big mbulk count string",
            ),
            (
                InvalidMultibulkLength,
                "Protocol error: invalid multibulk length",
            ),
            (
                UnauthenticatedMultibulkLength,
                "Protocol error: unauthenticated multibulk length",
            ),
            (
                ExpectedDollar(b'X'),
                "Protocol error: expected '$', got 'X'",
            ),
            (
                ExpectedDollar(b'\r'),
                "Protocol error: expected '$', got ' '",
            ),
            (
                ExpectedDollar(0xe9),
                "Protocol error: expected '$', got '\\xe9'",
            ),
            (TooBigBulkCount, "Protocol error: too big bulk count string"),
            (InvalidBulkLength, "Protocol error: invalid bulk length"),
            (
                UnauthenticatedBulkLength,
                "Protocol error: unauthenticated bulk length",
            ),
        ];
        for (error, text) in texts {
            assert_eq!(error.to_string(), text);
        }
        assert_eq!(
            &InvalidBulkLength.to_reply()[..],
            b"-ERR Protocol error: invalid bulk length\r\n"
        );
        assert_eq!(
            &ExpectedDollar(0xe9).to_reply()[..],
            b"-ERR Protocol error: expected '$', got '\xe9'\r\n"
        );
        assert_eq!(
            &ExpectedDollar(b'\n').to_reply()[..],
            b"-ERR Protocol error: expected '$', got ' '\r\n"
        );
    }

    #[test]
    fn default_limits() {
        let limits = RequestLimits::default();
        assert_eq!(limits.max_bulk_len, 512 * 1024 * 1024);
        assert_eq!(limits.max_multibulk_len, i32::MAX as usize);
        assert_eq!(limits.max_inline_len, 64 * 1024);
        assert!(!limits.unauthenticated);
    }

    #[test]
    fn default_inline_limit() {
        let mut line = vec![b'a'; 64 * 1024];
        let whole = run_whole(&line, RequestLimits::default());
        assert_eq!(whole.error, None);
        line.push(b'\n');
        let out = run_whole(&line, RequestLimits::default());
        assert_eq!(out.requests.len(), 1);
        let mut line = vec![b'a'; 64 * 1024 + 1];
        let cuts: Vec<usize> = (1..line.len()).collect();
        let out = run_cuts(&line, RequestLimits::default(), &cuts);
        assert_eq!(out.error, Some(ProtocolError::TooBigInlineRequest));
        line.push(b'\n');
        let out = run_whole(&line, RequestLimits::default());
        assert_eq!(out.error, Some(ProtocolError::TooBigInlineRequest));
    }

    #[test]
    fn canonical_frames_are_zero_copy() {
        let input = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n*1\r\n$4\r\nPING\r\n";
        let mut buf = BytesMut::from(&input[..]);
        let base = buf.as_ptr();
        let mut parser = RequestParser::default();
        let first = parser.parse(&mut buf).unwrap().unwrap();
        assert_eq!(&first.frame()[..], &input[..22]);
        assert_eq!(first.frame().as_ptr(), base);
        assert_eq!(first.arg(1), Some(&b"key"[..]));
        assert_eq!(first.arg(2), None);
        let second = parser.parse(&mut buf).unwrap().unwrap();
        assert_eq!(&second.frame()[..], &input[22..]);
        assert_eq!(second.frame().as_ptr(), base.wrapping_add(22));
        assert_eq!(parser.parse(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        assert!(!parser.in_progress());
    }

    #[test]
    fn lenient_frames_are_reencoded() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"*1\r\n$4\r\nPINGxx", b"*1\r\n$4\r\nPING\r\n"),
            (b"*1\rX$4\r\nPING\r\n", b"*1\r\n$4\r\nPING\r\n"),
            (
                b"*2\r\n$3\rXGET\r\n$1\r\nk\n\n",
                b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            ),
            (b"GET  k\n", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            (b"'a b'\r\n", b"*1\r\n$3\r\na b\r\n"),
        ];
        for (input, canonical) in cases {
            let out = run_all_ways(input, RequestLimits::default());
            assert_eq!(out.requests.len(), 1, "{input:?}");
            assert_eq!(&out.requests[0].frame()[..], *canonical, "{input:?}");
            assert_eq!(out.leftover, 0);
        }
    }

    #[test]
    fn many_args_spill_to_heap() {
        let args: Vec<Vec<u8>> = (0..100).map(|i| format!("arg{i}").into_bytes()).collect();
        let request = Request::from_args(&args);
        let out = run_all_ways(request.frame(), RequestLimits::default());
        assert_eq!(out.requests, vec![request.clone()]);
        assert_eq!(out.requests[0].argc(), 100);
        assert_eq!(out.requests[0].arg(99), Some(&b"arg99"[..]));
        let inline: Vec<u8> = args.join(&b' ');
        let out = run_whole(&[&inline[..], b"\n"].concat(), RequestLimits::default());
        assert_eq!(out.requests, vec![request]);
    }

    #[test]
    fn big_bulk_in_chunks() {
        let payload: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let request = Request::from_args(&[&b"SET"[..], b"big", &payload]);
        let input = request.frame().clone();
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::new();
        let mut parsed = None;
        for (i, chunk) in input.chunks(64 * 1024).enumerate() {
            assert!(parsed.is_none());
            buf.extend_from_slice(chunk);
            parsed = parser.parse(&mut buf).unwrap();
            if i == 0 {
                // The header arrived: room for the whole payload was reserved once.
                assert!(buf.capacity() >= input.len());
            }
        }
        let parsed = parsed.unwrap();
        assert_eq!(parsed, request);
        assert_eq!(parsed.arg(2).unwrap(), &payload[..]);
        assert!(buf.is_empty());
    }

    #[test]
    fn reserve_is_bounded_by_the_declared_length() {
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::from(&b"*1\r\n$40000\r\n"[..]);
        assert_eq!(parser.parse(&mut buf).unwrap(), None);
        assert!(buf.capacity() >= 40002 + 12);
        assert!(buf.capacity() < 2 * (40002 + 12) + 64);
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::from(&b"*1\r\n$100\r\n"[..]);
        assert_eq!(parser.parse(&mut buf).unwrap(), None);
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn limits_can_change_mid_connection() {
        let mut parser = RequestParser::new(unauth_limits());
        let mut buf = BytesMut::from(&b"*2\r\n$4\r\nAUTH\r\n$1\r\np\r\n*11\r\n"[..]);
        assert_eq!(parser.parse(&mut buf).unwrap().unwrap().argc(), 2);
        parser.set_limits(RequestLimits::default());
        assert!(!parser.limits().unauthenticated);
        assert_eq!(parser.parse(&mut buf).unwrap(), None);
        assert!(parser.in_progress());
    }

    /// Deterministic xorshift64 for the property test.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    #[test]
    fn random_argv_round_trips() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300 {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..1 + rng.below(5) {
                let argc = 1 + rng.below(20);
                let argv: Vec<Vec<u8>> = (0..argc)
                    .map(|_| {
                        let len = match rng.below(10) {
                            0 => 0,
                            1 => 1000 + rng.below(5000),
                            _ => rng.below(40),
                        };
                        (0..len).map(|_| rng.next() as u8).collect()
                    })
                    .collect();
                let request = Request::from_args(&argv);
                assert_eq!(request.args().collect::<Vec<_>>(), argv);
                stream.extend_from_slice(request.frame());
                expected.push(request);
            }
            let mut cuts = Vec::new();
            let mut at = 0;
            loop {
                at += 1 + rng.below(300);
                if at >= stream.len() {
                    break;
                }
                cuts.push(at);
            }
            let out = run_cuts(&stream, RequestLimits::default(), &cuts);
            assert_eq!(out.error, None);
            assert_eq!(out.leftover, 0);
            assert_eq!(out.requests, expected);
        }
    }

    #[test]
    fn string2ll_matches_redis() {
        let cases: &[(&[u8], Option<i64>)] = &[
            (b"0", Some(0)),
            (b"1", Some(1)),
            (b"-1", Some(-1)),
            (b"9223372036854775807", Some(i64::MAX)),
            (b"-9223372036854775808", Some(i64::MIN)),
            (b"9223372036854775808", None),
            (b"-9223372036854775809", None),
            (b"", None),
            (b"-", None),
            (b"-0", None),
            (b"00", None),
            (b"01", None),
            (b"+1", None),
            (b" 1", None),
            (b"1 ", None),
            (b"000000000000000000001", None),
        ];
        for (input, expected) in cases {
            assert_eq!(string2ll(input), *expected, "{input:?}");
        }
    }
}
