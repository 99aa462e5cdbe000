//! Which slot a request addresses, from the command table's key positions (Redis
//! `src/db.c` `getKeysUsingLegacyRangeSpec`: keys at `first_key`, every `step` arguments,
//! up to `last_key`, negative counting from the end; for `movablekeys` commands, their key
//! specs as `getKeysUsingKeySpecs` reads them), and how a `request_policy:multi_shard`
//! command splits into one part per slot. Pure; no I/O.

use std::ops::ControlFlow;

use crate::command::{BeginSearch, CommandSpec, FindKeys, Flags, KeySpec};
use crate::protocol::Request;

use super::keyslot::key_hash_slot;

/// The slot a request's keys hash to (Redis `src/cluster.c` `getNodeByQuery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    /// No key (or none the key positions name): any master may serve it.
    NoKeys,
    /// Every key hashes to this slot.
    Slot(u16),
    /// The keys hash to different slots: Redis answers `-CROSSSLOT`.
    CrossSlot,
}

/// Argument positions of a request's keys, per the legacy key range of its spec.
pub fn key_positions(spec: &CommandSpec, argc: usize) -> impl Iterator<Item = usize> {
    let (first, step) = (spec.first_key, spec.step);
    let argc_i = i64::try_from(argc).unwrap_or(i64::MAX);
    let last = if spec.last_key < 0 {
        argc_i + i64::from(spec.last_key)
    } else {
        i64::from(spec.last_key)
    };
    // Redis clamps a range that runs past the arguments (arity was checked before).
    let last = last.min(argc_i - 1);
    let (first, step) = if first <= 0 || step <= 0 {
        (1, 0)
    } else {
        (i64::from(first), i64::from(step))
    };
    let count = if step == 0 || last < first {
        0
    } else {
        (last - first) / step + 1
    };
    (0..count).filter_map(move |i| usize::try_from(first + i * step).ok())
}

/// Whether the request's keys may lie outside its legacy key range (EVAL, XREAD, ...):
/// the node that owns them answers `MOVED` if the range did not name them.
pub fn movable_keys(spec: &CommandSpec) -> bool {
    spec.flags.contains(Flags::MOVABLE_KEYS)
}

/// Whether the request's keys are read from its key specs rather than the legacy range:
/// `movablekeys` commands with at least one spec that can name keys (Redis derives the
/// legacy range from the specs, so for the others both agree).
fn uses_key_specs(spec: &CommandSpec) -> bool {
    spec.flags.contains(Flags::MOVABLE_KEYS)
        && spec
            .key_specs
            .iter()
            .any(|k| k.begin_search != BeginSearch::Unknown && k.find_keys != FindKeys::Unknown)
}

/// Calls `f` with the argument position of each key one key spec names (Redis `src/db.c`
/// `getKeysUsingKeySpecs` with `GET_KEYSPEC_RETURN_PARTIAL`: a spec that names no key in
/// this request (keyword absent, key count unparsable, negative, zero or past the
/// arguments) names none here, and the command answers its own error).
fn spec_keys(
    ks: &KeySpec,
    req: &Request,
    f: &mut impl FnMut(usize) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let argc = i64::try_from(req.argc()).unwrap_or(i64::MAX);
    let first = match ks.begin_search {
        BeginSearch::Index(i) => i64::from(i),
        BeginSearch::Keyword { keyword, startfrom } => {
            // Forward from `startfrom` to the one before last, or backwards from
            // `argc + startfrom` down to argument 2, as Redis walks them.
            let from = i64::from(startfrom);
            let (start, end) = if from > 0 {
                (from, argc - 1)
            } else {
                (argc + from, 1)
            };
            let dir = if start <= end { 1 } else { -1 };
            let mut i = start;
            loop {
                if i == end || i >= argc || i < 1 {
                    return ControlFlow::Continue(());
                }
                if arg_is(req, i, keyword) {
                    break i + 1;
                }
                i += dir;
            }
        }
        BeginSearch::Unknown => return ControlFlow::Continue(()),
    };
    let (first, last, step) = match ks.find_keys {
        FindKeys::Range {
            lastkey,
            keystep,
            limit,
        } => {
            let (lastkey, limit) = (i64::from(lastkey), i64::from(limit));
            let last = if lastkey >= 0 {
                first + lastkey
            } else if limit <= 0 {
                argc + lastkey
            } else {
                first + ((argc - first) / limit + lastkey)
            };
            (first, last, i64::from(keystep))
        }
        FindKeys::Keynum {
            keynumidx,
            firstkey,
            keystep,
        } => {
            let numkeys = usize::try_from(first + i64::from(keynumidx))
                .ok()
                .and_then(|i| req.arg(i))
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<i64>().ok());
            let Some(numkeys) = numkeys.filter(|&n| n >= 0) else {
                return ControlFlow::Continue(());
            };
            let first = first + i64::from(firstkey);
            (first, first.saturating_add(numkeys) - 1, i64::from(keystep))
        }
        FindKeys::Unknown => return ControlFlow::Continue(()),
    };
    // Out of bounds: a syntax error the command reports itself.
    if first < 1 || last >= argc || last < first || step <= 0 {
        return ControlFlow::Continue(());
    }
    let mut pos = first;
    while pos <= last {
        if let Ok(p) = usize::try_from(pos) {
            f(p)?;
        }
        pos += step;
    }
    ControlFlow::Continue(())
}

/// Whether argument `i` is `keyword`, case-insensitively (Redis compares with strcasecmp).
fn arg_is(req: &Request, i: i64, keyword: &str) -> bool {
    usize::try_from(i)
        .ok()
        .and_then(|i| req.arg(i))
        .is_some_and(|a| a.eq_ignore_ascii_case(keyword.as_bytes()))
}

/// Calls `f` with each key's argument position, as Redis finds them for cluster routing
/// (Redis `src/cluster.c` `getNodeByQuery`): the legacy range, or for `movablekeys`
/// commands every key spec in order (incomplete ones too, as far as they go); commands
/// whose specs name nothing keep the legacy range.
pub fn for_each_key(
    spec: &CommandSpec,
    req: &Request,
    mut f: impl FnMut(usize) -> ControlFlow<()>,
) {
    if uses_key_specs(spec) {
        for ks in spec.key_specs {
            if spec_keys(ks, req, &mut f).is_break() {
                return;
            }
        }
        return;
    }
    for pos in key_positions(spec, req.argc()) {
        if f(pos).is_break() {
            return;
        }
    }
}

/// Whether the key specs may miss keys or name arguments that are not keys (a spec
/// marked `incomplete` or `unknown`: SORT's STORE, MIGRATE's KEYS): Redis itself then
/// finds the keys with the command's own code (`getKeysFromCommandWithSpecs`).
fn partial_specs(spec: &CommandSpec) -> bool {
    spec.key_specs.iter().any(|k| {
        k.incomplete || k.begin_search == BeginSearch::Unknown || k.find_keys == FindKeys::Unknown
    })
}

/// The slot of a request (Redis `getNodeByQuery`: every key must hash to one slot). For
/// a command whose key specs are partial, the first key found: its node runs Redis's
/// own key lookup and answers `-CROSSSLOT` (or `MOVED`) itself.
pub fn request_slot(spec: &CommandSpec, req: &Request) -> KeySlot {
    let mut slot = None;
    let mut cross = false;
    let first_only = uses_key_specs(spec) && partial_specs(spec);
    for_each_key(spec, req, |pos| {
        let Some(key) = req.arg(pos) else {
            return ControlFlow::Break(());
        };
        let s = key_hash_slot(key);
        match slot {
            None if first_only => {
                slot = Some(s);
                return ControlFlow::Break(());
            }
            None => slot = Some(s),
            Some(prev) if prev != s => {
                cross = true;
                return ControlFlow::Break(());
            }
            Some(_) => {}
        }
        ControlFlow::Continue(())
    });
    if cross {
        return KeySlot::CrossSlot;
    }
    slot.map_or(KeySlot::NoKeys, KeySlot::Slot)
}

/// One slot's part of a split `multi_shard` command: the argument positions of its keys
/// (each key with the `step - 1` arguments after it, as `MSET k v`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPart {
    /// The slot all of the part's keys hash to.
    pub slot: u16,
    /// Positions of the keys in the original request, in request order.
    pub keys: Vec<usize>,
}

/// Group a request's keys by slot (not by key: keys sharing a slot travel together, in
/// their request order), parts ordered by each slot's first key.
pub fn split_by_slot(spec: &CommandSpec, req: &Request) -> Vec<SlotPart> {
    let mut parts: Vec<SlotPart> = Vec::new();
    for pos in key_positions(spec, req.argc()) {
        let Some(key) = req.arg(pos) else { break };
        let slot = key_hash_slot(key);
        match parts.iter_mut().find(|p| p.slot == slot) {
            Some(p) => p.keys.push(pos),
            None => parts.push(SlotPart {
                slot,
                keys: vec![pos],
            }),
        }
    }
    parts
}

/// The request of one part: the command name (and any arguments before the first key,
/// which legacy ranges never have for multi_shard commands), then each key with its
/// step's arguments.
pub fn part_request(spec: &CommandSpec, req: &Request, part: &SlotPart) -> Request {
    let step = usize::try_from(spec.step.max(1)).unwrap_or(1);
    let first = usize::try_from(spec.first_key.max(1)).unwrap_or(1);
    let mut args: Vec<&[u8]> = (0..first).filter_map(|i| req.arg(i)).collect();
    for &k in &part.keys {
        args.extend((k..k + step).filter_map(|i| req.arg(i)));
    }
    Request::from_args(&args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::lookup_name;

    fn req(args: &[&str]) -> Request {
        Request::from_args(args)
    }

    fn slot_of(args: &[&str]) -> KeySlot {
        let spec = lookup_name(&args[0].to_ascii_lowercase()).unwrap();
        request_slot(spec, &req(args))
    }

    #[test]
    fn slot_of_requests() {
        assert_eq!(slot_of(&["GET", "foo"]), KeySlot::Slot(12182));
        assert_eq!(slot_of(&["SET", "foo", "bar"]), KeySlot::Slot(12182));
        assert_eq!(slot_of(&["PING"]), KeySlot::NoKeys);
        assert_eq!(slot_of(&["DBSIZE"]), KeySlot::NoKeys);
        assert_eq!(slot_of(&["MGET", "foo", "bar"]), KeySlot::CrossSlot);
        assert_eq!(
            slot_of(&["MGET", "{u}a", "{u}b", "{u}c"]),
            slot_of(&["GET", "u"])
        );
        // MSET: keys every second argument; values never count.
        assert_eq!(
            slot_of(&["MSET", "{t}1", "foo", "{t}2", "bar"]),
            slot_of(&["GET", "t"])
        );
        assert_eq!(
            slot_of(&["MSETNX", "foo", "x", "bar", "y"]),
            KeySlot::CrossSlot
        );
        // RENAME: both keys.
        assert_eq!(slot_of(&["RENAME", "foo", "bar"]), KeySlot::CrossSlot);
        // BLPOP: keys up to the one before last (the timeout).
        assert_eq!(
            slot_of(&["BLPOP", "{q}a", "{q}b", "0"]),
            slot_of(&["GET", "q"])
        );
    }

    fn keys_of(args: &[&str]) -> Vec<usize> {
        let spec = lookup_name(&args[0].to_ascii_lowercase()).unwrap();
        let mut keys = Vec::new();
        for_each_key(spec, &req(args), |p| {
            keys.push(p);
            ControlFlow::Continue(())
        });
        keys
    }

    #[test]
    fn movable_keys_from_key_specs() {
        // keynum (EVAL: count at 2, keys after it).
        assert_eq!(keys_of(&["EVAL", "s", "2", "a", "b", "x"]), vec![3, 4]);
        assert_eq!(keys_of(&["EVAL", "s", "0", "x"]), Vec::<usize>::new());
        assert_eq!(keys_of(&["FCALL", "f", "1", "a"]), vec![3]);
        // A count past the arguments, negative or unparsable names no key.
        assert_eq!(keys_of(&["EVAL", "s", "3", "a"]), Vec::<usize>::new());
        assert_eq!(keys_of(&["EVAL", "s", "-1", "a"]), Vec::<usize>::new());
        assert_eq!(keys_of(&["EVAL", "s", "x", "a"]), Vec::<usize>::new());
        assert_eq!(
            keys_of(&["EVAL", "s", "99999999999999999999", "a"]),
            Vec::<usize>::new()
        );
        // Two specs: the destination, then the counted sources.
        assert_eq!(
            keys_of(&["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"]),
            vec![1, 3, 4]
        );
        // A bad count drops only its own spec.
        assert_eq!(keys_of(&["ZUNIONSTORE", "d", "5", "a"]), vec![1]);
        assert_eq!(keys_of(&["LMPOP", "2", "a", "b", "LEFT"]), vec![2, 3]);
        assert_eq!(keys_of(&["BLMPOP", "0", "1", "a", "LEFT"]), vec![3]);
        assert_eq!(
            keys_of(&["SINTERCARD", "2", "a", "b", "LIMIT", "1"]),
            vec![2, 3]
        );
        // keyword + range with limit: half of what follows STREAMS.
        assert_eq!(
            keys_of(&["XREAD", "COUNT", "1", "STREAMS", "a", "b", "0", "0"]),
            vec![4, 5]
        );
        assert_eq!(
            keys_of(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "a", "0"]),
            vec![5]
        );
        assert_eq!(keys_of(&["XREAD", "STREAMS"]), Vec::<usize>::new());
        // keyword from a start: GEORADIUS's STORE/STOREDIST.
        let geo = ["GEORADIUS", "s", "0", "0", "1", "km", "STORE", "d"];
        assert_eq!(keys_of(&geo), vec![1, 7]);
        let geo = ["GEORADIUS", "s", "0", "0", "1", "km", "STOREDIST", "d"];
        assert_eq!(keys_of(&geo), vec![1, 7]);
        // A keyword as the last argument names nothing.
        let geo = ["GEORADIUS", "s", "0", "0", "1", "km", "STORE"];
        assert_eq!(keys_of(&geo), vec![1]);
        // keyword searched backwards (MIGRATE ... KEYS, incomplete: as far as it goes).
        let mig = ["MIGRATE", "h", "1", "", "0", "5", "KEYS", "a", "b"];
        assert_eq!(keys_of(&mig), vec![3, 7, 8]);
        assert_eq!(keys_of(&["MIGRATE", "h", "1", "k", "0", "5"]), vec![3]);
        // Unknown specs (SORT's STORE) name nothing; the known one still counts.
        assert_eq!(keys_of(&["SORT", "a", "STORE", "d"]), vec![1]);
        // Plain commands keep the legacy range.
        assert_eq!(keys_of(&["MSET", "a", "1", "b", "2"]), vec![1, 3]);
    }

    #[test]
    fn slot_of_movable_keys() {
        assert_eq!(
            slot_of(&["EVAL", "s", "2", "{t}a", "{t}b"]),
            slot_of(&["GET", "t"])
        );
        assert_eq!(
            slot_of(&["EVAL", "s", "2", "foo", "bar"]),
            KeySlot::CrossSlot
        );
        assert_eq!(slot_of(&["EVAL", "s", "0", "foo", "bar"]), KeySlot::NoKeys);
        assert_eq!(
            slot_of(&["ZUNIONSTORE", "foo", "1", "bar"]),
            KeySlot::CrossSlot
        );
        assert_eq!(
            slot_of(&["XREAD", "STREAMS", "foo", "bar", "0", "0"]),
            KeySlot::CrossSlot
        );
        // Partial specs: the first key's node decides (Redis's own key lookup there).
        assert_eq!(
            slot_of(&["SORT", "foo", "STORE", "bar"]),
            slot_of(&["GET", "foo"])
        );
        let mig = ["MIGRATE", "h", "1", "", "0", "5", "KEYS", "foo", "bar"];
        assert_eq!(slot_of(&mig), KeySlot::Slot(0));
        // The IDs are not keys.
        assert_eq!(
            slot_of(&["XREAD", "STREAMS", "foo", "bar"]),
            slot_of(&["GET", "foo"])
        );
    }

    #[test]
    fn split_groups_keys_per_slot_in_request_order() {
        let spec = lookup_name("mset").unwrap();
        let r = req(&["MSET", "{a}1", "x", "foo", "y", "{a}2", "z"]);
        let parts = split_by_slot(spec, &r);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].keys, vec![1, 5]);
        assert_eq!(parts[1].keys, vec![3]);
        assert_eq!(
            part_request(spec, &r, &parts[0]),
            req(&["MSET", "{a}1", "x", "{a}2", "z"])
        );
        assert_eq!(
            part_request(spec, &r, &parts[1]),
            req(&["MSET", "foo", "y"])
        );
        let mget = lookup_name("mget").unwrap();
        let r = req(&["MGET", "foo", "bar", "foo"]);
        let parts = split_by_slot(mget, &r);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].keys, vec![1, 3]);
        assert_eq!(
            part_request(mget, &r, &parts[0]),
            req(&["MGET", "foo", "foo"])
        );
    }
}
