//! Combining the replies of a split (`request_policy:multi_shard`) or fanned-out
//! (`all_shards`, `all_nodes`) command into the one reply a single server gives, as the
//! `response_policy:*` tip says (Redis "command tips" documentation; e.g. `DEL` is
//! `agg_sum`, `MSET` `all_succeeded`, `MGET` has none: its parts are reassembled in key
//! order). Pure; replies are already read and split.

use bytes::{Bytes, BytesMut};

use crate::command::ResponsePolicy;

/// One part's reply, as far as combining needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// An error reply (its exact bytes).
    Error(Bytes),
    /// An integer reply.
    Int(i64),
    /// An array reply: its elements' exact bytes.
    Array(Vec<Bytes>),
    /// Anything else (its exact bytes).
    Other(Bytes),
}

fn int(n: i64) -> Bytes {
    let mut b = itoa::Buffer::new();
    let mut out = BytesMut::with_capacity(24);
    out.extend_from_slice(b":");
    out.extend_from_slice(b.format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

fn array(elements: impl IntoIterator<Item = Bytes>) -> Bytes {
    let elements: Vec<Bytes> = elements.into_iter().collect();
    let mut b = itoa::Buffer::new();
    let mut out = BytesMut::new();
    out.extend_from_slice(b"*");
    out.extend_from_slice(b.format(elements.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for e in elements {
        out.extend_from_slice(&e);
    }
    out.freeze()
}

fn is_null(b: &[u8]) -> bool {
    matches!(b, b"$-1\r\n" | b"*-1\r\n" | b"_\r\n")
}

fn bytes_of(p: &Part) -> Bytes {
    match p {
        Part::Error(b) | Part::Other(b) => b.clone(),
        Part::Int(n) => int(*n),
        Part::Array(e) => array(e.iter().cloned()),
    }
}

/// Reassemble a split command's array replies in key order: `positions[p][j]` is where
/// (among all keys, in request order) element `j` of part `p`'s reply belongs. The first
/// error of any part is the answer (a part can only fail as a whole).
pub fn reassemble(parts: &[Part], positions: &[Vec<usize>], total: usize) -> Bytes {
    if let Some(e) = parts.iter().find(|p| matches!(p, Part::Error(_))) {
        return bytes_of(e);
    }
    let mut out: Vec<Option<Bytes>> = vec![None; total];
    for (part, pos) in parts.iter().zip(positions) {
        let Part::Array(elements) = part else {
            return bytes_of(part);
        };
        for (e, &p) in elements.iter().zip(pos) {
            if let Some(slot) = out.get_mut(p) {
                *slot = Some(e.clone());
            }
        }
    }
    array(
        out.into_iter()
            .map(|e| e.unwrap_or_else(|| Bytes::from_static(b"$-1\r\n"))),
    )
}

fn fold_ints(parts: &[Part], f: impl Fn(i64, i64) -> i64) -> Option<Bytes> {
    let mut acc: Option<i64> = None;
    for p in parts {
        let Part::Int(n) = p else { return None };
        acc = Some(acc.map_or(*n, |a| f(a, *n)));
    }
    acc.map(int)
}

/// Element-wise logical combination of integer arrays (`SCRIPT EXISTS`).
fn fold_arrays(parts: &[Part], and: bool) -> Option<Bytes> {
    let mut acc: Option<Vec<bool>> = None;
    for p in parts {
        let Part::Array(elements) = p else {
            return None;
        };
        let values: Vec<bool> = elements.iter().map(|e| e.as_ref() != b":0\r\n").collect();
        acc = Some(match acc {
            None => values,
            Some(a) => a
                .iter()
                .zip(values)
                .map(|(&x, y)| if and { x && y } else { x || y })
                .collect(),
        });
    }
    acc.map(|v| array(v.into_iter().map(|b| int(i64::from(b)))))
}

/// Combine the replies of every part as `policy` says. `Default` concatenates array
/// replies (KEYS over all shards) and otherwise takes the first reply; every policy but
/// `OneSucceeded` answers the first error when a part failed.
pub fn combine(policy: ResponsePolicy, parts: &[Part]) -> Bytes {
    let Some(first) = parts.first() else {
        return array([]);
    };
    if policy == ResponsePolicy::OneSucceeded {
        return bytes_of(
            parts
                .iter()
                .find(|p| !matches!(p, Part::Error(_)))
                .unwrap_or(first),
        );
    }
    if let Some(e) = parts.iter().find(|p| matches!(p, Part::Error(_))) {
        return bytes_of(e);
    }
    let folded = match policy {
        ResponsePolicy::AggSum => fold_ints(parts, i64::saturating_add),
        ResponsePolicy::AggMin => fold_ints(parts, i64::min),
        ResponsePolicy::AggMax => fold_ints(parts, i64::max),
        ResponsePolicy::AggLogicalAnd => fold_ints(parts, |a, b| i64::from(a != 0 && b != 0))
            .or_else(|| fold_arrays(parts, true)),
        ResponsePolicy::AggLogicalOr => fold_ints(parts, |a, b| i64::from(a != 0 || b != 0))
            .or_else(|| fold_arrays(parts, false)),
        ResponsePolicy::Default => {
            if parts.iter().all(|p| matches!(p, Part::Array(_))) {
                Some(array(parts.iter().flat_map(|p| match p {
                    Part::Array(e) => e.clone(),
                    _ => Vec::new(),
                })))
            } else {
                // One reply stands for all (RANDOMKEY): the first that is not null, as
                // a server holding every shard's keys would find one.
                parts
                    .iter()
                    .find(|p| !matches!(p, Part::Other(b) if is_null(b)))
                    .map(bytes_of)
            }
        }
        ResponsePolicy::AllSucceeded | ResponsePolicy::OneSucceeded | ResponsePolicy::Special => {
            None
        }
    };
    folded.unwrap_or_else(|| bytes_of(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn mget_parts_back_in_key_order() {
        // MGET a b c d: part 0 has a, c (positions 0, 2); part 1 has b, d.
        let parts = [
            Part::Array(vec![b("$1\r\n1\r\n"), b("$-1\r\n")]),
            Part::Array(vec![b("$1\r\n2\r\n"), b("$1\r\n4\r\n")]),
        ];
        let out = reassemble(&parts, &[vec![0, 2], vec![1, 3]], 4);
        assert_eq!(&out[..], b"*4\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n$1\r\n4\r\n");
        let failed = [Part::Array(vec![]), Part::Error(b("-ERR x\r\n"))];
        assert_eq!(
            &reassemble(&failed, &[vec![], vec![]], 0)[..],
            b"-ERR x\r\n"
        );
    }

    #[test]
    fn policies() {
        let ints = [Part::Int(2), Part::Int(3)];
        assert_eq!(&combine(ResponsePolicy::AggSum, &ints)[..], b":5\r\n");
        assert_eq!(&combine(ResponsePolicy::AggMin, &ints)[..], b":2\r\n");
        assert_eq!(&combine(ResponsePolicy::AggMax, &ints)[..], b":3\r\n");
        let ok = [Part::Other(b("+OK\r\n")), Part::Other(b("+OK\r\n"))];
        assert_eq!(&combine(ResponsePolicy::AllSucceeded, &ok)[..], b"+OK\r\n");
        let one_failed = [Part::Other(b("+OK\r\n")), Part::Error(b("-OOM no\r\n"))];
        assert_eq!(
            &combine(ResponsePolicy::AllSucceeded, &one_failed)[..],
            b"-OOM no\r\n"
        );
        assert_eq!(
            &combine(ResponsePolicy::OneSucceeded, &one_failed)[..],
            b"+OK\r\n"
        );
        let keys = [
            Part::Array(vec![b("$1\r\na\r\n")]),
            Part::Array(vec![b("$1\r\nb\r\n")]),
        ];
        assert_eq!(
            &combine(ResponsePolicy::Default, &keys)[..],
            b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        );
        let random = [Part::Other(b("$-1\r\n")), Part::Other(b("$1\r\nk\r\n"))];
        assert_eq!(
            &combine(ResponsePolicy::Default, &random)[..],
            b"$1\r\nk\r\n"
        );
        let exists = [
            Part::Array(vec![b(":1\r\n"), b(":0\r\n")]),
            Part::Array(vec![b(":1\r\n"), b(":1\r\n")]),
        ];
        assert_eq!(
            &combine(ResponsePolicy::AggLogicalAnd, &exists)[..],
            b"*2\r\n:1\r\n:0\r\n"
        );
    }
}
