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

pub use reply::{Item, Node, Reply, ReplyError, ReplyKind, ReplyLimits, ReplyScanner, ReplyShape};
pub use request::{ProtocolError, Request, RequestLimits, RequestParser};

/// Bytes `find_either` checks one by one before handing the rest to `memchr`.
const SHORT_LINE: usize = 16;

/// First `a` or `b` in `hay`, as `memchr::memchr2`. The lines searched most are a few
/// bytes (`*3`, `$5`, `+OK`): a plain loop over the first `SHORT_LINE` bytes finds their
/// end sooner than `memchr`'s setup would; longer ones go on with `memchr`.
fn find_either(a: u8, b: u8, hay: &[u8]) -> Option<usize> {
    let short = hay.get(..SHORT_LINE).unwrap_or(hay);
    if let Some(offset) = short.iter().position(|&c| c == a || c == b) {
        return Some(offset);
    }
    let rest = hay.get(short.len()..)?;
    memchr::memchr2(a, b, rest).map(|offset| offset + short.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short loop and `memchr` find the same byte on both sides of `SHORT_LINE`.
    #[test]
    fn find_either_agrees_with_memchr_at_every_length() {
        for len in 0..3 * SHORT_LINE {
            for (at, byte) in (0..=len).flat_map(|at| [(at, b'\r'), (at, b'\n'), (at, 0)]) {
                let mut hay = vec![b'x'; len];
                if at < len {
                    hay[at] = byte;
                }
                for (a, b) in [(b'\r', b'\n'), (b'\r', 0)] {
                    let expected = memchr::memchr2(a, b, &hay);
                    assert_eq!(
                        find_either(a, b, &hay),
                        expected,
                        "len {len}, {byte} at {at}"
                    );
                }
            }
        }
    }
}
