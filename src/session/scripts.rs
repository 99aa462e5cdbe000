//! Script bodies the proxy has seen (`SCRIPT LOAD`, `EVAL`, `EVAL_RO`), by SHA1, so an
//! `EVALSHA` answered `-NOSCRIPT` can load its script and run again: Redis's script cache
//! lives in each server process and is not replicated, so a promoted replica (cluster or
//! Sentinel failover, a single-master switch) or a node that joined later does not have
//! the scripts clients loaded before. `SCRIPT FLUSH` through the proxy forgets them all, so
//! `EVALSHA` then answers `-NOSCRIPT` as Redis does.
//!
//! Bounded by `limits.script_cache` bytes of bodies (the oldest are forgotten first; 0:
//! nothing is kept). Must not: keep a body it was not asked to run or load.

use std::collections::{HashMap, VecDeque};
use std::sync::RwLock;

use bytes::Bytes;

use crate::command::CommandSpec;
use crate::protocol::Request;

/// A script's SHA1 as Redis names it (`sha1hex`: 40 lowercase hex digits).
pub(super) type Sha = [u8; 40];

/// The SHA1 of `body`, as `SCRIPT LOAD` answers it.
pub(super) fn sha1_hex(body: &[u8]) -> Sha {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha1_smol::Sha1::from(body).digest().bytes();
    let mut out = [0u8; 40];
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
    out
}

/// `SHA` as a cache key: Redis accepts it in any letter case (`evalGenericCommand`
/// lowercases it); anything but 40 characters names no script.
fn key_of(sha: &[u8]) -> Option<Sha> {
    let mut key: Sha = sha.try_into().ok()?;
    key.make_ascii_lowercase();
    Some(key)
}

/// Bytes a kept body costs beyond its own length (map slot, order entry, allocation).
const ENTRY_OVERHEAD: usize = 128;

#[derive(Debug, Default)]
struct Inner {
    bodies: HashMap<Sha, Bytes>,
    /// Insertion order, for forgetting the oldest first.
    order: VecDeque<Sha>,
    /// Bodies' bytes plus `ENTRY_OVERHEAD` each.
    bytes: usize,
}

/// The proxy's memory of script bodies (one per proxy: Redis's cache is per server, and
/// the proxy presents one server).
#[derive(Debug, Default)]
pub struct ScriptCache {
    /// Read-mostly: a repeated EVAL only looks its body up.
    inner: RwLock<Inner>,
}

impl ScriptCache {
    /// Note what an authorized request does to the script cache: `SCRIPT LOAD` and
    /// `EVAL`/`EVAL_RO` add their body (kept within `limit` bytes), `SCRIPT FLUSH` empties
    /// it.
    pub(super) fn observe(&self, spec: &CommandSpec, req: &Request, limit: usize) {
        match spec.name {
            "script|load" => self.remember(req.arg(2), limit),
            "eval" | "eval_ro" => self.remember(req.arg(1), limit),
            "script|flush" => self.forget_all(),
            _ => {}
        }
    }

    fn remember(&self, body: Option<&[u8]>, limit: usize) {
        let Some(body) = body else {
            return;
        };
        let cost = body.len() + ENTRY_OVERHEAD;
        if cost > limit {
            return;
        }
        let sha = sha1_hex(body);
        if self
            .inner
            .read()
            .is_ok_and(|inner| inner.bodies.contains_key(&sha))
        {
            return;
        }
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        if inner.bodies.contains_key(&sha) {
            return;
        }
        while inner.bytes + cost > limit {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(b) = inner.bodies.remove(&old) {
                inner.bytes -= b.len() + ENTRY_OVERHEAD;
            }
        }
        inner.bytes += cost;
        inner.order.push_back(sha);
        inner.bodies.insert(sha, Bytes::copy_from_slice(body));
    }

    /// Forget every body (`SCRIPT FLUSH`).
    pub(super) fn forget_all(&self) {
        if let Ok(mut inner) = self.inner.write() {
            *inner = Inner::default();
        }
    }

    /// The body whose SHA1 is `sha`, when known.
    pub(super) fn body(&self, sha: &[u8]) -> Option<Bytes> {
        let key = key_of(sha)?;
        self.inner.read().ok()?.bodies.get(&key).cloned()
    }

    /// Bodies kept and their bytes.
    #[cfg(test)]
    fn size(&self) -> (usize, usize) {
        self.inner
            .read()
            .map(|i| (i.bodies.len(), i.bytes))
            .unwrap_or_default()
    }
}

/// The body to load before re-sending `frame`, when it is an `EVALSHA`/`EVALSHA_RO` of a
/// script the proxy knows (only called for a `-NOSCRIPT` answer).
pub(super) fn body_for(cache: &ScriptCache, frame: &Bytes) -> Option<Bytes> {
    let mut buf = bytes::BytesMut::from(&frame[..]);
    let req = crate::protocol::RequestParser::new(crate::protocol::RequestLimits::default())
        .parse(&mut buf)
        .ok()??;
    let name = req.arg(0)?;
    if !(name.eq_ignore_ascii_case(b"evalsha") || name.eq_ignore_ascii_case(b"evalsha_ro")) {
        return None;
    }
    cache.body(req.arg(1)?)
}

/// The hidden `SCRIPT LOAD <body>` sent before a re-sent `EVALSHA`.
pub(super) fn load_frame(body: &[u8]) -> Bytes {
    Request::from_args(&[b"SCRIPT".as_slice(), b"LOAD", body]).into_frame()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, sub: Option<&str>) -> &'static CommandSpec {
        match crate::command::lookup(name.as_bytes(), sub.map(str::as_bytes)) {
            crate::command::Lookup::Known(s) => s,
            _ => panic!("{name}"),
        }
    }

    #[test]
    fn sha1_is_redis_sha1hex() {
        // redis-cli SCRIPT LOAD "return 1"
        assert_eq!(
            &sha1_hex(b"return 1"),
            b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn load_eval_and_flush_as_redis_keeps_scripts() {
        let cache = ScriptCache::default();
        let load = Request::from_args(&[b"SCRIPT".as_slice(), b"LOAD", b"return 1"]);
        cache.observe(spec("script", Some("load")), &load, 1024);
        let eval = Request::from_args(&[b"EVAL".as_slice(), b"return 2", b"0"]);
        cache.observe(spec("eval", None), &eval, 1024);
        assert_eq!(cache.size(), (2, 16 + 2 * ENTRY_OVERHEAD));
        // Any letter case.
        assert_eq!(
            cache
                .body(b"E0E1F9FABFC9D4800C877A703B823AC0578FF8DB")
                .as_deref(),
            Some(&b"return 1"[..])
        );
        let evalsha = Request::from_args(&[
            b"evalsha".as_slice(),
            b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db",
            b"0",
        ]);
        assert_eq!(
            body_for(&cache, evalsha.frame()).as_deref(),
            Some(&b"return 1"[..])
        );
        assert!(body_for(&cache, eval.frame()).is_none());
        let flush = Request::from_args(&[b"SCRIPT".as_slice(), b"FLUSH"]);
        cache.observe(spec("script", Some("flush")), &flush, 1024);
        assert_eq!(cache.size(), (0, 0));
        assert!(body_for(&cache, evalsha.frame()).is_none());
    }

    #[test]
    fn the_oldest_bodies_go_first_past_the_limit() {
        let cache = ScriptCache::default();
        // Room for two 8-byte bodies with their bookkeeping, not three.
        let limit = 2 * (8 + ENTRY_OVERHEAD) + 4;
        for body in [&b"return 1"[..], b"return 2", b"return 3"] {
            let eval = Request::from_args(&[b"EVAL".as_slice(), body, b"0"]);
            cache.observe(spec("eval", None), &eval, limit);
        }
        assert_eq!(cache.size(), (2, 16 + 2 * ENTRY_OVERHEAD));
        assert!(cache.body(&sha1_hex(b"return 1")).is_none());
        assert!(cache.body(&sha1_hex(b"return 3")).is_some());
        // Too big for the limit with its bookkeeping: not kept; 0 keeps nothing.
        let big = Request::from_args(&[b"EVAL".as_slice(), &[b'x'; 21], b"0"]);
        cache.observe(spec("eval", None), &big, 20 + ENTRY_OVERHEAD);
        assert_eq!(cache.size(), (2, 16 + 2 * ENTRY_OVERHEAD));
        cache.observe(spec("eval", None), &big, 0);
        assert_eq!(cache.size(), (2, 16 + 2 * ENTRY_OVERHEAD));
    }

    #[test]
    fn tiny_bodies_count_their_bookkeeping() {
        let cache = ScriptCache::default();
        for i in 0..1000 {
            let body = format!("return {i}");
            let eval = Request::from_args(&[b"EVAL".as_slice(), body.as_bytes(), b"0"]);
            cache.observe(spec("eval", None), &eval, 10 * 1024);
        }
        let (n, bytes) = cache.size();
        assert!(bytes <= 10 * 1024, "{bytes}");
        assert!(n < 10 * 1024 / ENTRY_OVERHEAD, "{n} bodies kept");
    }
}
