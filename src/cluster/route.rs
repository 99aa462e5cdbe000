//! Which slot a request addresses, from the command table's key positions (Redis
//! `src/db.c` `getKeysUsingLegacyRangeSpec`: keys at `first_key`, every `step` arguments,
//! up to `last_key`, negative counting from the end), and how a `request_policy:multi_shard`
//! command splits into one part per slot. Pure; no I/O.

use crate::command::{CommandSpec, Flags};
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

/// The slot of a request (Redis `getNodeByQuery`: every key must hash to one slot).
pub fn request_slot(spec: &CommandSpec, req: &Request) -> KeySlot {
    let mut slot = None;
    for pos in key_positions(spec, req.argc()) {
        let Some(key) = req.arg(pos) else { break };
        let s = key_hash_slot(key);
        match slot {
            None => slot = Some(s),
            Some(prev) if prev != s => return KeySlot::CrossSlot,
            Some(_) => {}
        }
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
