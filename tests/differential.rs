//! Differential test of the inline parser against Redis itself.
//!
//! Deterministically generated inline lines (xorshift) mix bare tokens, double-quoted
//! tokens with `\xHH`/`\n`/`\"`/`\\` escapes, single-quoted tokens with `\'`, tabs, `\v`,
//! `\f`, stray `\r`, quotes opening mid-token, empty arguments and unbalanced quotes. Each
//! line is `RPUSH <key> <tokens>`: sent directly to redis-server with one key and through
//! the proxy with another, `LRANGE` then shows exactly what each side parsed. The two lists
//! (and the replies) must be equal, and `portcullis::protocol::RequestParser` on the same
//! line must give `["RPUSH", key, ...Redis's list]`. Lines Redis rejects must get the same
//! protocol error and close from the proxy and the same error from the parser.

mod support;

use std::net::SocketAddr;

use bytes::BytesMut;
use portcullis::protocol::RequestParser;
use redis::aio::MultiplexedConnection;
use support::{Proxy, Raw, RedisServer};

const GENERATED_LINES: usize = 1000;
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Bytes that may appear in a bare token (never space, tab, CR, LF, NUL or a quote).
const BARE: &[u8] = b"abcxyzABCXYZ0189-_.:/*?!@#$%^&()[]{}<>=+,;~|`\\\x0b\x0c\x7f\x80\xc3\xa9\xff";
/// Bytes that may appear raw inside double quotes (not `"` or `\`).
const DQ_RAW: &[u8] = b"abcXYZ019 \t'\x0b\x0c\r-_*$\xc3\xa9";
/// Bytes that may appear raw inside single quotes (not `'` or `\`).
const SQ_RAW: &[u8] = b"abcXYZ019 \t\"\x0b\x0c\r-_*$\xff";
const HEX: &[u8] = b"0123456789abcdefABCDEF";

fn bare(rng: &mut XorShift, out: &mut Vec<u8>, min: usize) {
    for _ in 0..min + rng.below(4) {
        out.push(rng.pick(BARE));
    }
}

fn double_quoted(rng: &mut XorShift, out: &mut Vec<u8>) {
    out.push(b'"');
    for _ in 0..rng.below(6) {
        match rng.below(12) {
            0 => {
                out.extend_from_slice(b"\\x");
                out.push(rng.pick(HEX));
                out.push(rng.pick(HEX));
            }
            // Not a valid hex escape: Redis keeps the `x`.
            1 => out.extend_from_slice(rng.pick::<&[u8]>(&[b"\\xZ1", b"\\x4", b"\\xg0"])),
            2 => out.extend_from_slice(rng.pick::<&[u8]>(&[
                b"\\n", b"\\r", b"\\t", b"\\b", b"\\a", b"\\\"", b"\\\\", b"\\q", b"\\'", b"\\ ",
            ])),
            _ => out.push(rng.pick(DQ_RAW)),
        }
    }
    out.push(b'"');
}

fn single_quoted(rng: &mut XorShift, out: &mut Vec<u8>) {
    out.push(b'\'');
    for _ in 0..rng.below(6) {
        match rng.below(8) {
            0 => out.extend_from_slice(b"\\'"),
            1 => out.extend_from_slice(rng.pick::<&[u8]>(&[b"\\n", b"\\\\", b"\\x41"])),
            _ => out.push(rng.pick(SQ_RAW)),
        }
    }
    out.push(b'\'');
}

/// One token: an optional bare prefix and an optional quoted tail (a quote may open
/// mid-token; the closing quote must then be followed by whitespace or the end).
fn token(rng: &mut XorShift, out: &mut Vec<u8>) {
    match rng.below(10) {
        0..=3 => bare(rng, out, 1),
        4 => out.extend_from_slice(rng.pick::<&[u8]>(&[b"\"\"", b"''"])),
        5 | 6 => double_quoted(rng, out),
        7 => single_quoted(rng, out),
        _ => {
            bare(rng, out, 1);
            if rng.chance(60) {
                double_quoted(rng, out)
            } else {
                single_quoted(rng, out)
            }
        }
    }
}

fn separator(rng: &mut XorShift, out: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(2) {
        out.push(rng.pick(b"   \t\x0b\x0c\r"));
    }
}

/// Something Redis must refuse as unbalanced (usually; Redis decides).
fn unbalanced(rng: &mut XorShift, out: &mut Vec<u8>) {
    match rng.below(6) {
        0 => out.extend_from_slice(b"\"open"),
        1 => out.extend_from_slice(b"'open"),
        2 => out.extend_from_slice(b"\"closed\"tail"),
        3 => out.extend_from_slice(b"'closed'tail"),
        4 => out.extend_from_slice(b"\"escaped close\\\""),
        _ => out.extend_from_slice(b"'escaped close\\'"),
    }
}

/// The part of the line after `RPUSH <key>`, without the line terminator.
fn generate_body(rng: &mut XorShift) -> Vec<u8> {
    let mut body = Vec::new();
    let n = 1 + rng.below(6);
    let bad_at = if rng.chance(8) {
        Some(rng.below(n))
    } else {
        None
    };
    for i in 0..n {
        separator(rng, &mut body);
        if bad_at == Some(i) {
            unbalanced(rng, &mut body);
        } else {
            token(rng, &mut body);
        }
    }
    if rng.chance(15) {
        separator(rng, &mut body);
    }
    body
}

/// Hand-written lines for the corners of `sdssplitargs` (bodies after `RPUSH <key>`).
const FIXED: &[&[u8]] = &[
    b" a b c",
    b" a\x0bb",     // \v does not end a bare token
    b" \x0b\x0cb",  // ...but is skipped before one
    b" \"a\"\x0bb", // a closing quote may be followed by \v
    b" \"a\"\x0cb", // ...or \f
    b" 'a'\tb",     // ...or a tab
    b" a\rb",       // a stray CR ends a bare token
    b" \"a\rb\"",   // ...but not inside quotes
    b" a\"b c\"",   // quote opening mid-token
    b" a'b \"c'",   // single quote opening mid-token
    b" \"\\x41\\x4a\\x7e\\xff\\x00\"",
    b" \"\\x4\"",  // short hex escape
    b" \"\\xZZ\"", // invalid hex escape
    b" \"\\n\\r\\t\\b\\a\\\\\\\"\"",
    b" 'it\\'s' '\\n' 'a\\\\b'",
    b" \"\" '' \"\"",
    b" \\x41 a\\\"", // escapes are literal in bare tokens
    b" \"a\"b",      // unbalanced: closing quote followed by a byte
    b" 'a'b",
    b" \"a",
    b" 'a",
    b" \"a\\\"",
    b" 'a\\'",
    b"", // no elements: wrong number of arguments
    b" \t",
    b" \"a\" ",
];

/// Redis's parse of one line on one side: the first reply line, and either the list it
/// built or (for a protocol error) everything it sent before closing.
#[derive(Debug, PartialEq)]
enum Outcome {
    Reply(Vec<u8>, Vec<Vec<u8>>),
    Closed(Vec<u8>),
}

struct Side {
    addr: SocketAddr,
    raw: Raw,
    prefix: &'static str,
}

impl Side {
    async fn run(
        &mut self,
        n: usize,
        body: &[u8],
        crlf: bool,
        data: &mut MultiplexedConnection,
    ) -> (Vec<u8>, Outcome) {
        let key = format!("{}{n}", self.prefix);
        // A real separator after the key: `\v`/`\f` would glue the body onto it.
        let mut line = format!("RPUSH {key} ").into_bytes();
        line.extend_from_slice(body);
        line.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        self.raw.send(&line).await;
        let first = self.raw.read_to_line().await;
        if first.starts_with(b"-ERR Protocol error") {
            let mut all = first;
            all.extend(self.raw.read_to_close().await);
            self.raw = Raw::connect(self.addr).await;
            return (line, Outcome::Closed(all));
        }
        let list: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(data)
            .await
            .expect("LRANGE");
        (line, Outcome::Reply(first, list))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_parsing_matches_redis() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let redis_addr: SocketAddr = redis.addr().parse().expect("redis addr");
    let mut direct = Side {
        addr: redis_addr,
        raw: Raw::connect(redis_addr).await,
        prefix: "d",
    };
    let mut proxied = Side {
        addr: proxy.addr,
        raw: proxy.raw().await,
        prefix: "p",
    };
    let mut data = redis.direct().await;

    let mut rng = XorShift(SEED);
    let mut bodies: Vec<Vec<u8>> = FIXED.iter().map(|b| b.to_vec()).collect();
    for _ in 0..GENERATED_LINES {
        bodies.push(generate_body(&mut rng));
    }

    let mut mismatches = Vec::new();
    let (mut ok_lines, mut error_lines) = (0, 0);
    for (n, body) in bodies.iter().enumerate() {
        let crlf = rng.chance(80);
        let (_, want) = direct.run(n, body, crlf, &mut data).await;
        let (pline, got) = proxied.run(n, body, crlf, &mut data).await;
        match &want {
            Outcome::Closed(_) => error_lines += 1,
            Outcome::Reply(..) => ok_lines += 1,
        }
        if got != want {
            mismatches.push(format!(
                "line {:?}\n    redis: {want:?}\n    proxy: {got:?}",
                show(&pline)
            ));
        }

        // The proxy's own parser on the same bytes.
        let mut buf = BytesMut::from(&pline[..]);
        let parsed = RequestParser::default().parse(&mut buf);
        let pkey = format!("p{n}").into_bytes();
        let ok = match (&want, &parsed) {
            (Outcome::Reply(_, list), Ok(Some(req))) => {
                let mut expect: Vec<&[u8]> = vec![b"RPUSH", &pkey];
                expect.extend(list.iter().map(|a| a.as_slice()));
                req.args().collect::<Vec<_>>() == expect && buf.is_empty()
            }
            (Outcome::Closed(text), Err(e)) => e.to_reply()[..] == text[..],
            _ => false,
        };
        if !ok {
            let parsed = match &parsed {
                Ok(Some(req)) => format!("argv {:?}", req.args().map(show).collect::<Vec<_>>()),
                Ok(None) => "incomplete".to_string(),
                Err(e) => format!("error {e}"),
            };
            mismatches.push(format!(
                "parser on {:?}\n    redis: {want:?}\n    parser: {parsed}",
                show(&pline)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} lines differ from Redis:\n{}",
        mismatches.len(),
        bodies.len(),
        mismatches.join("\n")
    );
    // The generator exercised both outcomes.
    assert!(ok_lines > 800, "only {ok_lines} lines parsed");
    assert!(error_lines >= 50, "only {error_lines} unbalanced lines");
}
