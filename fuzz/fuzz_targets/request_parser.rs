//! Fuzz target for `RequestParser` (client bytes → requests).
//!
//! Input layout: `h`, then `h & 7` chunk-size bytes, then the byte stream.
//! - chunk sizes: byte `b` gives a chunk of `b + 1` bytes, `0xff` gives "the rest"; the
//!   sizes cycle; no size bytes (`h & 7 == 0`) means one byte at a time.
//! - `h & 0x08`: pre-authentication limits (10 elements, 16 KiB bulks).
//! - `h & 0x10`: tiny limits (inline/count lines 32 bytes, bulks 64 bytes).
//!
//! Invariants checked:
//! 1. no panic, bounded memory (small limits; libFuzzer's -malloc_limit_mb does the rest);
//! 2. every request has argc >= 1 and its frame is exactly the canonical RESP encoding of
//!    its argv (`Request::from_args`), and a fresh parser reading that frame in one go
//!    returns one request with the same argv and the same frame, consuming all of it;
//! 3. feeding the stream in chunks gives the same requests, the same error (or the same
//!    unconsumed bytes) as feeding it whole;
//! 4. a repeated call after `Ok(None)` without new bytes stays `Ok(None)`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::protocol::{ProtocolError, Request, RequestLimits, RequestParser};

const MAX_BULK: usize = 1024 * 1024;
const MAX_INLINE: usize = 4 * 1024;

#[derive(Debug, PartialEq)]
struct Outcome {
    requests: Vec<Vec<Vec<u8>>>,
    frames: Vec<bytes::Bytes>,
    error: Option<ProtocolError>,
    leftover: Vec<u8>,
    in_progress: bool,
}

fn argv(r: &Request) -> Vec<Vec<u8>> {
    (0..r.argc())
        .map(|i| r.arg(i).expect("arg(i) for i < argc").to_vec())
        .collect()
}

fn run(limits: RequestLimits, stream: &[u8], sizes: &[u8]) -> Outcome {
    let mut parser = RequestParser::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Outcome {
        requests: Vec::new(),
        frames: Vec::new(),
        error: None,
        leftover: Vec::new(),
        in_progress: false,
    };
    let mut rest = stream;
    let mut i = 0usize;
    // One extra call after everything arrived (also covers the empty stream).
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
            match parser.parse(&mut buf) {
                Ok(Some(r)) => {
                    out.requests.push(argv(&r));
                    out.frames.push(r.frame().clone());
                }
                Ok(None) => {
                    // Idempotent without new bytes.
                    let again = parser.parse(&mut buf);
                    assert!(matches!(again, Ok(None)), "second call gave {again:?}");
                    break;
                }
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
            // Bounded: the buffer never grows past what arrived plus one bulk reservation.
            assert!(
                buf.capacity() <= 2 * stream.len() + 2 * limits.max_bulk_len + 64 * 1024,
                "buffer capacity {} for {} input bytes",
                buf.capacity(),
                stream.len()
            );
        }
    }
    out.leftover = buf.to_vec();
    out.in_progress = parser.in_progress();
    out
}

fn check_request(args: &[Vec<u8>], frame: &bytes::Bytes) {
    assert!(!args.is_empty(), "request with argc 0: {frame:?}");
    let canonical = Request::from_args(args);
    assert_eq!(
        frame,
        canonical.frame(),
        "frame is not the canonical encoding of its argv {args:?}"
    );
    // Re-parse with generous limits: inline commands are not bound by the multibulk limits.
    let mut parser = RequestParser::new(RequestLimits {
        max_bulk_len: MAX_BULK,
        max_multibulk_len: usize::MAX >> 1,
        max_inline_len: MAX_INLINE,
        unauthenticated: false,
    });
    let mut buf = BytesMut::from(&frame[..]);
    let again = parser
        .parse(&mut buf)
        .unwrap_or_else(|e| panic!("frame {frame:?} does not re-parse: {e}"))
        .unwrap_or_else(|| panic!("frame {frame:?} is incomplete on re-parse"));
    assert!(buf.is_empty(), "re-parse of {frame:?} left {buf:?}");
    assert!(!parser.in_progress());
    assert_eq!(argv(&again), args, "re-parse changed argv");
    assert_eq!(again.frame(), frame, "re-parse changed frame");
}

fuzz_target!(|data: &[u8]| {
    let Some((&h, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(h & 7).min(rest.len());
    let (sizes, stream) = rest.split_at(k);
    let limits = if h & 0x10 != 0 {
        RequestLimits {
            max_bulk_len: 64,
            max_multibulk_len: 1 << 20,
            max_inline_len: 32,
            unauthenticated: h & 0x08 != 0,
        }
    } else {
        RequestLimits {
            max_bulk_len: MAX_BULK,
            max_multibulk_len: 1 << 20,
            max_inline_len: MAX_INLINE,
            unauthenticated: h & 0x08 != 0,
        }
    };

    let chunked = run(limits, stream, sizes);
    let whole = run(limits, stream, &[0xff]);
    assert_eq!(chunked, whole, "chunked and whole feeding disagree");
    for (args, frame) in chunked.requests.iter().zip(&chunked.frames) {
        check_request(args, frame);
    }
    // What was consumed is exactly the input minus the leftover (when no error).
    if chunked.error.is_none() {
        assert!(stream.ends_with(&chunked.leftover));
    }
});
