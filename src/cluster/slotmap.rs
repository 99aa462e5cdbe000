//! The slot map: which shard (a master and its replicas) serves each of the 16384 slots,
//! read from `CLUSTER SHARDS` (Redis 7+, RESP2 and RESP3 shapes) or, where that is
//! missing or unusable, `CLUSTER SLOTS`; and the choice between several nodes' views by
//! config epoch (`CLUSTER NODES`). Pure: parsing and deciding over replies already read.

use std::collections::HashMap;

use crate::protocol::Node as Value;

use super::keyslot::SLOTS;

/// One cluster node as the map names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterNode {
    /// The node's 40-character cluster id (empty when the reply did not carry one).
    pub id: String,
    /// Where to connect: the node's announced endpoint (hostname or IP, as
    /// `cluster-preferred-endpoint-type` says), or its IP.
    pub host: String,
    /// The port to connect to (the TLS port when `tls`).
    pub port: u16,
    /// The port is the node's TLS port.
    pub tls: bool,
}

impl ClusterNode {
    /// `host:port`, bracketing an IPv6 address.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A master and its replicas, with the slot ranges the master serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The node serving the shard's slots (role master in the reply).
    pub master: ClusterNode,
    /// Its replicas.
    pub replicas: Vec<ClusterNode>,
    /// Inclusive slot ranges, ascending.
    pub ranges: Vec<(u16, u16)>,
}

/// Which shard serves each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Every shard that serves slots, in reply order.
    pub shards: Vec<Shard>,
    /// Shard index per slot; `NO_SHARD` where no master serves it.
    owner: Box<[u16]>,
}

/// `SlotMap::owner` of an uncovered slot.
const NO_SHARD: u16 = u16::MAX;

/// Why a slot map could not be read from a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotMapError {
    #[error("the node answered an error: {0}")]
    Refused(String),
    #[error("the reply is not in the expected layout ({0})")]
    Layout(&'static str),
}

impl SlotMap {
    /// A map from shards (later shards lose overlapping slots to earlier ones).
    pub fn new(shards: Vec<Shard>) -> SlotMap {
        let mut owner = vec![NO_SHARD; SLOTS].into_boxed_slice();
        for (i, shard) in shards.iter().enumerate() {
            for &(start, end) in &shard.ranges {
                for slot in start..=end.min(SLOTS as u16 - 1) {
                    if owner[usize::from(slot)] == NO_SHARD {
                        owner[usize::from(slot)] = u16::try_from(i).unwrap_or(NO_SHARD);
                    }
                }
            }
        }
        SlotMap { shards, owner }
    }

    /// The shard serving `slot`.
    pub fn shard_of(&self, slot: u16) -> Option<&Shard> {
        let i = *self.owner.get(usize::from(slot))?;
        self.shards.get(usize::from(i))
    }

    /// Index (in `shards`) of the shard serving `slot`.
    pub fn shard_index(&self, slot: u16) -> Option<usize> {
        let i = *self.owner.get(usize::from(slot))?;
        (i != NO_SHARD).then_some(usize::from(i))
    }

    /// Slots some master serves.
    pub fn covered(&self) -> usize {
        self.owner.iter().filter(|&&o| o != NO_SHARD).count()
    }

    /// The master id serving each slot (empty where none): what two views are compared on.
    fn owners(&self) -> impl Iterator<Item = &str> + '_ {
        self.owner.iter().map(|&o| {
            self.shards
                .get(usize::from(o))
                .map_or("", |s| s.master.id.as_str())
        })
    }

    /// Whether the map names a node at `address` (master or replica, with or without
    /// slots).
    pub fn has_node(&self, address: &str) -> bool {
        self.nodes().any(|n| n.address() == address)
    }

    /// Every node of the map (masters first).
    pub fn nodes(&self) -> impl Iterator<Item = &ClusterNode> + '_ {
        self.shards
            .iter()
            .map(|s| &s.master)
            .chain(self.shards.iter().flat_map(|s| s.replicas.iter()))
    }
}

fn text(v: &Value<'_>) -> Option<String> {
    match v {
        Value::Str(s) => Some(String::from_utf8_lossy(s).into_owned()),
        _ => None,
    }
}

fn int(v: &Value<'_>) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        // RESP2 servers sometimes give numbers as strings (never for SHARDS, but cheap).
        Value::Str(s) => std::str::from_utf8(s).ok()?.parse().ok(),
        _ => None,
    }
}

/// Key/value pairs of a RESP3 map or a RESP2 flat list (both decode to alternating items).
fn pairs<'v, 'a>(v: &'v Value<'a>) -> Option<impl Iterator<Item = (String, &'v Value<'a>)>> {
    let Value::List(items) = v else { return None };
    Some(
        items
            .chunks_exact(2)
            .filter_map(|kv| Some((text(&kv[0])?.to_ascii_lowercase(), &kv[1]))),
    )
}

fn slot(v: &Value<'_>) -> Option<u16> {
    let n = int(v)?;
    u16::try_from(n).ok().filter(|&s| usize::from(s) < SLOTS)
}

/// The host to connect to from an endpoint and an IP: the endpoint unless it is unknown
/// (`?`) or empty (Redis `src/cluster.c` `clusterCommandShards`/`addNodeToNodeReply`).
fn pick_host(endpoint: Option<String>, ip: Option<String>) -> Option<String> {
    endpoint
        .filter(|e| !e.is_empty() && e != "?")
        .or(ip.filter(|i| !i.is_empty() && i != "?"))
}

/// Read `CLUSTER SHARDS` (Redis 7.0+ `src/cluster.c` `clusterCommandShards`): per shard,
/// `slots` (start/end pairs) and `nodes` (maps of id, port, tls-port, ip, endpoint,
/// hostname, role, health). `tls` picks each node's `tls-port`. A shard without an
/// online master, or without slots, serves nothing.
pub fn parse_shards(reply: &Value<'_>, tls: bool) -> Result<SlotMap, SlotMapError> {
    let Value::List(shards) = reply else {
        return Err(SlotMapError::Layout("CLUSTER SHARDS is not an array"));
    };
    let mut out = Vec::new();
    for shard in shards {
        let mut ranges = Vec::new();
        let mut master = None;
        let mut replicas = Vec::new();
        for (key, value) in pairs(shard).ok_or(SlotMapError::Layout("shard is not a map"))? {
            match key.as_str() {
                "slots" => {
                    let Value::List(bounds) = value else {
                        return Err(SlotMapError::Layout("slots is not an array"));
                    };
                    for pair in bounds.chunks_exact(2) {
                        match (slot(&pair[0]), slot(&pair[1])) {
                            (Some(a), Some(b)) if a <= b => ranges.push((a, b)),
                            _ => return Err(SlotMapError::Layout("bad slot range")),
                        }
                    }
                }
                "nodes" => {
                    let Value::List(nodes) = value else {
                        return Err(SlotMapError::Layout("nodes is not an array"));
                    };
                    for node in nodes {
                        let mut f: HashMap<String, &Value<'_>> = HashMap::new();
                        for (k, v) in
                            pairs(node).ok_or(SlotMapError::Layout("node is not a map"))?
                        {
                            f.insert(k, v);
                        }
                        let get = |k: &str| f.get(k).and_then(|v| text(v));
                        let port = |k: &str| {
                            f.get(k)
                                .and_then(|v| int(v))
                                .and_then(|p| u16::try_from(p).ok())
                                .filter(|&p| p != 0)
                        };
                        let (port, is_tls) = match (tls, port("tls-port"), port("port")) {
                            (true, Some(p), _) => (p, true),
                            (_, _, Some(p)) => (p, false),
                            (false, Some(p), None) => (p, true),
                            _ => continue,
                        };
                        let Some(host) = pick_host(get("endpoint"), get("ip")) else {
                            continue;
                        };
                        let node = ClusterNode {
                            id: get("id").unwrap_or_default(),
                            host,
                            port,
                            tls: is_tls,
                        };
                        let online = get("health").map_or(true, |h| h == "online");
                        match get("role").as_deref() {
                            Some("master") if online && master.is_none() => master = Some(node),
                            Some("master") => {}
                            _ => replicas.push(node),
                        }
                    }
                }
                _ => {}
            }
        }
        // A master without slots yet (a node just added, before a reshard gives it
        // slots) is kept: it is a member, and `ASK` may name it while slots move to it.
        if let Some(master) = master {
            ranges.sort_unstable();
            out.push(Shard {
                master,
                replicas,
                ranges,
            });
        }
    }
    Ok(SlotMap::new(out))
}

/// Read `CLUSTER SLOTS` (Redis `src/cluster.c` `clusterCommandSlots`): per range,
/// `start, end, master, replicas...`, each node `[ip, port, id, {hostname, ...}]`.
/// Ranges of one master make one shard.
pub fn parse_slots(reply: &Value<'_>) -> Result<SlotMap, SlotMapError> {
    let Value::List(ranges) = reply else {
        return Err(SlotMapError::Layout("CLUSTER SLOTS is not an array"));
    };
    let node_of = |v: &Value<'_>| -> Option<ClusterNode> {
        let Value::List(f) = v else { return None };
        let ip = f.first().and_then(text);
        let port = u16::try_from(int(f.get(1)?)?).ok()?;
        let id = f.get(2).and_then(text).unwrap_or_default();
        let hostname = f.get(3).and_then(|extra| {
            pairs(extra)?
                .find(|(k, _)| k == "hostname")
                .and_then(|(_, v)| text(v))
        });
        // SLOTS gives the preferred endpoint as the first element; a hostname in the
        // metadata is only a fallback when the endpoint is unknown.
        let host = pick_host(ip, hostname)?;
        Some(ClusterNode {
            id,
            host,
            port,
            tls: false,
        })
    };
    let mut shards: Vec<Shard> = Vec::new();
    for range in ranges {
        let Value::List(f) = range else {
            return Err(SlotMapError::Layout("range is not an array"));
        };
        let (Some(start), Some(end)) = (f.first().and_then(slot), f.get(1).and_then(slot)) else {
            return Err(SlotMapError::Layout("bad slot range"));
        };
        let Some(master) = f.get(2).and_then(node_of) else {
            return Err(SlotMapError::Layout("range without a master"));
        };
        let replicas: Vec<ClusterNode> = f.iter().skip(3).filter_map(node_of).collect();
        let same = |s: &Shard| {
            if master.id.is_empty() {
                s.master.address() == master.address()
            } else {
                s.master.id == master.id
            }
        };
        match shards.iter_mut().find(|s| same(s)) {
            Some(s) => s.ranges.push((start, end.max(start))),
            None => shards.push(Shard {
                master,
                replicas,
                ranges: vec![(start, end.max(start))],
            }),
        }
    }
    for s in &mut shards {
        s.ranges.sort_unstable();
    }
    Ok(SlotMap::new(shards))
}

/// What `CLUSTER NODES` says that the slot map does not: each node's config epoch (the
/// version of its claim on its slots, Redis `src/cluster.c` `clusterGenNodeDescription`)
/// and which node answered (`myself`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodesInfo {
    /// Config epoch by node id.
    pub epochs: HashMap<String, u64>,
    /// The answering node's id.
    pub myself: Option<String>,
}

/// Read `CLUSTER NODES` text: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping>
/// <pong> <config-epoch> <link-state> <slots>...` per line.
pub fn parse_nodes(text: &str) -> NodesInfo {
    let mut info = NodesInfo::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        if let Ok(epoch) = f[6].parse::<u64>() {
            info.epochs.insert(f[0].to_string(), epoch);
        }
        if f[2].split(',').any(|flag| flag == "myself") {
            info.myself = Some(f[0].to_string());
        }
    }
    info
}

/// One node's view of the cluster.
#[derive(Debug, Clone)]
pub struct View {
    /// Which node gave it (for logs).
    pub from: String,
    /// Its slot map.
    pub map: SlotMap,
    /// Its config epochs.
    pub nodes: NodesInfo,
}

/// The newest of several views (Redis resolves competing claims on a slot by the higher
/// config epoch, `src/cluster.c` `clusterUpdateSlotsConfigWith`): each view is scored by
/// the epochs of the owners it names, taking for each node the highest epoch any view
/// reports; the highest score wins. Views that tie are grouped by the owners they name,
/// and only a view of the largest group (the majority among all views) is chosen, so a
/// node that disagrees with the others at equal epochs is never followed. `None` for no
/// views, or a tie between equally large groups that disagree.
pub fn choose_view(views: &[View]) -> Option<usize> {
    let mut epochs: HashMap<&str, u64> = HashMap::new();
    for v in views {
        for (id, &e) in &v.nodes.epochs {
            let best = epochs.entry(id.as_str()).or_insert(e);
            *best = (*best).max(e);
        }
    }
    let score = |v: &View| -> u128 {
        v.map
            .owners()
            .map(|id| {
                if id.is_empty() {
                    0
                } else {
                    // An owner no view reports an epoch for still beats no owner.
                    u128::from(epochs.get(id).copied().unwrap_or(0)) + 1
                }
            })
            .sum()
    };
    let scores: Vec<u128> = views.iter().map(score).collect();
    let best = *scores.iter().max()?;
    let tied: Vec<usize> = (0..views.len()).filter(|&i| scores[i] == best).collect();
    if tied.len() == 1 {
        return Some(tied[0]);
    }
    // Among the tied, the group (same owner per slot) that most views agree with.
    let agree = |a: &View, b: &View| a.map.owners().eq(b.map.owners());
    let support = |i: usize| views.iter().filter(|v| agree(&views[i], v)).count();
    let mut ranked: Vec<(usize, usize)> = tied.iter().map(|&i| (support(i), i)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    match ranked.as_slice() {
        [(top, i), rest @ ..] => {
            let contested = rest
                .iter()
                .any(|&(n, j)| n == *top && !agree(&views[*i], &views[j]));
            (!contested).then_some(*i)
        }
        [] => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ReplyLimits, ReplyScanner};
    use bytes::BytesMut;

    fn tree_of(bytes: &[u8], f: impl FnOnce(&Value<'_>)) {
        let mut buf = BytesMut::from(bytes);
        let reply = ReplyScanner::new(ReplyLimits::default())
            .next(&mut buf)
            .unwrap()
            .unwrap();
        f(&reply.tree().unwrap());
    }

    fn bulk(s: &str) -> String {
        format!("${}\r\n{}\r\n", s.len(), s)
    }

    /// A CLUSTER SHARDS reply of one shard, in RESP2 (`*`) or RESP3 (`%`) shape.
    /// (id, endpoint, port, role) of one node in a test reply.
    type TestNode<'a> = (&'a str, &'a str, u16, &'a str);
    /// Slot ranges and nodes of one shard in a test reply.
    type TestShard<'a> = (&'a [(u16, u16)], &'a [TestNode<'a>]);

    fn shards_reply(resp3: bool, shards: &[TestShard<'_>]) -> Vec<u8> {
        let map = |n: usize| {
            if resp3 {
                format!("%{n}\r\n")
            } else {
                format!("*{}\r\n", n * 2)
            }
        };
        let mut out = format!("*{}\r\n", shards.len());
        for (ranges, nodes) in shards {
            out += &map(2);
            out += &bulk("slots");
            out += &format!("*{}\r\n", ranges.len() * 2);
            for (a, b) in ranges.iter() {
                out += &format!(":{a}\r\n:{b}\r\n");
            }
            out += &bulk("nodes");
            out += &format!("*{}\r\n", nodes.len());
            for (id, endpoint, port, role) in nodes.iter() {
                out += &map(7);
                out += &bulk("id");
                out += &bulk(id);
                out += &bulk("port");
                out += &format!(":{port}\r\n");
                out += &bulk("ip");
                out += &bulk("127.0.0.1");
                out += &bulk("endpoint");
                out += &bulk(endpoint);
                out += &bulk("role");
                out += &bulk(role);
                out += &bulk("replication-offset");
                out += ":10\r\n";
                out += &bulk("health");
                out += &bulk("online");
            }
        }
        out.into_bytes()
    }

    #[test]
    fn shards_in_both_protocols() {
        for resp3 in [false, true] {
            let reply = shards_reply(
                resp3,
                &[
                    (
                        &[(0, 5460)],
                        &[
                            ("a", "node-a.example", 7000, "master"),
                            ("b", "127.0.0.1", 7001, "replica"),
                        ],
                    ),
                    (&[(5461, 16383)], &[("c", "127.0.0.1", 7002, "master")]),
                ],
            );
            tree_of(&reply, |t| {
                let map = parse_shards(t, false).unwrap();
                assert_eq!(map.covered(), 16384);
                let s = map.shard_of(0).unwrap();
                // Hostnames are accepted as they are announced.
                assert_eq!(s.master.address(), "node-a.example:7000");
                assert_eq!(s.replicas[0].address(), "127.0.0.1:7001");
                assert_eq!(map.shard_of(16383).unwrap().master.id, "c");
                assert_eq!(map.shard_index(5461), Some(1));
            });
        }
    }

    #[test]
    fn a_master_without_slots_is_a_member_serving_nothing() {
        let reply = shards_reply(
            false,
            &[
                (&[(0, 16383)], &[("a", "127.0.0.1", 7000, "master")]),
                (&[], &[("n", "127.0.0.1", 7009, "master")]),
            ],
        );
        tree_of(&reply, |t| {
            let map = parse_shards(t, false).unwrap();
            assert_eq!(map.covered(), 16384);
            assert!(map.has_node("127.0.0.1:7009"));
            assert!(!map.has_node("127.0.0.1:7010"));
            assert_eq!(map.shard_of(5).unwrap().master.id, "a");
        });
    }

    #[test]
    fn slots_reply_groups_ranges_by_master() {
        let mut r = String::from("*3\r\n");
        for (a, b, id, port) in [
            (0, 100, "m1", 7000),
            (101, 200, "m2", 7001),
            (201, 16383, "m1", 7000),
        ] {
            r += &format!("*4\r\n:{a}\r\n:{b}\r\n");
            r += &format!("*4\r\n{}:{port}\r\n{}*0\r\n", bulk("127.0.0.1"), bulk(id));
            r += &format!(
                "*4\r\n{}:{}\r\n{}*2\r\n{}{}",
                bulk("?"),
                port + 100,
                bulk("r"),
                bulk("hostname"),
                bulk("replica.example")
            );
        }
        tree_of(r.as_bytes(), |t| {
            let map = parse_slots(t).unwrap();
            assert_eq!(map.shards.len(), 2);
            assert_eq!(map.shards[0].ranges, vec![(0, 100), (201, 16383)]);
            assert_eq!(map.covered(), 16384);
            // An unknown endpoint falls back to the announced hostname.
            assert_eq!(map.shards[0].replicas[0].host, "replica.example");
        });
    }

    #[test]
    fn nodes_epochs() {
        let text = "aaa 127.0.0.1:7000@17000 myself,master - 0 0 3 connected 0-5460\n\
                    bbb 127.0.0.1:7001@17001,host-b slave aaa 0 1 3 connected\n\
                    ccc 127.0.0.1:7002@17002 master - 0 1 7 connected 5461-16383\n";
        let info = parse_nodes(text);
        assert_eq!(info.myself.as_deref(), Some("aaa"));
        assert_eq!(info.epochs["ccc"], 7);
        assert_eq!(info.epochs["aaa"], 3);
    }

    fn view(from: &str, owners: &[(&str, (u16, u16))], epochs: &[(&str, u64)]) -> View {
        let shards = owners
            .iter()
            .map(|(id, r)| Shard {
                master: ClusterNode {
                    id: id.to_string(),
                    host: "h".into(),
                    port: 1,
                    tls: false,
                },
                replicas: vec![],
                ranges: vec![*r],
            })
            .collect();
        View {
            from: from.into(),
            map: SlotMap::new(shards),
            nodes: NodesInfo {
                epochs: epochs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                myself: None,
            },
        }
    }

    #[test]
    fn newest_view_wins_by_epoch() {
        // A failover: `b` (epoch 5) took over 0-8191 from `a` (epoch 1); one node still
        // has the old view.
        let old = view(
            "n1",
            &[("a", (0, 8191)), ("c", (8192, 16383))],
            &[("a", 1), ("c", 2)],
        );
        let new = view(
            "n2",
            &[("b", (0, 8191)), ("c", (8192, 16383))],
            &[("b", 5), ("c", 2)],
        );
        assert_eq!(choose_view(&[old.clone(), new.clone()]), Some(1));
        assert_eq!(choose_view(&[new, old]), Some(0));
    }

    #[test]
    fn equal_epochs_follow_the_majority_never_the_outlier() {
        let good = || {
            view(
                "n",
                &[("a", (0, 8191)), ("c", (8192, 16383))],
                &[("a", 3), ("c", 3)],
            )
        };
        let odd = view(
            "x",
            &[("c", (0, 8191)), ("a", (8192, 16383))],
            &[("a", 3), ("c", 3)],
        );
        assert_eq!(choose_view(&[odd.clone(), good(), good()]), Some(1));
        // Two against two at equal epochs: nothing is chosen.
        assert_eq!(choose_view(&[odd.clone(), good(), odd, good()]), None);
        assert_eq!(choose_view(&[]), None);
    }
}
