//! The session in cluster mode (`[cluster]`): each request goes to the confirmed master
//! of its slot over a link per node; nothing cluster-internal reaches the client.
//!
//! - Routing: a keyed request to its slot's confirmed master (`ClusterState::slot_master`),
//!   a keyless one to any confirmed master; keys in several slots get Redis's `-CROSSSLOT`
//!   unless the command is `request_policy:multi_shard`, which is split by slot
//!   (`gather`); `all_shards`/`all_nodes` commands are sent to every master and combined
//!   as their `response_policy` says.
//! - Redirects: `MOVED` (map refreshed, request re-sent to the named node once its ROLE
//!   confirms it master), `ASK` (`ASKING` + the request to the named node, no map change),
//!   `TRYAGAIN`, `CLUSTERDOWN` and `READONLY` are retried in request order on the same
//!   queue machinery as the single-master READONLY retry, bounded by
//!   `routing.failover_wait`; past it the client gets an error naming the slot and node.
//! - Binding: a transaction, WATCH, pub/sub, tracking or MONITOR binds the session to one
//!   node (the first keyed command's slot master); MULTI is held back until that command
//!   names the node (keyless commands before it are answered `+QUEUED` and follow it).
//!   Inside MULTI a command for another slot is answered `+QUEUED` by the proxy and EXEC
//!   `-CROSSSLOT` (discarded on the node), as one node serving every slot.
//! - Subscriptions: channels and patterns on one node, shard channels on their slot's
//!   owner; when a node holding some is lost, or Redis unsubscribes a shard channel whose
//!   slot left the node, they are subscribed again on a confirmed master, the
//!   confirmations hidden, within `routing.failover_wait` (`cluster_resubscribe`).
//! - The `CLUSTER` namespace is the proxy's: it presents itself as one node serving all
//!   16384 slots, so cluster-aware clients never learn node addresses.
//!
//! Must not: forward `ASKING`/`READONLY`/`READWRITE` from a client, or show a redirect.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tracing::debug;

use crate::cluster::aggregate::{self, Part};
use crate::cluster::route::{self, KeySlot};
use crate::cluster::{key_hash_slot, ClusterStore, RedirectKind, SlotMasterError, SLOTS};
use crate::command::{CommandSpec, Flags, PubSubKind, RequestPolicy, Special};
use crate::protocol::{texts, Reply, ReplyKind, Request};

use super::pool::{Delivery, SharedLink};
use super::queue::{Awaiting, Entry, Retained, Unsent};
use super::state::{self, OnReply};
use super::upstream::{Link, LinkEnd, LinkId};
use super::{Outgoing, Session};

/// Keyless commands a held-back MULTI defers at most (and `limits.max_reply_buffer`
/// bytes of them); past either the transaction binds to any master (bounds what a client
/// can make the proxy hold).
const MAX_DEFERRED: usize = 1024;

/// Pause before re-sending after `TRYAGAIN` or `CLUSTERDOWN` (a migration or failover in
/// progress): paces the retries within `routing.failover_wait`.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// A cluster session's own state.
#[derive(Debug)]
pub(super) struct ClusterSession {
    /// Slot of the request being handled (set before it is planned).
    pub(super) slot: KeySlot,
    /// The node a transaction, WATCH, tracking or MONITOR binds the session to.
    pub(super) bound: Option<usize>,
    /// The node holding the session's channel and pattern subscriptions.
    pubsub: Option<usize>,
    /// A connection-state change (HELLO, CLIENT SETNAME, ...) ran on this node: the other
    /// node links predate it and are reopened (with the new state) once idle.
    state_changed_on: Option<usize>,
    /// MULTI was answered and not sent yet: it goes to the first queued command's node.
    multi_pending: bool,
    /// MULTI was sent to `bound`.
    multi_sent: bool,
    /// Keyless commands queued while MULTI is held back (answered `+QUEUED` by the
    /// proxy): they follow MULTI to the node the first keyed command names (or any, at
    /// EXEC), so they never decide the transaction's node.
    deferred: Vec<Bytes>,
    /// The slot a transaction (or WATCH) works on: another slot gets `-CROSSSLOT`.
    txn_slot: Option<u16>,
    /// The address the client connected to: the one node the proxy presents.
    pub(super) local: Option<SocketAddr>,
    /// A split or fanned-out request waiting for the answers in flight before it.
    /// (Boxed: every session carries this struct, cluster mode or not.)
    pub(super) parked: Option<Box<Gather>>,
    /// The slot map generation (`ClusterState::generation`) the requests in flight were
    /// routed by.
    routed_generation: u64,
    /// The node each shard channel subscription was confirmed by (its slot's owner then):
    /// what to subscribe again when that node's link is lost.
    shard_on: HashMap<Bytes, usize>,
    /// Subscriptions to make again on a confirmed master (a node holding them was lost),
    /// before the client's next request.
    resub: Option<Box<Resub>>,
}

/// Subscriptions a lost node held, to make again (`Session::cluster_resubscribe`).
#[derive(Debug)]
pub(super) struct Resub {
    /// When the node was lost: `routing.failover_wait` runs from here.
    since: Instant,
    /// The channel and pattern subscriptions (the session's sets, as confirmed).
    channels: bool,
    /// Shard channels, each with the node it must move away from (`Some`: that node
    /// unsubscribed it itself, its slot moved; `None`: the node's link was lost).
    shard: Vec<(Bytes, Option<usize>)>,
}

impl Default for ClusterSession {
    fn default() -> Self {
        ClusterSession {
            slot: KeySlot::NoKeys,
            bound: None,
            pubsub: None,
            state_changed_on: None,
            multi_pending: false,
            multi_sent: false,
            deferred: Vec::new(),
            txn_slot: None,
            local: None,
            parked: None,
            routed_generation: 0,
            shard_on: HashMap::new(),
            resub: None,
        }
    }
}

impl ClusterSession {
    /// Whether the link to node `index` holds state a new link would not have (the
    /// bound node of a transaction, WATCH, tracking or MONITOR; the subscriptions' node).
    pub(super) fn holds_state(&self, index: usize) -> bool {
        self.bound == Some(index)
            || self.pubsub == Some(index)
            || self.shard_on.values().any(|&n| n == index)
    }

    /// Forget node `index` as a holder of state (its link ended); `true` when it held
    /// subscriptions of `state`, which are then to be made again (`resubscribing`).
    pub(super) fn forget(&mut self, index: usize, state: &super::state::ConnState) -> bool {
        if self.bound == Some(index) {
            self.bound = None;
        }
        let channels =
            self.pubsub == Some(index) && !(state.channels.is_empty() && state.patterns.is_empty());
        if self.pubsub == Some(index) {
            self.pubsub = None;
        }
        let mut shard = Vec::new();
        self.shard_on.retain(|c, n| {
            if *n != index {
                return true;
            }
            if state.shard_channels.contains(c) {
                shard.push((c.clone(), None));
            }
            false
        });
        self.resubscribe_later(channels, shard)
    }

    /// Note subscriptions to make again; `true` when there are any.
    fn resubscribe_later(&mut self, channels: bool, shard: Vec<(Bytes, Option<usize>)>) -> bool {
        if !channels && shard.is_empty() {
            return false;
        }
        match &mut self.resub {
            // Another loss before the first was handled: one bound, from the first.
            Some(r) => {
                r.channels |= channels;
                r.shard.extend(shard);
            }
            None => {
                self.resub = Some(Box::new(Resub {
                    since: Instant::now(),
                    channels,
                    shard,
                }))
            }
        }
        true
    }

    /// Whether subscriptions wait to be made again.
    pub(super) fn resubscribing(&self) -> bool {
        self.resub.is_some()
    }

    /// A shard channel confirmed subscribed (or unsubscribed) by node `index`.
    pub(super) fn shard_confirmed(&mut self, channel: &Bytes, index: usize, subscribed: bool) {
        if subscribed {
            self.shard_on.insert(channel.clone(), index);
        } else {
            self.shard_on.remove(channel);
        }
    }
}

/// A request answered from several nodes.
#[derive(Debug)]
pub(super) struct Gather {
    spec: &'static CommandSpec,
    req: Request,
    how: GatherKind,
}

/// How a gathered request reaches the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GatherKind {
    /// Split by slot (`request_policy:multi_shard`).
    Split,
    /// Sent to every master (`all_shards`, `all_nodes`).
    FanOut,
    /// `SCAN`: one shard at a time, the shard in the cursor.
    Scan,
}

/// Which connection to a node a request takes in shared mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SharedRoute {
    /// The node's shared connection.
    Shared(LinkId),
    /// The session's own link to the node.
    Dedicated,
    /// After the answers the other path still owes (the request is parked).
    Wait,
}

/// Shards a SCAN cursor can name: the cursor the client sees is
/// `node cursor × SCAN_SHARDS + shard index`.
const SCAN_SHARDS: u64 = 1024;

/// A redirect a node answered (Redis `src/cluster.c` `clusterRedirectClient`), kept
/// with the request until it is re-sent.
#[derive(Debug, Clone)]
pub(super) struct Redirect {
    /// `None`: no node answered; the request was never written (its node's connection
    /// was lost or could not be opened) and goes to its slot's confirmed master.
    kind: Option<RedirectKind>,
    /// The request's slot (from `MOVED`/`ASK`, else from its keys).
    slot: Option<u16>,
    /// When the client's request was read: `routing.failover_wait` runs from there.
    since: Instant,
    /// The node `MOVED`/`ASK` names.
    target: Option<String>,
    /// Who answered, and what (for the give-up text).
    node: String,
    text: String,
}

impl Redirect {
    /// A request never written to `node` (read from the client at `since`): retried on
    /// its slot's confirmed master within `routing.failover_wait` from `since`.
    pub(super) fn unsent(since: Instant, node: &str) -> Box<Redirect> {
        Box::new(Redirect {
            kind: None,
            slot: None,
            since,
            target: None,
            node: node.to_string(),
            text: "the connection was lost before the request was sent".to_string(),
        })
    }

    /// An `EVALSHA` that `node` answered `-NOSCRIPT`: re-sent there (its key's owner), the
    /// script loaded first.
    pub(super) fn noscript(since: Instant, node: &str) -> Box<Redirect> {
        Box::new(Redirect {
            kind: None,
            slot: None,
            since,
            target: Some(node.to_string()),
            node: node.to_string(),
            text: "NOSCRIPT".to_string(),
        })
    }
}

/// Parse a redirect error: `MOVED <slot> <host:port>`, `ASK <slot> <host:port>`,
/// `TRYAGAIN ...`, `CLUSTERDOWN ...`, `READONLY ...`. An empty or `?` host (unknown
/// endpoint) means the answering node's host.
fn redirect_of(reply: &Reply, node: &str) -> Option<(Redirect, Option<u16>)> {
    let code = reply.error_code()?;
    let kind = match code {
        b"MOVED" => RedirectKind::Moved,
        b"ASK" => RedirectKind::Ask,
        b"TRYAGAIN" => RedirectKind::TryAgain,
        b"CLUSTERDOWN" => RedirectKind::ClusterDown,
        b"READONLY" => RedirectKind::ReadOnly,
        _ => return None,
    };
    let text = String::from_utf8_lossy(reply.text().unwrap_or_default()).into_owned();
    let mut slot = None;
    let mut target = None;
    if matches!(kind, RedirectKind::Moved | RedirectKind::Ask) {
        let mut words = text.split_ascii_whitespace().skip(1);
        slot = words.next().and_then(|s| s.parse::<u16>().ok());
        let addr = words.next()?;
        let (host, port) = addr.rsplit_once(':')?;
        let host = if host.is_empty() || host == "?" {
            node.rsplit_once(':').map_or("", |(h, _)| h)
        } else {
            host
        };
        target = Some(format!("{host}:{port}"));
    }
    Some((
        Redirect {
            kind: Some(kind),
            slot,
            since: Instant::now(),
            target,
            node: node.to_string(),
            text,
        },
        slot,
    ))
}

/// The slot of a retained request frame (its keys' slot), for retries whose redirect
/// does not name it (`TRYAGAIN`, `CLUSTERDOWN`, `READONLY`).
fn slot_of_frame(frame: &Bytes) -> Option<u16> {
    let mut buf = BytesMut::from(&frame[..]);
    let req = crate::protocol::RequestParser::new(crate::protocol::RequestLimits::default())
        .parse(&mut buf)
        .ok()??;
    let crate::command::Lookup::Known(spec) =
        crate::command::lookup(req.arg(0).unwrap_or_default(), req.arg(1))
    else {
        return None;
    };
    match route::request_slot(spec, &req) {
        KeySlot::Slot(s) => Some(s),
        _ => None,
    }
}

/// The command name of a canonical request frame (`*N\r\n$L\r\nNAME\r\n...`); empty
/// when the frame is not in that shape.
fn command_name(frame: &[u8]) -> &[u8] {
    let mut lines = frame.splitn(4, |&b| b == b'\n');
    let (_, Some(len), Some(name)) = (lines.next(), lines.next(), lines.next()) else {
        return &[];
    };
    let len = std::str::from_utf8(len.strip_prefix(b"$").unwrap_or_default())
        .ok()
        .and_then(|l| l.trim_end().parse::<usize>().ok())
        .unwrap_or(0);
    name.get(..len).unwrap_or_default()
}

/// The empty function library as `FUNCTION DUMP` writes it (no library, then the RDB
/// version, 10 as of Redis 7.0, little-endian, and the CRC64 of both: `verifyDumpPayload`
/// accepts any version up to the server's own).
const EMPTY_FUNCTION_DUMP: &[u8] = b"\x0a\x00\x5d\x9b\x5c\x40\x0f\x7f\xa2\xda";

/// The write-offset bump of cluster mode: `FUNCTION RESTORE <empty> APPEND` restores no
/// library yet is propagated to the replicas (Redis counts it as a change), so it moves
/// the write offset of the link it runs on (Redis's `c->woff`) to the current one. The
/// single-master bump (`pool::wait_offset_bump`, a PUBLISH) is not propagated in cluster
/// mode: Redis sends PUBLISH over the cluster bus instead of the replication stream.
pub(super) fn cluster_wait_offset_bump() -> Bytes {
    Request::from_args(&[
        b"FUNCTION".as_slice(),
        b"RESTORE",
        EMPTY_FUNCTION_DUMP,
        b"APPEND",
    ])
    .into_frame()
}

/// A stable 40-hex node id for the proxy at `addr` (what `CLUSTER MYID` answers).
fn proxy_node_id(addr: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("portcullis {addr}").as_bytes());
    digest.iter().take(20).map(|b| format!("{b:02x}")).collect()
}

fn bulk(out: &mut BytesMut, s: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", s.len()).as_bytes());
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

/// A text reply as Redis sends `CLUSTER INFO`/`NODES` (`addReplyVerbatim`): a bulk string
/// in RESP2, a `txt` verbatim string in RESP3.
fn verbatim(text: &str, resp3: bool) -> Bytes {
    if resp3 {
        Bytes::from(format!("={}\r\ntxt:{text}\r\n", text.len() + 4))
    } else {
        Bytes::from(format!("${}\r\n{text}\r\n", text.len()))
    }
}

/// One element of a split reply, as `aggregate` takes it.
fn part_of(reply: &Reply, limits: crate::protocol::ReplyLimits) -> Part {
    match reply.kind() {
        ReplyKind::Error | ReplyKind::BlobError => Part::Error(reply.frame().clone()),
        ReplyKind::Integer => {
            let frame = reply.frame();
            std::str::from_utf8(
                frame
                    .get(1..frame.len().saturating_sub(2))
                    .unwrap_or_default(),
            )
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or_else(|| Part::Other(frame.clone()), Part::Int)
        }
        ReplyKind::Array => match state::split_array(reply, limits) {
            Some((_, elements)) => Part::Array(elements),
            None => Part::Other(reply.frame().clone()),
        },
        _ => Part::Other(reply.frame().clone()),
    }
}

impl Session {
    fn cluster(&self) -> Option<&std::sync::Arc<ClusterStore>> {
        self.shared.cluster.as_ref()
    }

    /// Cluster mode, before a request is planned: answer the `CLUSTER` namespace, refuse
    /// client redirect commands and cross-slot requests, hold split and fan-out requests;
    /// `true` when the request was handled here.
    pub(super) fn cluster_intercept(&mut self, spec: &'static CommandSpec, req: &Request) -> bool {
        self.cl.slot = KeySlot::NoKeys;
        if let Some(sub) = spec.name.strip_prefix("cluster|") {
            return self.cluster_namespace(sub, req);
        }
        if matches!(spec.special, Special::ReadOnly | Special::ReadWrite) || spec.name == "asking" {
            let name = spec.name.to_ascii_uppercase();
            self.refuse(texts::cluster_client_redirect_refused(&name));
            return true;
        }
        let in_txn = self.txn.is_some();
        if !spec.arity_allows(req.argc()) {
            // Redis checks the argument count first. Inside MULTI the proxy answers it
            // (the refusal dooms the transaction, which decides EXEC's answer).
            if in_txn {
                self.refuse(texts::wrong_arity(spec.name));
                return true;
            }
            return false;
        }
        if in_txn && spec.flags.contains(Flags::NO_MULTI) {
            // Checked before the cluster, so before the proxy picks a node.
            self.refuse(Bytes::from_static(texts::NOT_IN_MULTI));
            return true;
        }
        if in_txn && spec.special == Special::Watch {
            // Redis answers it before looking at the keys' node; the transaction goes on.
            self.answer(Bytes::from_static(texts::WATCH_IN_MULTI));
            return true;
        }
        let slot = route::request_slot(spec, req);
        if spec.name == "scan" && spec.request_policy == RequestPolicy::Special && !in_txn {
            // The cursor names the shard (request_policy:special).
            self.cl.parked = Some(Box::new(Gather {
                spec,
                req: req.clone(),
                how: GatherKind::Scan,
            }));
            return true;
        }
        match slot {
            KeySlot::CrossSlot if spec.request_policy == RequestPolicy::MultiShard && !in_txn => {
                self.cl.parked = Some(Box::new(Gather {
                    spec,
                    req: req.clone(),
                    how: GatherKind::Split,
                }));
                return true;
            }
            KeySlot::CrossSlot => {
                self.refuse(Bytes::from_static(texts::CROSSSLOT));
                return true;
            }
            KeySlot::Slot(s) if in_txn => {
                // One node serving every slot queues a command for any slot and checks
                // the transaction's slots at EXEC: the bound node cannot run this one.
                let elsewhere = self.cl.txn_slot.is_some_and(|t| t != s)
                    || self
                        .cl
                        .bound
                        .is_some_and(|b| !self.cluster_serves(b, Some(s)));
                if elsewhere {
                    self.queue_cross_slot();
                    return true;
                }
                self.cl.txn_slot = Some(s);
            }
            KeySlot::NoKeys
                if matches!(
                    spec.request_policy,
                    RequestPolicy::AllShards | RequestPolicy::AllNodes
                ) && !in_txn
                    && self.cl.bound.is_none()
                    && spec.special == Special::None =>
            {
                self.cl.parked = Some(Box::new(Gather {
                    spec,
                    req: req.clone(),
                    how: GatherKind::FanOut,
                }));
                return true;
            }
            _ => {}
        }
        self.cl.slot = slot;
        false
    }

    /// A command inside MULTI for a slot the transaction cannot hold (its arity and
    /// `no_multi` already checked, as Redis checks them before the cluster): answered
    /// `+QUEUED`, the transaction marked cross-slot unless already doomed (Redis
    /// `src/server.c` `processCommand`, `src/multi.c` `queueMultiCommand`).
    fn queue_cross_slot(&mut self) {
        if let Some(txn) = &mut self.txn {
            // Once a command was refused, Redis answers QUEUED but keeps no more
            // commands (`multi.c` `queueMultiCommand`): EXEC then answers EXECABORT.
            txn.cross_slot |= !txn.dirty;
            txn.queue(None);
        }
        self.answer(Bytes::from_static(texts::QUEUED));
    }

    /// `CLUSTER <sub>`: the proxy as one node serving every slot.
    fn cluster_namespace(&mut self, sub: &str, req: &Request) -> bool {
        let addr = self
            .cl
            .local
            .map_or_else(|| "127.0.0.1:6379".to_string(), |a| a.to_string());
        let (ip, port) = addr.rsplit_once(':').unwrap_or(("127.0.0.1", "6379"));
        let ip = ip.trim_start_matches('[').trim_end_matches(']').to_string();
        let port_n: u16 = port.parse().unwrap_or(6379);
        let id = proxy_node_id(&addr);
        let resp3 = self.state.resp3;
        let ready = match self.cluster() {
            Some(c) => c.load().ready(&self.shared.topology.load()),
            None => false,
        };
        let epoch = self.cluster().map_or(0, |c| c.load().epoch).max(1);
        let reply = match sub {
            "myid" | "myshardid" => {
                let mut out = BytesMut::new();
                bulk(&mut out, id.as_bytes());
                out.freeze()
            }
            "keyslot" => match req.arg(2) {
                Some(key) => Bytes::from(format!(":{}\r\n", key_hash_slot(key))),
                None => texts::wrong_arity("cluster|keyslot"),
            },
            "slots" => {
                let mut out = BytesMut::new();
                out.extend_from_slice(
                    format!("*1\r\n*3\r\n:0\r\n:{}\r\n*3\r\n", SLOTS - 1).as_bytes(),
                );
                bulk(&mut out, ip.as_bytes());
                out.extend_from_slice(format!(":{port_n}\r\n").as_bytes());
                bulk(&mut out, id.as_bytes());
                out.freeze()
            }
            "shards" => {
                let map = |n: usize| {
                    if resp3 {
                        format!("%{n}\r\n")
                    } else {
                        format!("*{}\r\n", n * 2)
                    }
                };
                let mut out = BytesMut::new();
                out.extend_from_slice(b"*1\r\n");
                out.extend_from_slice(map(2).as_bytes());
                bulk(&mut out, b"slots");
                out.extend_from_slice(format!("*2\r\n:0\r\n:{}\r\n", SLOTS - 1).as_bytes());
                bulk(&mut out, b"nodes");
                out.extend_from_slice(b"*1\r\n");
                out.extend_from_slice(map(7).as_bytes());
                for (k, v) in [
                    ("id", id.as_str()),
                    ("port", ""),
                    ("ip", ip.as_str()),
                    ("endpoint", ip.as_str()),
                    ("role", "master"),
                    ("replication-offset", ""),
                    ("health", if ready { "online" } else { "failed" }),
                ] {
                    bulk(&mut out, k.as_bytes());
                    match k {
                        "port" => out.extend_from_slice(format!(":{port_n}\r\n").as_bytes()),
                        "replication-offset" => out.extend_from_slice(b":0\r\n"),
                        _ => bulk(&mut out, v.as_bytes()),
                    }
                }
                out.freeze()
            }
            "nodes" => {
                let text = format!(
                    "{id} {ip}:{port_n}@0 myself,master - 0 0 {epoch} connected 0-{}\n",
                    SLOTS - 1
                );
                verbatim(&text, resp3)
            }
            "info" => {
                let state = if ready { "ok" } else { "fail" };
                let ok = if ready { SLOTS } else { 0 };
                let text = format!(
                    "cluster_enabled:1\r\ncluster_state:{state}\r\ncluster_slots_assigned:{SLOTS}\r\ncluster_slots_ok:{ok}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:{}\r\ncluster_known_nodes:1\r\ncluster_size:1\r\ncluster_current_epoch:{epoch}\r\ncluster_my_epoch:{epoch}\r\ncluster_stats_messages_sent:0\r\ncluster_stats_messages_received:0\r\ntotal_cluster_links_buffer_limit_exceeded:0\r\n",
                    SLOTS - ok
                );
                verbatim(&text, resp3)
            }
            "countkeysinslot" | "getkeysinslot" => {
                // Answered by the slot's owner (an invalid slot by any master, which
                // gives Redis's own error).
                let slot = req
                    .arg(2)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<u16>().ok())
                    .filter(|&s| usize::from(s) < SLOTS);
                self.cl.slot = slot.map_or(KeySlot::NoKeys, KeySlot::Slot);
                return false;
            }
            "help" => return false,
            other => {
                self.refuse(texts::cluster_subcommand_refused(
                    &other.to_ascii_uppercase(),
                ));
                return true;
            }
        };
        self.answer(reply);
        true
    }

    /// Cluster mode's `send`: pick the node, open its link, queue the request.
    /// The common case, with no future to box: a keyed plain request outside any
    /// transaction, binding or pending state change, whose slot's master is confirmed at
    /// this wake-up and reachable on a link the session has (or the node's shared
    /// connection), routed as `cluster_send` would. `Err(out)`: take `cluster_send`.
    pub(super) fn cluster_send_now(&mut self, mut out: Outgoing) -> Result<(), Outgoing> {
        let KeySlot::Slot(slot) = self.cl.slot else {
            return Err(out);
        };
        let plain = matches!(out.on_reply, OnReply::Forward)
            && self.txn.is_none()
            && !self.watching
            && !self.cl.multi_pending
            && !self.cl.multi_sent
            && self.cl.bound.is_none()
            && self.cl.state_changed_on.is_none()
            && !self.state.tracking
            && !self.state.monitor;
        let Some(cluster) = self.cluster().filter(|_| plain) else {
            return Err(out);
        };
        let target = {
            let state = cluster.load();
            if state.generation != self.cl.routed_generation {
                return Err(out);
            }
            let now = tokio::time::Instant::from_std(self.now);
            match state.slot_master_at(slot, &self.shared.topology.load(), now) {
                Ok(i) => i,
                Err(_) => return Err(out),
            }
        };
        let dedicated = self.upstream.node_link(target);
        let id = match self.cluster_shared_route(target, dedicated, &out) {
            SharedRoute::Shared(id) => id,
            SharedRoute::Dedicated => match dedicated {
                Some(id) => id,
                None => return Err(out),
            },
            SharedRoute::Wait => return Err(out),
        };
        out.retryable = true;
        self.push_to(id, out);
        self.cl.txn_slot = None;
        Ok(())
    }

    pub(super) async fn cluster_send(&mut self, mut out: Outgoing) {
        // Lowercased on the stack: this runs per request.
        let mut buf = [0u8; 8];
        // Longer than any name compared below: matches none.
        let name = crate::command::fold_case(command_name(&out.frame), &mut buf).unwrap_or(&[]);
        let deliver = out.deliver;
        let ends_txn = matches!(name, b"exec" | b"discard" | b"reset");
        if name == b"multi" {
            if self.cl.multi_pending {
                self.push_local(deliver.then(|| Bytes::from_static(texts::MULTI_NESTED)));
                return;
            }
            if !self.cl.multi_sent && (self.cl.bound.is_none() || !self.watching) {
                // Held back until the first queued command names the node.
                self.cl.multi_pending = true;
                self.push_local(deliver.then(|| Bytes::from_static(texts::OK)));
                return;
            }
        }
        let deferred_exec = name == b"exec"
            && !self.cl.deferred.is_empty()
            && !matches!(out.on_reply, OnReply::Replace(_));
        if ends_txn && self.cl.multi_pending && !deferred_exec {
            // Nothing was queued anywhere: answer as Redis does for an empty transaction.
            self.cl.deferred.clear();
            self.cl.multi_pending = false;
            self.cl.txn_slot = None;
            let reply = match &out.on_reply {
                OnReply::Replace(r) => Bytes::from_static(r),
                _ if name == b"exec" => Bytes::from_static(b"*0\r\n"),
                _ => Bytes::from_static(texts::OK),
            };
            if !(self.state.tracking || self.state.monitor) {
                self.cl.bound = None;
            }
            if name != b"reset" {
                self.push_local(deliver.then_some(reply));
                return;
            }
        }
        if let Some(changed) = self.cl.state_changed_on {
            if self.queue.is_empty() {
                // The change is answered: links opened before it carry the old state.
                let cl = &self.cl;
                for slot in self.upstream.nodes.iter_mut() {
                    let keep = slot
                        .as_ref()
                        .is_some_and(|l| l.index == changed || cl.holds_state(l.index));
                    if !keep {
                        *slot = None;
                    }
                }
                self.cl.state_changed_on = None;
            }
        }
        let slot = match self.cl.slot {
            KeySlot::Slot(s) => Some(s),
            _ => None,
        };
        if self.cl.multi_pending
            && self.txn.is_some()
            && slot.is_none()
            && self.cl.deferred.len() < MAX_DEFERRED
            && self.cl.deferred.iter().map(Bytes::len).sum::<usize>() + out.frame.len()
                <= self.rt.config.limits.max_reply_buffer
        {
            // Keyless: Redis queues it; it follows MULTI to the first keyed command's node.
            self.cl.deferred.push(out.frame);
            self.push_local(deliver.then(|| Bytes::from_static(texts::QUEUED)));
            return;
        }
        // What ties this request to one node: a transaction or WATCH (to the bound node,
        // for the slot it holds), tracking or MONITOR (their feed is one node's), pub/sub
        // (channel subscriptions live on one node; shard channels on their slot's owner).
        // While WATCH is active only WATCH itself (and MULTI, EXEC, ...) needs the watched
        // node: other commands go to their own slot's node, as on one node.
        let txn_like = self.txn.is_some()
            || (self.watching && name == b"watch")
            || self.cl.multi_sent
            || (self.cl.bound.is_some() && (ends_txn || name == b"unwatch"));
        let feed = self.state.tracking || self.state.monitor;
        let pubsub = matches!(out.on_reply, OnReply::PubSub { .. });
        // From the wake-up that read it: no clock read per request.
        let deadline =
            tokio::time::Instant::from_std(self.now) + self.rt.config.routing.failover_wait;
        let (target, id) = loop {
            let pick = if txn_like || (feed && slot.is_none()) {
                self.cl.bound
            } else if pubsub && slot.is_none() {
                self.cl.pubsub
            } else {
                None
            };
            let target = match pick {
                Some(b) => {
                    if txn_like && !self.cluster_serves(b, slot) {
                        // Another node serves it: the transaction's node cannot run it.
                        if let Some(txn) = &mut self.txn {
                            txn.dirty = true;
                        }
                        self.push_local(deliver.then(|| Bytes::from_static(texts::CROSSSLOT)));
                        return;
                    }
                    b
                }
                None => match self.cluster_target(slot).await {
                    Ok(i) => i,
                    Err(reply) => {
                        if let Some(txn) = &mut self.txn {
                            txn.dirty = true;
                        }
                        self.push_local(deliver.then_some(reply));
                        return;
                    }
                },
            };
            if !(txn_like || feed || pubsub || ends_txn) {
                // The map changed since the requests in flight were routed: one of them
                // may be for this slot on its old owner, and be retried from there (after
                // a redirect, or never written when that node died). Send after them, so
                // a slot's requests run in the order they were read.
                let generation = self.cluster().map_or(0, |c| c.load().generation);
                if generation != self.cl.routed_generation {
                    if self.queue.waiting_on_nodes() || self.queue.retries() > 0 {
                        self.parked = Some(out);
                        return;
                    }
                    self.cl.routed_generation = generation;
                }
                let dedicated = self.upstream.node_link(target);
                match self.cluster_shared_route(target, dedicated, &out) {
                    SharedRoute::Shared(shared) => break (target, shared),
                    SharedRoute::Dedicated => {}
                    SharedRoute::Wait => {
                        // The other path to this node still owes answers: send after
                        // them, so the node runs the session's requests in order.
                        self.parked = Some(out);
                        return;
                    }
                }
            }
            if self
                .upstream
                .shared_node(target)
                .is_some_and(|id| self.queue.waiting_on(id))
            {
                // The node's shared connection still owes this session answers: what goes
                // on the session's own link to that node runs after them (a transaction
                // or WATCH must see the writes sent before it).
                self.parked = Some(out);
                return;
            }
            match self.cluster_link(target).await {
                Ok(id) => break (target, id),
                // A node that refused the connection was reported down (`open_link`): the
                // next pick waits for its shard's new master, within the failover wait.
                Err(_)
                    if pick.is_none()
                        && !matches!(self.phase, super::Phase::Ending(_))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(super::RECONNECT_PAUSE).await;
                }
                Err(reply) => {
                    self.push_local(deliver.then_some(reply));
                    return;
                }
            }
        };
        if (txn_like || feed) && self.cl.bound.is_none() {
            self.cl.bound = Some(target);
        }
        if pubsub && slot.is_none() && self.cl.pubsub.is_none() {
            self.cl.pubsub = Some(target);
        }
        if self.cl.multi_pending && (self.txn.is_some() || deferred_exec) {
            self.cl.multi_pending = false;
            self.cl.multi_sent = true;
            self.push_to(id, Outgoing::plain(Request::from_args(&[b"MULTI"]), false));
            for frame in std::mem::take(&mut self.cl.deferred) {
                // Answered `+QUEUED` already: the node's answer is not delivered.
                let queued = Outgoing {
                    frame,
                    ..Outgoing::plain(Request::from_args(&[b"PING"]), false)
                };
                self.push_to(id, queued);
            }
        } else if name == b"multi" {
            self.cl.multi_sent = true;
        }
        if matches!(out.on_reply, OnReply::Apply(_)) && self.txn.is_none() {
            // Parse nothing more until it is answered; then the other links are reopened.
            self.barrier = true;
            self.cl.state_changed_on = Some(target);
        }
        // Plain requests outside a transaction can be re-sent after a redirect.
        out.retryable = matches!(out.on_reply, OnReply::Forward) && self.txn.is_none() && !ends_txn;
        self.cl.slot = slot.map_or(KeySlot::NoKeys, KeySlot::Slot);
        self.push_to(id, out);
        if ends_txn {
            self.cl.multi_sent = false;
            self.cl.multi_pending = false;
        }
        if name == b"reset" {
            self.cl.pubsub = None;
            self.cl.shard_on.clear();
        }
        if self.txn.is_none() && !self.watching && !self.cl.multi_sent {
            self.cl.txn_slot = None;
            if !feed || name == b"reset" {
                self.cl.bound = None;
            }
        }
    }

    /// Shared mode (`routing.backend_connections = "shared"`): the node's shared
    /// connection for a request that neither carries nor needs connection state, as in
    /// single-master shared mode; the session's own link otherwise. Per node, one path at a
    /// time: switching waits until the other has answered everything.
    fn cluster_shared_route(
        &mut self,
        target: usize,
        dedicated: Option<LinkId>,
        out: &Outgoing,
    ) -> SharedRoute {
        let routing = &self.rt.config.routing;
        if routing.backend_connections != crate::config::BackendConnections::Shared {
            return SharedRoute::Dedicated;
        }
        let limits = &self.rt.config.limits;
        let on_dedicated = dedicated.is_some_and(|id| self.queue.waiting_on(id));
        let current = self.upstream.shared_node(target);
        let on_shared = current.is_some_and(|id| self.queue.waiting_on(id));
        let not_shared = if on_shared {
            SharedRoute::Wait
        } else {
            SharedRoute::Dedicated
        };
        let shareable = self.cmd_shareable
            && !out.blocking
            && out.frames == 1
            && matches!(out.on_reply, OnReply::Forward)
            && self.txn.is_none()
            && !self.watching
            && !self.rt.passthrough()
            && self.state.shareable()
            // A client that saw its connection id (or uses WAIT) keeps its own links.
            && !self.own_link
            && self.to_client.bytes < limits.max_reply_buffer / 2;
        if !shareable {
            return not_shared;
        }
        if on_dedicated {
            // Stay on the session's link until it has answered (a pipeline keeps order).
            return if on_shared {
                SharedRoute::Wait
            } else {
                SharedRoute::Dedicated
            };
        }
        let id = match current {
            Some(id) => id,
            None => {
                let size = routing.shared_connections;
                let key = usize::from(self.peer.port());
                let Some(conn) = self.shared.pools.conn(&self.shared, target, size, key) else {
                    return SharedRoute::Dedicated;
                };
                if !conn.usable() {
                    return SharedRoute::Dedicated;
                }
                match self.upstream.add_shared_node(SharedLink::new(target, conn)) {
                    Some(id) => id,
                    None => return SharedRoute::Dedicated,
                }
            }
        };
        match self.upstream.shared_node_mut(id) {
            Some(s) if s.conn.usable() => {
                if s.has_room(limits.max_reply_buffer, limits.max_pending) {
                    // The session's own link to the node is no longer needed: release it.
                    if let Some(d) = dedicated {
                        if !self.cl.holds_state(target) && self.upstream.take(d).is_some() {
                            // Its write offset goes with it.
                            self.wait_needs_bump = true;
                        }
                    }
                    SharedRoute::Shared(id)
                } else {
                    SharedRoute::Wait
                }
            }
            _ => not_shared,
        }
    }

    /// What a node's shared connection delivered, and whatever else is already there.
    pub(super) fn on_node_deliveries(&mut self, id: LinkId, first: Delivery) {
        let mut next = Some(first);
        while let Some(d) = next {
            self.replies_at = self.now;
            if let Some(shared) = self.upstream.shared_node_mut(id) {
                shared.answered(d.answers(), d.bytes());
            }
            match d {
                Delivery::Reply(r) => self.node_shared_reply(id, r),
                Delivery::Run(run) => {
                    for r in run.into_replies() {
                        self.node_shared_reply(id, r);
                    }
                }
                Delivery::Fail { n, reply } => {
                    self.queue.fail_first(id, n, &reply);
                    self.queue.drain(&mut self.to_client);
                }
                Delivery::Unsent { n, reply } => {
                    // Never written: retried on the slot's confirmed master within the
                    // failover wait, in order, as after a redirect.
                    let node = self
                        .upstream
                        .node_of(id)
                        .map(|(label, _)| label)
                        .unwrap_or_default();
                    self.queue.unsent(id, Unsent::First(n), &reply, |a| {
                        Some(Redirect::unsent(a.sent, &node))
                    });
                    self.queue.drain(&mut self.to_client);
                }
            }
            next = self
                .upstream
                .shared_node_mut(id)
                .and_then(SharedLink::try_recv);
        }
    }

    fn node_shared_reply(&mut self, id: LinkId, reply: Reply) {
        if self.upstream.shared_node_mut(id).is_none() || self.on_reply(reply, id) {
            return;
        }
        tracing::warn!(peer = %self.peer, "shared cluster node connection sent an unexpected reply; closing session");
        self.upstream.close();
        self.queue.clear();
        self.end_after_replies(super::SessionEnd::BackendDesync);
    }

    /// Whether node `index` serves `slot` by the current map (keyless: yes).
    fn cluster_serves(&self, index: usize, slot: Option<u16>) -> bool {
        let (Some(s), Some(c)) = (slot, self.cluster()) else {
            return true;
        };
        match c.load().slot_master(s, &self.shared.topology.load()) {
            Ok(owner) => owner == index,
            // No confirmed owner now: the bound node answers (MOVED/CLUSTERDOWN if not).
            Err(_) => true,
        }
    }

    /// The confirmed master for `slot` (any confirmed master for none), waiting up to
    /// `routing.failover_wait` for one; the error reply names the slot and why.
    async fn cluster_target(&self, slot: Option<u16>) -> Result<usize, Bytes> {
        if let (Some(s), Some(cluster)) = (slot, self.cluster()) {
            // The common case: confirmed now (the clock read once per wake-up).
            let now = tokio::time::Instant::from_std(self.now);
            if let Ok(i) = cluster
                .load()
                .slot_master_at(s, &self.shared.topology.load(), now)
            {
                return Ok(i);
            }
        }
        let Some(cluster) = self.cluster().cloned() else {
            return Err(Bytes::from_static(texts::NO_BACKEND));
        };
        let wait = self.rt.config.routing.failover_wait;
        match slot {
            Some(s) => cluster.wait_for_slot_master(s, wait).await.map_err(|e| {
                let why = match e {
                    SlotMasterError::NoMap => {
                        "no node has answered with the slot map yet".to_string()
                    }
                    SlotMasterError::Uncovered => "the slot map names no master for it".to_string(),
                    SlotMasterError::Unconfirmed { node } => {
                        format!("node {node} is not confirmed master by its own ROLE")
                    }
                };
                texts::cluster_slot_unserved(s, &why)
            }),
            None => {
                // A node the session is already connected to, when one is confirmed.
                let state = cluster.load();
                let confirmed = state.confirmed_masters(&self.shared.topology.load());
                if let Some(l) = self
                    .upstream
                    .nodes
                    .iter()
                    .flatten()
                    .find(|l| confirmed.contains(&l.index))
                {
                    return Ok(l.index);
                }
                let seed = usize::from(self.peer.port());
                cluster
                    .wait_for_any_master(seed, wait)
                    .await
                    .ok_or_else(|| Bytes::from_static(texts::CLUSTER_NO_MASTER))
            }
        }
    }

    /// The session's link to node `index`, opened when needed.
    async fn cluster_link(&mut self, index: usize) -> Result<LinkId, Bytes> {
        if let Some(id) = self.upstream.node_link(index) {
            return Ok(id);
        }
        match self.open_link(index).await {
            Ok(link) => self.upstream.add_node(link).ok_or_else(|| {
                texts::error("ERR portcullis: this connection reaches too many cluster nodes")
            }),
            Err(failure) => {
                if failure.credentials_refused {
                    self.close_for_credentials();
                }
                Err(failure.reply)
            }
        }
    }

    /// A node answered request `index` (in the queue) on link `id` with `reply`: when it
    /// is a cluster redirect, arrange its retry. `None`: not a redirect; `Some(None)`:
    /// retried; `Some(Some(error))`: cannot be retried, answer this instead.
    pub(super) fn cluster_on_error(
        &mut self,
        index: usize,
        id: LinkId,
        reply: &Reply,
    ) -> Option<Option<Bytes>> {
        let cluster = self.cluster()?.clone();
        let (node, backend) = self
            .upstream
            .node_of(id)
            .map(|(label, index)| (label, Some(index)))
            .unwrap_or_default();
        let (mut redirect, moved_slot) = redirect_of(reply, &node)?;
        let kind = redirect.kind?;
        cluster.report_redirect(kind, &node);
        if kind == RedirectKind::ReadOnly {
            if let (LinkId::Node(_) | LinkId::SharedNode(_), Some(i)) = (id, backend) {
                self.shared.topology.report_readonly(i);
            }
        }
        if let Some(target) = &redirect.target {
            // Learned from the redirect: probed like every node.
            cluster.node_index(target);
        }
        let wait = self.rt.config.routing.failover_wait;
        let a = self.queue.awaiting(index)?;
        let Some(retained) = a.retry.as_ref() else {
            let slot = moved_slot.or(self.cl.txn_slot);
            return Some(Some(texts::cluster_moved_while_bound(slot, &node)));
        };
        // The bound runs from when the request was read; for a command that waited
        // (BLPOP blocked until its slot moved), from the redirect: its wait was Redis's.
        if !a.blocking {
            redirect.since = a.sent;
        }
        if redirect.slot.is_none() {
            redirect.slot = slot_of_frame(&retained.frame);
        }
        if redirect.since.elapsed() > wait {
            return Some(Some(texts::cluster_gave_up(
                redirect.slot,
                &node,
                &redirect.text,
            )));
        }
        let slot = redirect.slot;
        if self.queue.mark_redirect(index, Some(Box::new(redirect))) {
            Some(None)
        } else {
            Some(Some(texts::cluster_gave_up(slot, &node, "not retryable")))
        }
    }

    /// Re-send the redirected requests, in order, each where its redirect says; past
    /// `routing.failover_wait` answer it with an error naming the slot and node.
    pub(super) async fn cluster_retries(&mut self) {
        let Some(cluster) = self.cluster().cloned() else {
            return;
        };
        let wait = self.rt.config.routing.failover_wait;
        while let Some(pos) = self.queue.first_retry() {
            let Some(Entry::Retry {
                retained,
                deliver,
                redirect,
                script,
            }) = self.queue.entry_mut(pos)
            else {
                break;
            };
            let deliver = *deliver;
            let script = script.take();
            let frame = retained.frame.clone();
            let redirect = redirect.as_deref().cloned();
            let (slot, since) = match &redirect {
                Some(r) => (r.slot.or_else(|| slot_of_frame(&frame)), r.since),
                None => (slot_of_frame(&frame), Instant::now()),
            };
            let deadline = tokio::time::Instant::from_std(since + wait);
            let kind = redirect.as_ref().and_then(|r| r.kind);
            // A target that refuses the connection is reported down (`open_link`): the
            // next pick waits for its shard's new master, within the failover wait.
            let linked = loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let target = match (&redirect, kind) {
                    (Some(r), Some(RedirectKind::Moved)) => match slot {
                        // Where the refreshed map says the slot is now (not where MOVED says).
                        Some(s) => {
                            let from = cluster.node_index(&r.node);
                            cluster.wait_for_new_owner(s, from, left).await
                        }
                        None => None,
                    },
                    (Some(r), None) if r.target.is_some() => {
                        // NOSCRIPT: the node that answered, while it is a confirmed master.
                        let addr = r.target.clone().unwrap_or_default();
                        match cluster.node_index(&addr) {
                            Some(i) => self.wait_confirmed(i, left).await.then_some(i),
                            None => None,
                        }
                    }
                    (Some(r), Some(RedirectKind::Ask)) => {
                        let addr = r.target.clone().unwrap_or_default();
                        if cluster.wait_for_member(&addr, left).await {
                            match cluster.node_index(&addr) {
                                Some(i) => self.wait_confirmed(i, left).await.then_some(i),
                                None => None,
                            }
                        } else {
                            None
                        }
                    }
                    _ => {
                        if matches!(
                            kind,
                            Some(RedirectKind::TryAgain | RedirectKind::ClusterDown)
                        ) {
                            tokio::time::sleep(RETRY_PAUSE.min(left)).await;
                        }
                        match slot {
                            Some(s) => cluster.wait_for_slot_master(s, left).await.ok(),
                            None => {
                                cluster
                                    .wait_for_any_master(usize::from(self.peer.port()), left)
                                    .await
                            }
                        }
                    }
                };
                let Some(t) = target else {
                    break None;
                };
                match self.cluster_link(t).await {
                    Ok(id) => break Some(id),
                    Err(_)
                        if !matches!(self.phase, super::Phase::Ending(_))
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(super::RECONNECT_PAUSE).await;
                    }
                    Err(_) => break None,
                }
            };
            let node = redirect
                .as_ref()
                .map_or_else(String::new, |r| r.node.clone());
            let last = redirect
                .as_ref()
                .map_or_else(String::new, |r| r.text.clone());
            // Past the bound even when a link opened: a node that takes connections but
            // loses every write must not keep the request cycling.
            let linked = linked.filter(|_| tokio::time::Instant::now() <= deadline);
            let Some(id) = linked else {
                let reply = texts::cluster_gave_up(slot, &node, &last);
                self.queue
                    .replace_with(pos, None, Entry::Ready(deliver.then_some(reply)));
                continue;
            };
            // Take the retained frame (with its retry state) out of the entry.
            let Some(Entry::Retry { retained, .. }) = self.queue.entry_mut(pos) else {
                break;
            };
            let retained: Retained =
                std::mem::replace(retained, Retained::new(Bytes::new(), &self.retained));
            // Hidden first: the script an EVALSHA answered NOSCRIPT for, or ASKING (a
            // NOSCRIPT retry follows no redirect).
            let asking = match &script {
                Some(body) => Some((
                    super::scripts::load_frame(body),
                    Awaiting::hidden(id, self.read_at, "SCRIPT LOAD"),
                )),
                None => (kind == Some(RedirectKind::Ask)).then(|| {
                    let req = Request::from_args(&[b"ASKING"]);
                    (
                        req.frame().clone(),
                        Awaiting::hidden(id, self.read_at, "ASKING"),
                    )
                }),
            };
            // Loaded once: an EVALSHA that still meets NOSCRIPT gets that answer.
            let retained = script.is_none().then_some(retained);
            let Some(link) = self.upstream.get_mut(id) else {
                break;
            };
            if let Some((f, _)) = &asking {
                link.send(f);
            }
            link.send(&frame);
            crate::metrics::readonly_retry();
            debug!(peer = %self.peer, node = %link.label, ?kind, "cluster: request re-sent");
            let entry = Entry::Upstream(Awaiting {
                link: id,
                remaining: 1,
                deliver,
                on_reply: OnReply::Forward,
                retry: retained,
                // A further redirect's failover-wait bound runs from the first read.
                sent: since,
                blocking: false,
                acc: BytesMut::new(),
            });
            self.queue.replace_with(pos, asking.map(|(_, a)| a), entry);
        }
        self.queue.drain(&mut self.to_client);
    }

    /// Make again the subscriptions a lost node held (`ClusterSession::forget`): channels
    /// and patterns on any confirmed master (PUBLISH reaches every node of a cluster),
    /// shard channels on their slot's confirmed master, their confirmations hidden (the
    /// client got them once). Waits up to `routing.failover_wait` from the loss for those
    /// masters; past it the session closes, as it did before re-subscribing existed.
    /// What was published meanwhile is lost, as for any Redis subscriber (at most once).
    pub(super) async fn cluster_resubscribe(&mut self) {
        let Some(r) = self.cl.resub.take() else {
            return;
        };
        let Some(cluster) = self.cluster().cloned() else {
            return;
        };
        if matches!(self.phase, super::Phase::Ending(_)) {
            return;
        }
        let deadline =
            tokio::time::Instant::from_std(r.since + self.rt.config.routing.failover_wait);
        let channels: Vec<Bytes> = self.state.channels.iter().cloned().collect();
        let patterns: Vec<Bytes> = self.state.patterns.iter().cloned().collect();
        if r.channels && !(channels.is_empty() && patterns.is_empty()) {
            let Some((target, id)) = self.resub_link(&cluster, None, None, deadline).await else {
                return self.resub_gave_up("channels and patterns");
            };
            self.cl.pubsub = Some(target);
            self.push_hidden_subscribe(id, PubSubKind::Channel, channels);
            self.push_hidden_subscribe(id, PubSubKind::Pattern, patterns);
        }
        // SSUBSCRIBE takes channels of one slot.
        let mut by_slot: BTreeMap<u16, (Option<usize>, Vec<Bytes>)> = BTreeMap::new();
        for (c, from) in r.shard {
            if self.state.shard_channels.contains(&c) {
                let e = by_slot.entry(key_hash_slot(&c)).or_default();
                e.0 = e.0.or(from);
                if !e.1.contains(&c) {
                    e.1.push(c);
                }
            }
        }
        for (slot, (from, chans)) in by_slot {
            let linked = self.resub_link(&cluster, Some(slot), from, deadline).await;
            let Some((target, id)) = linked else {
                return self.resub_gave_up("shard channels");
            };
            for c in &chans {
                // Held there from now: lost with that link, it is made again.
                self.cl.shard_on.insert(c.clone(), target);
            }
            self.push_hidden_subscribe(id, PubSubKind::Shard, chans);
        }
    }

    /// A link for re-subscribing: to `slot`'s confirmed master (one other than `from`,
    /// the node that gave the slot up), or any confirmed master; by `deadline`.
    async fn resub_link(
        &mut self,
        cluster: &ClusterStore,
        slot: Option<u16>,
        from: Option<usize>,
        deadline: tokio::time::Instant,
    ) -> Option<(usize, LinkId)> {
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let target = match (slot, from) {
                (Some(s), Some(_)) => cluster.wait_for_new_owner(s, from, left).await,
                (Some(s), None) => cluster.wait_for_slot_master(s, left).await.ok(),
                (None, _) => {
                    cluster
                        .wait_for_any_master(usize::from(self.peer.port()), left)
                        .await
                }
            }?;
            // A node that refuses the connection is reported down (`open_link`): the next
            // pick waits for another, within the bound.
            match self.cluster_link(target).await {
                Ok(id) => return Some((target, id)),
                Err(_)
                    if !matches!(self.phase, super::Phase::Ending(_))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(super::RECONNECT_PAUSE).await;
                }
                Err(_) => return None,
            }
        }
    }

    /// `SUBSCRIBE`/`PSUBSCRIBE`/`SSUBSCRIBE` of `names` on link `id`, its confirmations
    /// matched and not delivered.
    fn push_hidden_subscribe(&mut self, id: LinkId, kind: PubSubKind, names: Vec<Bytes>) {
        if names.is_empty() {
            return;
        }
        let command: &[u8] = match kind {
            PubSubKind::Channel => b"SUBSCRIBE",
            PubSubKind::Pattern => b"PSUBSCRIBE",
            PubSubKind::Shard => b"SSUBSCRIBE",
        };
        let mut args: Vec<&[u8]> = Vec::with_capacity(names.len() + 1);
        args.push(command);
        args.extend(names.iter().map(|n| n.as_ref()));
        let frames = u32::try_from(names.len()).unwrap_or(u32::MAX);
        debug!(peer = %self.peer, ?kind, n = names.len(), "cluster: subscribing again");
        let out = Outgoing {
            frames,
            on_reply: OnReply::PubSub {
                kind,
                all: false,
                hidden: true,
            },
            ..Outgoing::plain(Request::from_args(&args), false)
        };
        self.push_to(id, out);
    }

    /// No confirmed master within the bound: close, as on a lost connection to Redis.
    fn resub_gave_up(&mut self, what: &str) {
        tracing::warn!(peer = %self.peer, what, "cluster: no confirmed master to subscribe again within routing.failover_wait; closing the client connection");
        self.end_after_replies(super::SessionEnd::BackendLost);
    }

    /// A `sunsubscribe` no request asked for: Redis unsubscribes a node's shard channel
    /// subscribers when the channel's slot leaves the node (resharding, or a failover that
    /// demoted it: `clusterDelSlot` → `removeChannelsInSlot`). The proxy, one node
    /// serving every slot, subscribes them again on the slot's new owner instead, hidden;
    /// `true` when `reply` was that.
    /// (The caller checks that no SSUBSCRIBE/SUNSUBSCRIBE waits for its confirmations.)
    pub(super) fn cluster_slot_unsubscribed(&mut self, reply: &Reply, id: LinkId) -> bool {
        // Cheap first (this sees every message of a shard subscriber): Redis writes
        // `*3`/`>3` then the lowercase name.
        if !matches!(reply.kind(), ReplyKind::Array | ReplyKind::Push)
            || reply.frame().get(4..23) != Some(b"$12\r\nsunsubscribe\r\n".as_slice())
        {
            return false;
        }
        let Some((b"sunsubscribe", Some(channel))) = state::pubsub_confirmation(reply) else {
            return false;
        };
        let Some((_, node)) = self.upstream.node_of(id) else {
            return false;
        };
        if !self.state.shard_channels.contains(&channel) {
            return false;
        }
        debug!(peer = %self.peer, channel = %String::from_utf8_lossy(&channel), "cluster: a node unsubscribed a shard channel whose slot it gave up");
        self.cl.shard_on.remove(&channel);
        self.cl
            .resubscribe_later(false, vec![(channel, Some(node))])
    }

    /// Wait up to `left` for node `index`'s own ROLE to confirm it master.
    async fn wait_confirmed(&self, index: usize, left: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + left;
        let mut rx = self.shared.topology.subscribe();
        loop {
            let topo = self.shared.topology.load();
            if topo.backends.get(index).is_some_and(|b| {
                b.writable(tokio::time::Instant::now(), topo.bounds()) && !b.hijacked
            }) {
                return true;
            }
            self.shared.topology.request_probe(index);
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    /// Carry out a held split or fan-out request once nothing is in flight before it.
    pub(super) async fn run_gather(&mut self) {
        let Some(g) = self.cl.parked.take() else {
            return;
        };
        let deliver = self.mode.next_command();
        self.shared.hot.forwarded[crate::metrics::class_of(g.spec)].increment(1);
        let reply = self.gather(&g).await;
        self.push_local(deliver.then_some(reply));
    }

    async fn gather(&mut self, g: &Gather) -> Bytes {
        let limits = self.rt.reply_limits();
        let Some(cluster) = self.cluster().cloned() else {
            return Bytes::from_static(texts::NO_BACKEND);
        };
        // Parts: (slot, request, key positions).
        let mut parts: Vec<(Option<u16>, Request, Vec<usize>)> = Vec::new();
        let mut total = 0;
        if g.how == GatherKind::Scan {
            return self.scan(g, &cluster).await;
        }
        if g.how == GatherKind::Split {
            let all: Vec<usize> = route::key_positions(g.spec, g.req.argc()).collect();
            total = all.len();
            for p in route::split_by_slot(g.spec, &g.req) {
                let order: Vec<usize> = p
                    .keys
                    .iter()
                    .filter_map(|k| all.iter().position(|x| x == k))
                    .collect();
                parts.push((Some(p.slot), route::part_request(g.spec, &g.req, &p), order));
            }
        } else {
            let state = cluster.load();
            let Some(map) = state.map.clone() else {
                return Bytes::from_static(texts::CLUSTER_NO_MASTER);
            };
            // Every master that serves slots (one without slots holds no keys).
            for shard in &map.shards {
                if let Some(first) = shard.ranges.first().map(|r| r.0) {
                    parts.push((Some(first), g.req.clone(), Vec::new()));
                }
            }
        }
        // WAIT/WAITAOF count the writes of the link they run on: after requests went
        // through shared node connections, a hidden propagated no-op goes first on each
        // master's link, so its write offset covers them (`cluster_wait_offset_bump`).
        let bump = g.how == GatherKind::FanOut
            && super::pool::counts_own_writes(g.spec)
            && std::mem::take(&mut self.wait_needs_bump);
        let mut replies = Vec::with_capacity(parts.len());
        for (slot, req, _) in &parts {
            replies.push(self.call_slot(*slot, req, bump).await);
        }
        if g.how == GatherKind::FanOut && g.spec.request_policy == RequestPolicy::AllNodes {
            // all_nodes: the replicas too (SCRIPT LOAD then survives a failover: Redis 7
            // does not replicate the script cache). Best effort: a replica that cannot be
            // reached does not fail the command, whose answer is the masters'.
            let replicas: Vec<String> = cluster
                .load()
                .map
                .iter()
                .flat_map(|m| {
                    m.shards
                        .iter()
                        .flat_map(|s| s.replicas.iter().map(|r| r.address()))
                })
                .collect();
            for addr in replicas {
                let Some(index) = cluster.node_index(&addr) else {
                    continue;
                };
                let result = match self.cluster_link(index).await {
                    Ok(id) => self.call_on(id, &g.req, false, false).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    debug!(peer = %self.peer, node = %addr, error = %String::from_utf8_lossy(&e), "cluster: replica missed an all_nodes command");
                }
            }
        }
        let parts_out: Vec<Part> = replies
            .iter()
            .map(|r| match r {
                Ok(reply) => part_of(reply, limits),
                Err(e) => Part::Error(e.clone()),
            })
            .collect();
        if g.how == GatherKind::Split
            && g.spec.response_policy == crate::command::ResponsePolicy::Default
        {
            let positions: Vec<Vec<usize>> = parts.iter().map(|p| p.2.clone()).collect();
            aggregate::reassemble(&parts_out, &positions, total)
        } else {
            aggregate::combine(g.spec.response_policy, &parts_out)
        }
    }

    /// `SCAN cursor [options]` over the shards in map order: the cursor's low part is the
    /// shard, the rest that shard's own cursor; a shard's end moves to the next shard.
    async fn scan(&mut self, g: &Gather, cluster: &ClusterStore) -> Bytes {
        let cursor = g
            .req
            .arg(1)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u64>().ok());
        let Some(cursor) = cursor else {
            // Redis's own text (db.c scanGenericCommand via parseScanCursorOrReply).
            return texts::error("ERR invalid cursor");
        };
        let shards: Vec<Option<u16>> = match cluster.load().map.clone() {
            Some(map) => map
                .shards
                .iter()
                .filter_map(|s| s.ranges.first().map(|r| Some(r.0)))
                .collect(),
            None => return Bytes::from_static(texts::CLUSTER_NO_MASTER),
        };
        let shard = usize::try_from(cursor % SCAN_SHARDS).unwrap_or(usize::MAX);
        let node_cursor = cursor / SCAN_SHARDS;
        let Some(&slot) = shards.get(shard) else {
            return texts::error("ERR invalid cursor");
        };
        let mut args: Vec<&[u8]> = g.req.args().collect();
        let node_cursor_text = node_cursor.to_string();
        if let Some(a) = args.get_mut(1) {
            *a = node_cursor_text.as_bytes();
        }
        let req = Request::from_args(&args);
        let reply = match self.call_slot(slot, &req, false).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        let limits = self.rt.reply_limits();
        let Some((_, elements)) = state::split_array(&reply, limits) else {
            return reply.into_frame();
        };
        let [next, keys] = elements.as_slice() else {
            return reply.into_frame();
        };
        let next = std::str::from_utf8(next)
            .ok()
            .and_then(|t| t.split("\r\n").nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        let out = if next != 0 {
            next.checked_mul(SCAN_SHARDS)
                .and_then(|n| n.checked_add(shard as u64))
        } else if shard + 1 < shards.len() {
            Some(shard as u64 + 1)
        } else {
            Some(0)
        };
        let Some(out) = out else {
            return texts::error(
                "ERR portcullis: a node's SCAN cursor is too large to carry its shard",
            );
        };
        let out = out.to_string();
        let mut b = BytesMut::new();
        b.extend_from_slice(format!("*2\r\n${}\r\n{out}\r\n", out.len()).as_bytes());
        b.extend_from_slice(keys);
        b.freeze()
    }

    /// Send one request to `slot`'s master and wait for its reply, following redirects
    /// within `routing.failover_wait` (`bump`: the write-offset bump goes first). Only
    /// while nothing else is in flight.
    async fn call_slot(
        &mut self,
        slot: Option<u16>,
        req: &Request,
        bump: bool,
    ) -> Result<Reply, Bytes> {
        let Some(cluster) = self.cluster().cloned() else {
            return Err(Bytes::from_static(texts::NO_BACKEND));
        };
        let wait = self.rt.config.routing.failover_wait;
        let started = Instant::now();
        let mut target = self.cluster_target(slot).await?;
        let mut asking = false;
        loop {
            let id = self.cluster_link(target).await?;
            let node = self
                .upstream
                .get(id)
                .map(|l| l.label.clone())
                .unwrap_or_default();
            let reply = self.call_on(id, req, asking, bump).await?;
            let Some((redirect, _)) = redirect_of(&reply, &node) else {
                return Ok(reply);
            };
            let Some(kind) = redirect.kind else {
                return Ok(reply);
            };
            cluster.report_redirect(kind, &node);
            let left = wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(texts::cluster_gave_up(slot, &node, &redirect.text));
            }
            asking = kind == RedirectKind::Ask;
            let gave_up = || texts::cluster_gave_up(slot, &node, &redirect.text);
            target = match (&redirect.target, kind) {
                // Where the refreshed map says the slot is now.
                (_, RedirectKind::Moved) => match redirect.slot.or(slot) {
                    Some(s) => cluster
                        .wait_for_new_owner(s, Some(target), left)
                        .await
                        .ok_or_else(gave_up)?,
                    None => return Err(gave_up()),
                },
                (Some(addr), _) => {
                    if !cluster.wait_for_member(addr, left).await {
                        return Err(gave_up());
                    }
                    match cluster.node_index(addr) {
                        Some(i) if self.wait_confirmed(i, left).await => i,
                        _ => return Err(gave_up()),
                    }
                }
                (None, _) => {
                    tokio::time::sleep(RETRY_PAUSE.min(left)).await;
                    self.cluster_target(slot).await?
                }
            };
        }
    }

    /// One request on node link `id` (nothing else in flight there), its reply read in
    /// place; pushes that arrive meanwhile go to the client. Hidden requests go first,
    /// their answers unseen: the write-offset bump (`bump`), then `ASKING` (`asking`,
    /// which applies to the next command only).
    async fn call_on(
        &mut self,
        id: LinkId,
        req: &Request,
        asking: bool,
        bump: bool,
    ) -> Result<Reply, Bytes> {
        let resp3 = self.state.resp3;
        {
            let Some(link) = self.upstream.get_mut(id) else {
                return Err(Bytes::from_static(texts::NO_BACKEND));
            };
            if bump {
                link.send(&cluster_wait_offset_bump());
            }
            if asking {
                link.send(Request::from_args(&[b"ASKING"]).frame());
            }
            link.send(req.frame());
        }
        let mut skip = u32::from(asking) + u32::from(bump);
        loop {
            let step = self.call_step(id).await;
            match step {
                Ok(Some(reply)) => {
                    if resp3 && reply.is_push() {
                        self.to_client.push(reply.into_frame());
                        continue;
                    }
                    if skip > 0 {
                        // The bump goes first, then ASKING.
                        let what = if bump && skip == u32::from(asking) + 1 {
                            "WAIT offset bump"
                        } else {
                            "ASKING"
                        };
                        if reply.is_error() {
                            crate::metrics::hidden_request_failed(what, &self.peer);
                        }
                        skip -= 1;
                        continue;
                    }
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(end) => {
                    let label = self.upstream.take(id).map(|l| l.label).unwrap_or_default();
                    debug!(peer = %self.peer, node = %label, error = ?end, "cluster: node link lost");
                    return Err(texts::link_lost(&label));
                }
            }
        }
    }

    /// Flush, wait, read: one reply when there is one.
    async fn call_step(&mut self, id: LinkId) -> Result<Option<Reply>, LinkEnd> {
        let Some(link) = self.upstream.get_mut(id) else {
            return Err(LinkEnd::Closed);
        };
        link.flush(None).map_err(LinkEnd::Io)?;
        if let Some(r) = link.next_reply()? {
            return Ok(Some(r));
        }
        if link.has_output() {
            link.writable().await;
            return Ok(None);
        }
        // A node slower than this (a long FLUSHALL or KEYS, a paused node) is still
        // answering: the bound is the proxy's own for a silent backend,
        // `probe.down_after`, as for a single master (a slow master is not a lost one).
        let config = &self.rt.config;
        let timeout = config
            .limits
            .connect_timeout
            .max(config.routing.failover_wait)
            .max(config.probe.down_after());
        if tokio::time::timeout(timeout, link.readable())
            .await
            .is_err()
        {
            return Err(LinkEnd::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no reply in time",
            )));
        }
        link.read(Instant::now())?;
        link.next_reply()
    }
}

/// The id of every open node link (for the session's `flush` and half-close loops).
pub(super) fn node_ids(links: &[Option<Link>]) -> Vec<LinkId> {
    links
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_some())
        .filter_map(|(p, _)| u8::try_from(p).ok().map(LinkId::Node))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ReplyLimits, ReplyScanner};

    fn reply(bytes: &[u8]) -> Reply {
        let mut buf = BytesMut::from(bytes);
        ReplyScanner::new(ReplyLimits::default())
            .next(&mut buf)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn redirects_as_redis_writes_them() {
        // Redis src/cluster.c clusterRedirectClient.
        let (r, slot) = redirect_of(&reply(b"-MOVED 3999 127.0.0.1:6381\r\n"), "n:1").unwrap();
        assert_eq!((r.kind, slot), (Some(RedirectKind::Moved), Some(3999)));
        assert_eq!(r.target.as_deref(), Some("127.0.0.1:6381"));
        let (r, _) = redirect_of(&reply(b"-ASK 12 node-b.example:7000\r\n"), "n:1").unwrap();
        assert_eq!(
            (r.kind, r.target.as_deref()),
            (Some(RedirectKind::Ask), Some("node-b.example:7000"))
        );
        // An unknown endpoint: the answering node's host.
        let (r, _) = redirect_of(&reply(b"-MOVED 1 ?:7002\r\n"), "10.0.0.5:7000").unwrap();
        assert_eq!(r.target.as_deref(), Some("10.0.0.5:7002"));
        let (r, _) = redirect_of(&reply(b"-MOVED 1 :7002\r\n"), "10.0.0.5:7000").unwrap();
        assert_eq!(r.target.as_deref(), Some("10.0.0.5:7002"));
        for (text, kind) in [
            (
                &b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"[..],
                RedirectKind::TryAgain,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                RedirectKind::ClusterDown,
            ),
            (
                b"-READONLY You can't write against a read only replica.\r\n",
                RedirectKind::ReadOnly,
            ),
        ] {
            assert_eq!(redirect_of(&reply(text), "n:1").unwrap().0.kind, Some(kind));
        }
        assert!(redirect_of(&reply(b"-ERR no\r\n"), "n:1").is_none());
        assert!(redirect_of(&reply(b"+OK\r\n"), "n:1").is_none());
    }

    #[test]
    fn command_name_and_slot_of_frames() {
        let frame = Request::from_args(&[b"EXEC".as_slice()]).frame().clone();
        assert_eq!(command_name(&frame), b"EXEC");
        let frame = Request::from_args(&[b"set".as_slice(), b"foo", b"x"])
            .frame()
            .clone();
        assert_eq!(command_name(&frame), b"set");
        assert_eq!(slot_of_frame(&frame), Some(12182));
        assert_eq!(command_name(b"garbage"), b"");
    }

    #[test]
    fn names_lowercase_on_the_stack() {
        let mut buf = [0u8; 8];
        let mut fold = |n: &[u8]| crate::command::fold_case(n, &mut buf).map(<[u8]>::to_vec);
        assert_eq!(fold(b"MuLtI").as_deref(), Some(&b"multi"[..]));
        assert_eq!(fold(b"UNWATCH").as_deref(), Some(&b"unwatch"[..]));
        assert_eq!(fold(b"").as_deref(), Some(&b""[..]));
        // Longer than the buffer: none.
        assert_eq!(fold(b"EXECEXECX"), None);
    }

    #[test]
    fn node_id_is_stable_and_hex() {
        let id = proxy_node_id("127.0.0.1:6380");
        assert_eq!(id.len(), 40);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, proxy_node_id("127.0.0.1:6380"));
        assert_ne!(id, proxy_node_id("127.0.0.1:6381"));
    }
}
