//! Fuzz target for `ReplyScanner` (backend bytes → replies).
//!
//! Input layout: `h`, then `h & 7` chunk-size bytes, then the byte stream.
//! - chunk sizes: byte `b` gives a chunk of `b + 1` bytes, `0xff` gives "the rest"; the
//!   sizes cycle; no size bytes (`h & 7 == 0`) means one byte at a time.
//! - `h & 0x08`: `max_depth = 1 + (h >> 4)` (1..=16) instead of 32.
//!
//! Invariants checked:
//! 1. no panic, bounded memory (bulks ≤ 1 MiB; libFuzzer's -malloc_limit_mb does the rest);
//! 2. the returned frames, concatenated, are exactly the consumed prefix of the input;
//! 3. chunked and whole feeding give identical frames, kinds and error;
//! 4. the accessors (`items`, `text`, `error_code`, `integer`) never panic, and `items`
//!    agrees in length with the top-level count;
//! 5. an independent recursive reference scanner (below, written from the RESP2/RESP3 spec
//!    and the scanner's documented strictness) finds the same frame boundaries and fails on
//!    the same input, so the depth limit and the strictness rules are respected;
//! 6. `redis-protocol`'s RESP3 decoder, when it decodes a frame, consumes exactly the same
//!    length, and never calls a frame incomplete (frames containing RESP2 nulls `$-1`/`*-1`
//!    are skipped: its RESP3 decoder misreads those).
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use portcullis::protocol::{ReplyError, ReplyKind, ReplyLimits, ReplyScanner};

const MAX_BULK: usize = 1024 * 1024;
/// The scanner's (private) bound on length/count header lines.
const MAX_HEADER_LINE: usize = 32;

#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<(Bytes, ReplyKind, bool)>,
    error: Option<ReplyError>,
    leftover: Vec<u8>,
}

fn run(limits: ReplyLimits, stream: &[u8], sizes: &[u8]) -> Outcome {
    let mut sc = ReplyScanner::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Outcome {
        frames: Vec::new(),
        error: None,
        leftover: Vec::new(),
    };
    let mut rest = stream;
    let mut i = 0usize;
    let mut done = false;
    while !done {
        let n = match sizes.get(i % sizes.len().max(1)) {
            None => 1,
            Some(0xff) => rest.len(),
            Some(&b) => usize::from(b) + 1,
        };
        i += 1;
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        done = chunk.is_empty();
        buf.extend_from_slice(chunk);
        loop {
            match sc.next(&mut buf) {
                Ok(Some(r)) => {
                    // Accessors must not panic on any accepted frame.
                    let items = r.items();
                    let _ = r.text();
                    let _ = r.error_code();
                    let _ = r.integer();
                    match r.kind() {
                        ReplyKind::Array | ReplyKind::Map | ReplyKind::Set | ReplyKind::Push => {
                            let items = items.unwrap_or_else(|| {
                                panic!("items() is None for aggregate {:?}", r.frame())
                            });
                            assert_eq!(
                                items.len() as u64,
                                top_count(r.frame()),
                                "items() length for {:?}",
                                r.frame()
                            );
                        }
                        _ => assert!(items.is_none()),
                    }
                    if r.is_error() {
                        assert!(r.text().is_some() && r.error_code().is_some());
                    }
                    assert_eq!(r.kind(), top_kind(r.frame()), "kind of {:?}", r.frame());
                    assert_eq!(r.has_attribute(), r.frame().first() == Some(&b'|'));
                    out.frames
                        .push((r.frame().clone(), r.kind(), r.has_attribute()));
                }
                Ok(None) => {
                    let again = sc.next(&mut buf);
                    assert!(matches!(again, Ok(None)), "second call gave {again:?}");
                    break;
                }
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
        assert!(
            buf.capacity() <= 2 * stream.len() + 2 * (limits.max_bulk_len + 64) + 4096,
            "buffer capacity {} for {} input bytes",
            buf.capacity(),
            stream.len()
        );
    }
    out.leftover = buf.to_vec();
    out
}

/// Type byte and header line of the top-level value (after attributes) of a frame.
fn top_value(frame: &[u8]) -> (u8, &[u8]) {
    let mut r = Reference {
        b: frame,
        max_depth: usize::MAX,
    };
    let mut pos = 0;
    loop {
        let ty = frame[pos];
        let max = if matches!(ty, b'+' | b'-' | b',' | b'(') {
            MAX_BULK
        } else {
            MAX_HEADER_LINE
        };
        let Ok(Some((line, after))) = r.line(pos + 1, max) else {
            unreachable!("validated frame");
        };
        if ty != b'|' {
            return (ty, line);
        }
        // Counts are accepted with leading zeros and as `-0`.
        let n = Reference::int(line).unwrap() as u64;
        pos = after;
        for _ in 0..2 * n {
            pos = r.value(pos, 1).unwrap().unwrap();
        }
    }
}

/// Element count of the top-level aggregate, maps counted twice.
fn top_count(frame: &[u8]) -> u64 {
    let (ty, line) = top_value(frame);
    let n = Reference::int(line).unwrap() as u64;
    if ty == b'%' {
        2 * n
    } else {
        n
    }
}

/// Kind of the top-level value per the spec.
fn top_kind(frame: &[u8]) -> ReplyKind {
    let (ty, line) = top_value(frame);
    // Lengths are accepted with leading zeros (`$-01` is a null too).
    let null = matches!(ty, b'$' | b'*') && Reference::int(line) == Some(-1);
    match (ty, line) {
        _ if null => ReplyKind::Null,
        (b'+', _) => ReplyKind::Simple,
        (b'-', _) => ReplyKind::Error,
        (b':', _) => ReplyKind::Integer,
        (b'_', _) => ReplyKind::Null,
        (b'$', _) => ReplyKind::Bulk,
        (b'*', _) => ReplyKind::Array,
        (b'%', _) => ReplyKind::Map,
        (b'~', _) => ReplyKind::Set,
        (b'>', _) => ReplyKind::Push,
        (b',', _) => ReplyKind::Double,
        (b'#', _) => ReplyKind::Boolean,
        (b'(', _) => ReplyKind::BigNumber,
        (b'=', _) => ReplyKind::Verbatim,
        (b'!', _) => ReplyKind::BlobError,
        (ty, _) => unreachable!("type byte {ty:#x}"),
    }
}

/// Independent recursive reference: `Ok(Some(end))`, `Ok(None)` (incomplete), `Err(())`.
struct Reference<'a> {
    b: &'a [u8],
    max_depth: usize,
}

type Step = Result<Option<usize>, ()>;

impl<'a> Reference<'a> {
    /// Line starting at `from`: `(content, offset after CRLF)`.
    fn line(&self, from: usize, max: usize) -> Result<Option<(&'a [u8], usize)>, ()> {
        let b: &'a [u8] = self.b;
        let rest = &b[from.min(b.len())..];
        match rest.iter().position(|&c| c == b'\r' || c == b'\n') {
            Some(i) => {
                if i > max || rest[i] != b'\r' {
                    return Err(());
                }
                match rest.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((&rest[..i], from + i + 2))),
                    Some(_) => Err(()),
                }
            }
            None if rest.len() > max => Err(()),
            None => Ok(None),
        }
    }

    fn int(s: &[u8]) -> Option<i64> {
        let digits = s.strip_prefix(b"-").unwrap_or(s);
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    }

    /// One value (with any attributes before it) at `pos`, inside `depth` open aggregates.
    fn value(&mut self, mut pos: usize, depth: usize) -> Step {
        loop {
            let Some(&ty) = self.b.get(pos) else {
                return Ok(None);
            };
            let max = match ty {
                b'+' | b'-' | b',' | b'(' => MAX_BULK,
                b':' | b'_' | b'#' | b'$' | b'=' | b'!' | b'*' | b'%' | b'~' | b'>' | b'|' => {
                    MAX_HEADER_LINE
                }
                _ => return Err(()),
            };
            let Some((line, after)) = self.line(pos + 1, max)? else {
                return Ok(None);
            };
            match ty {
                b'+' | b'-' => return Ok(Some(after)),
                b':' => return Self::int(line).map(|_| Some(after)).ok_or(()),
                b'_' => {
                    return if line.is_empty() {
                        Ok(Some(after))
                    } else {
                        Err(())
                    }
                }
                b'#' => {
                    return if line == b"t" || line == b"f" {
                        Ok(Some(after))
                    } else {
                        Err(())
                    }
                }
                b',' => {
                    let ok = std::str::from_utf8(line).is_ok_and(|t| t.parse::<f64>().is_ok());
                    return if ok { Ok(Some(after)) } else { Err(()) };
                }
                b'(' => {
                    let d = line.strip_prefix(b"-").unwrap_or(line);
                    let ok = !d.is_empty() && d.iter().all(u8::is_ascii_digit);
                    return if ok { Ok(Some(after)) } else { Err(()) };
                }
                b'$' | b'=' | b'!' => {
                    let len = Self::int(line).ok_or(())?;
                    if len == -1 && ty == b'$' {
                        return Ok(Some(after));
                    }
                    if len < 0 || len as u64 > MAX_BULK as u64 || (ty == b'=' && len < 4) {
                        return Err(());
                    }
                    let end = after + len as usize + 2;
                    if self.b.len() < end {
                        return Ok(None);
                    }
                    if &self.b[end - 2..end] != b"\r\n" || (ty == b'=' && self.b[after + 3] != b':')
                    {
                        return Err(());
                    }
                    return Ok(Some(end));
                }
                _ => {
                    let n = Self::int(line).ok_or(())?;
                    if n == -1 && ty == b'*' {
                        return Ok(Some(after));
                    }
                    if n < 0 || depth >= self.max_depth {
                        return Err(());
                    }
                    let n = n as u64 * if ty == b'%' || ty == b'|' { 2 } else { 1 };
                    let mut p = after;
                    for _ in 0..n {
                        match self.value(p, depth + 1)? {
                            Some(e) => p = e,
                            None => return Ok(None),
                        }
                    }
                    if ty == b'|' {
                        // Attributes prefix the next value at the same depth.
                        pos = p;
                        continue;
                    }
                    return Ok(Some(p));
                }
            }
        }
    }
}

/// Frames of the whole stream per the reference, and whether it ended in an error.
fn reference(stream: &[u8], max_depth: usize) -> (Vec<usize>, bool) {
    let mut r = Reference {
        b: stream,
        max_depth,
    };
    let mut ends = Vec::new();
    let mut pos = 0;
    loop {
        if pos == stream.len() {
            return (ends, false);
        }
        match r.value(pos, 0) {
            Ok(Some(end)) => {
                ends.push(end - pos);
                pos = end;
            }
            Ok(None) => return (ends, false),
            Err(()) => return (ends, true),
        }
    }
}

fn has_resp2_null(frame: &[u8]) -> bool {
    frame.windows(5).any(|w| w == b"$-1\r\n" || w == b"*-1\r\n")
}

fuzz_target!(|data: &[u8]| {
    let Some((&h, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(h & 7).min(rest.len());
    let (sizes, stream) = rest.split_at(k);
    let max_depth = if h & 0x08 != 0 {
        1 + usize::from(h >> 4)
    } else {
        32
    };
    let limits = ReplyLimits {
        max_bulk_len: MAX_BULK,
        max_depth,
    };

    let chunked = run(limits, stream, sizes);
    let whole = run(limits, stream, &[0xff]);
    assert_eq!(chunked, whole, "chunked and whole feeding disagree");

    // Frames concatenated are the consumed prefix.
    let concat: Vec<u8> = chunked
        .frames
        .iter()
        .flat_map(|f| f.0.iter().copied())
        .collect();
    assert!(
        stream.starts_with(&concat),
        "frames are not a prefix of the input"
    );
    if chunked.error.is_none() {
        assert_eq!(concat.len() + chunked.leftover.len(), stream.len());
        assert_eq!(&stream[concat.len()..], &chunked.leftover[..]);
    }

    // Differential check against the reference scanner.
    let (ends, failed) = reference(stream, max_depth);
    let lens: Vec<usize> = chunked.frames.iter().map(|f| f.0.len()).collect();
    assert_eq!(lens, ends, "frame boundaries differ from the reference");
    assert_eq!(
        chunked.error.is_some(),
        failed,
        "scanner error {:?} vs reference failed={failed}",
        chunked.error
    );

    // Cross-check with redis-protocol's RESP3 decoder.
    for (frame, _, _) in &chunked.frames {
        if has_resp2_null(frame) {
            continue;
        }
        match redis_protocol::resp3::decode::complete::decode(frame) {
            Ok(Some((_, n))) => assert_eq!(n, frame.len(), "redis-protocol length for {frame:?}"),
            Ok(None) => panic!("redis-protocol calls {frame:?} incomplete"),
            // Its decoder is stricter in places (hashable map keys, attributes on nulls, ...).
            Err(_) => {}
        }
    }
});
