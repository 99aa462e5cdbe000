//! The cluster side of the topology: the chosen slot map, the backend index of every
//! node it names (each probed by the ordinary ROLE prober), the per-shard confirmed master,
//! and the refresher task that reads the map from several nodes, periodically and at once
//! when a session reports a redirect.
//!
//! A node gets the requests of a slot only when the map says its shard serves the slot AND
//! its own ROLE probe confirms it master (`BackendState::writable`) and not hijacked: the
//! single-master guarantee of DESIGN.md, held per shard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::prober::ProbeSettings;
use crate::backend::sentinel::SpawnProber;
use crate::backend::{BackendLink, Handshake, Topology, TopologyStore};
use crate::config::{BackendConfig, ClusterConfig};
use crate::protocol::{Reply, Request};

use super::keyslot::SLOTS;
use super::slotmap::{self, choose_view, NodesInfo, SlotMap, SlotMapError, View};

/// Views read per refresh: more than one, so one node on the wrong side of a partition
/// cannot decide alone.
const VIEWS_WANTED: usize = 3;

/// Least time between two refreshes (a burst of redirects asks for one refresh).
const MIN_REFRESH_GAP: Duration = Duration::from_millis(50);

/// The chosen slot map and what it means in backend indexes.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    /// The newest view's map; `None` until one node answered.
    pub map: Option<Arc<SlotMap>>,
    /// Backend index (in the `Topology`) of each shard's master, by shard index.
    pub masters: Vec<usize>,
    /// The highest config epoch among the map's masters (the map's version).
    pub epoch: u64,
    /// Which node's view was chosen.
    pub from: String,
    /// How many views were compared.
    pub views: usize,
    /// Increases with every publication.
    pub generation: u64,
}

/// Why a slot has no master to send to now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotMasterError {
    /// No slot map yet (no node answered).
    NoMap,
    /// The map names no shard for the slot (`CLUSTERDOWN Hash slot not served`).
    Uncovered,
    /// The shard's master is not confirmed by its own ROLE probe.
    Unconfirmed { node: String },
}

impl ClusterState {
    /// The confirmed master of `slot`: the backend index of the node the map names, when
    /// its own ROLE probe confirms it master (Redis `src/cluster.c` `getNodeByQuery`
    /// routes by the slot's owner; the proxy also wants the owner's word).
    pub fn slot_master(&self, slot: u16, topo: &Topology) -> Result<usize, SlotMasterError> {
        self.slot_master_at(slot, topo, tokio::time::Instant::now())
    }

    /// As `slot_master`, at `now` (a session reads the clock once per wake-up, not per
    /// command).
    pub fn slot_master_at(
        &self,
        slot: u16,
        topo: &Topology,
        now: tokio::time::Instant,
    ) -> Result<usize, SlotMasterError> {
        let map = self.map.as_ref().ok_or(SlotMasterError::NoMap)?;
        let shard = map.shard_index(slot).ok_or(SlotMasterError::Uncovered)?;
        let index = *self.masters.get(shard).ok_or(SlotMasterError::Uncovered)?;
        confirmed_at(index, topo, now).ok_or_else(|| SlotMasterError::Unconfirmed {
            node: map.shards[shard].master.address(),
        })
    }

    /// Every shard's confirmed master (unconfirmed shards left out), in shard order.
    pub fn confirmed_masters(&self, topo: &Topology) -> Vec<usize> {
        self.masters
            .iter()
            .copied()
            .filter(|&i| confirmed(i, topo).is_some())
            .collect()
    }

    /// Slots whose shard has a confirmed master (`/readyz` wants all of them).
    pub fn slots_covered(&self, topo: &Topology) -> usize {
        let Some(map) = &self.map else { return 0 };
        map.shards
            .iter()
            .zip(&self.masters)
            .filter(|(_, &i)| confirmed(i, topo).is_some())
            .map(|(s, _)| {
                s.ranges
                    .iter()
                    .map(|&(a, b)| usize::from(b) - usize::from(a) + 1)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Whether every slot is served by a confirmed master.
    pub fn ready(&self, topo: &Topology) -> bool {
        self.slots_covered(topo) == SLOTS
    }
}

/// A backend confirmed master by its own ROLE and not hijacked.
fn confirmed(index: usize, topo: &Topology) -> Option<usize> {
    confirmed_at(index, topo, tokio::time::Instant::now())
}

/// As `confirmed`, at `now`.
fn confirmed_at(index: usize, topo: &Topology, now: tokio::time::Instant) -> Option<usize> {
    let b = topo.backends.get(index)?;
    (b.writable(now, topo.bounds()) && !b.hijacked).then_some(index)
}

/// Kinds of redirect a node can answer with (metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectKind {
    Moved,
    Ask,
    TryAgain,
    ClusterDown,
    ReadOnly,
}

impl RedirectKind {
    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            RedirectKind::Moved => "moved",
            RedirectKind::Ask => "ask",
            RedirectKind::TryAgain => "tryagain",
            RedirectKind::ClusterDown => "clusterdown",
            RedirectKind::ReadOnly => "readonly",
        }
    }
}

/// The cluster store shared by sessions, the refresher and the admin endpoints.
pub struct ClusterStore {
    current: ArcSwap<ClusterState>,
    changed: watch::Sender<u64>,
    refresh: Notify,
    /// The backend set every node joins (probed by ROLE like any backend).
    pub topology: Arc<TopologyStore>,
    spawn: SpawnProber,
    config: ClusterConfig,
    /// Refreshes done (for tests and logs).
    refreshes: AtomicU64,
}

impl ClusterStore {
    /// A store for `config`'s cluster; its seeds are added to the topology and probed.
    pub fn new(
        config: ClusterConfig,
        topology: Arc<TopologyStore>,
        spawn: SpawnProber,
    ) -> Arc<ClusterStore> {
        let (changed, _) = watch::channel(0);
        let store = Arc::new(ClusterStore {
            current: ArcSwap::from_pointee(ClusterState::default()),
            changed,
            refresh: Notify::new(),
            topology,
            spawn,
            config,
            refreshes: AtomicU64::new(0),
        });
        for seed in store.config.seeds.clone() {
            store.node_index(&seed);
        }
        store
    }

    /// The current state (lock-free).
    pub fn load(&self) -> Arc<ClusterState> {
        self.current.load_full()
    }

    /// A receiver that wakes on every publication.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The backend index of the node at `address`, adding it (and starting its prober)
    /// when new: nodes learned from the map or from a redirect are probed like any backend.
    pub fn node_index(&self, address: &str) -> Option<usize> {
        let cfg: BackendConfig = self.config.node(address.to_string());
        let (index, added) = self.topology.ensure_backend(cfg.clone())?;
        if added {
            info!(node = %address, "cluster: node added");
            (self.spawn)(index, cfg);
        }
        Some(index)
    }

    /// A session saw a redirect (or a node that no longer serves its slot): count it and
    /// re-read the map now.
    pub fn report_redirect(&self, kind: RedirectKind, node: &str) {
        crate::metrics::cluster_redirect(node, kind.name());
        if kind != RedirectKind::Ask {
            self.refresh.notify_one();
        }
    }

    /// Ask for a refresh now.
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Refreshes done so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// Wait up to `wait` for `slot` to have a confirmed master.
    pub async fn wait_for_slot_master(
        &self,
        slot: u16,
        wait: Duration,
    ) -> Result<usize, SlotMasterError> {
        // The common case first: no clock read, no watch subscription.
        let result = self.load().slot_master(slot, &self.topology.load());
        if result.is_ok() {
            return result;
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut topo_rx = self.topology.subscribe();
        let mut map_rx = self.subscribe();
        loop {
            let result = self.load().slot_master(slot, &self.topology.load());
            if result.is_ok() {
                return result;
            }
            let woke = tokio::select! {
                r = topo_rx.changed() => r.is_ok(),
                r = map_rx.changed() => r.is_ok(),
                _ = tokio::time::sleep_until(deadline) => false,
            };
            if !woke {
                return self.load().slot_master(slot, &self.topology.load());
            }
        }
    }

    /// After `MOVED` from node `moved_from`: wait up to `wait` for the map to name another
    /// confirmed master for `slot` (a node gets a slot's commands only when the map says
    /// it serves the slot, whatever a redirect says).
    pub async fn wait_for_new_owner(
        &self,
        slot: u16,
        moved_from: Option<usize>,
        wait: Duration,
    ) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut topo_rx = self.topology.subscribe();
        let mut map_rx = self.subscribe();
        loop {
            match self.load().slot_master(slot, &self.topology.load()) {
                Ok(i) if Some(i) != moved_from => return Some(i),
                _ => self.request_refresh(),
            }
            let woke = tokio::select! {
                r = topo_rx.changed() => r.is_ok(),
                r = map_rx.changed() => r.is_ok(),
                _ = tokio::time::sleep_until(deadline) => false,
            };
            if !woke {
                return None;
            }
        }
    }

    /// After `ASK` naming `address`: wait up to `wait` for the map to list that node as a
    /// member of the cluster (`ASK` names a master importing the slot).
    pub async fn wait_for_member(&self, address: &str, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let mut map_rx = self.subscribe();
        loop {
            if self
                .load()
                .map
                .as_ref()
                .is_some_and(|m| m.has_node(address))
            {
                return true;
            }
            self.request_refresh();
            let woke = tokio::select! {
                r = map_rx.changed() => r.is_ok(),
                _ = tokio::time::sleep_until(deadline) => false,
            };
            if !woke {
                return false;
            }
        }
    }

    /// Wait up to `wait` for any confirmed master (keyless commands).
    pub async fn wait_for_any_master(&self, seed: usize, wait: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut topo_rx = self.topology.subscribe();
        let mut map_rx = self.subscribe();
        loop {
            let masters = self.load().confirmed_masters(&self.topology.load());
            if !masters.is_empty() {
                return masters.get(seed % masters.len()).copied();
            }
            let woke = tokio::select! {
                r = topo_rx.changed() => r.is_ok(),
                r = map_rx.changed() => r.is_ok(),
                _ = tokio::time::sleep_until(deadline) => false,
            };
            if !woke {
                return None;
            }
        }
    }

    fn publish(&self, view: View, views: usize) {
        let map = view.map;
        let masters: Vec<usize> = map
            .shards
            .iter()
            .filter_map(|s| self.node_index(&s.master.address()))
            .collect();
        if masters.len() != map.shards.len() {
            warn!("cluster: a master address of the slot map is not usable; map not taken");
            return;
        }
        for n in map.shards.iter().flat_map(|s| s.replicas.iter()) {
            self.node_index(&n.address());
        }
        let epoch = map
            .shards
            .iter()
            .filter_map(|s| view.nodes.epochs.get(&s.master.id))
            .copied()
            .max()
            .unwrap_or(0);
        let old = self.load();
        if old.map.as_deref() == Some(&map) && old.epoch == epoch {
            return;
        }
        let covered = map.covered();
        let state = ClusterState {
            map: Some(Arc::new(map)),
            masters,
            epoch,
            from: view.from.clone(),
            views,
            generation: old.generation + 1,
        };
        info!(from = %view.from, views, epoch, slots = covered, shards = state.masters.len(), "cluster: slot map updated");
        crate::metrics::cluster_map(epoch, covered);
        self.current.store(Arc::new(state));
        self.changed.send_replace(old.generation + 1);
    }
}

/// Read one node's view: `CLUSTER SHARDS` (falling back to `CLUSTER SLOTS` when it is
/// unknown or gives no usable map) and `CLUSTER NODES` for the epochs.
async fn read_view(
    address: &str,
    store: &ClusterStore,
    settings: &ProbeSettings,
) -> Result<View, String> {
    let cfg = store.config.node(address.to_string());
    let mut link = BackendLink::open(
        &cfg,
        &Handshake::default(),
        settings.timeout,
        settings.reply_limits,
        settings.tls.as_deref(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let timeout = settings.timeout;
    let tls = settings.tls.is_some();
    let shards = call(&mut link, timeout, &[b"CLUSTER", b"SHARDS"]).await?;
    let mut map = parse(&shards, |t| slotmap::parse_shards(t, tls));
    if map.as_ref().map_or(true, |m| m.covered() == 0) {
        let slots = call(&mut link, timeout, &[b"CLUSTER", b"SLOTS"]).await?;
        if let Ok(m) = parse(&slots, slotmap::parse_slots) {
            if map.as_ref().map_or(true, |old| m.covered() > old.covered()) {
                map = Ok(m);
            }
        }
    }
    let map = map.map_err(|e| e.to_string())?;
    let nodes = call(&mut link, timeout, &[b"CLUSTER", b"NODES"]).await?;
    let nodes = match nodes.tree() {
        Some(crate::protocol::Node::Str(text)) => {
            slotmap::parse_nodes(&String::from_utf8_lossy(text))
        }
        _ => NodesInfo::default(),
    };
    Ok(View {
        from: address.to_string(),
        map,
        nodes,
    })
}

/// One request on `link`, bounded by `timeout`.
async fn call(link: &mut BackendLink, timeout: Duration, args: &[&[u8]]) -> Result<Reply, String> {
    let req = Request::from_args(args);
    match tokio::time::timeout(timeout, link.call(&req)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("timed out".to_string()),
    }
}

fn parse(
    reply: &Reply,
    f: impl FnOnce(&crate::protocol::Node<'_>) -> Result<SlotMap, SlotMapError>,
) -> Result<SlotMap, SlotMapError> {
    if reply.is_error() {
        let text = String::from_utf8_lossy(reply.frame().trim_ascii_end()).into_owned();
        return Err(SlotMapError::Refused(text));
    }
    let tree = reply.tree().ok_or(SlotMapError::Layout("undecodable"))?;
    f(&tree)
}

/// The replicas the shard masters' own `ROLE` lists that are no node of the slot map: a
/// server made a replica from outside the cluster (`REPLICAOF <master>` on a server an
/// attacker controls) receives a copy of every write. Reported once per master and
/// replica (ERROR log, `portcullis_unexpected_replica_detections_total`, the
/// `portcullis_backend_unexpected_replicas` gauge) when two refreshes in a row find it
/// (a replica the cluster just added is in the next map). The master keeps its writes:
/// what it holds is unchanged, and Redis alone would go on serving; refusing them would
/// let anyone who can reach a master stop its shard.
#[derive(Debug, Default)]
struct ReplicaWatch {
    /// (master's backend index, replica address) found at the previous check.
    suspects: std::collections::HashSet<(usize, String)>,
    /// Reported and still there.
    reported: std::collections::HashSet<(usize, String)>,
}

impl ReplicaWatch {
    fn check(&mut self, store: &ClusterStore) {
        let state = store.load();
        let Some(map) = state.map.clone() else {
            return;
        };
        let members: Vec<usize> = map
            .nodes()
            .filter_map(|n| store.node_index(&n.address()))
            .collect();
        let topo = store.topology.load();
        let known = |replica: &str| {
            let Some((host, port)) = replica.rsplit_once(':') else {
                return false;
            };
            let Ok(port) = port.parse::<u16>() else {
                return false;
            };
            members
                .iter()
                .any(|&i| topo.backends.get(i).is_some_and(|b| b.is(host, port)))
        };
        // Behind NAT or with announced hostnames, a master's ROLE names its replicas by
        // another address than the slot map: such a replica counts as known when its port
        // is one of the shard's replica ports and the master has no more replicas than
        // the map gives the shard (a stranger added makes the count grow).
        let natted = |shard: usize, replica: &str, count: usize| {
            let Some(s) = map.shards.get(shard) else {
                return false;
            };
            let port = replica
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok());
            count <= s.replicas.len() && s.replicas.iter().any(|n| Some(n.port) == port)
        };
        let mut found = std::collections::HashSet::new();
        for (shard, &m) in state.masters.iter().enumerate() {
            let Some(b) = topo.backends.get(m) else {
                continue;
            };
            if b.role != Some(crate::backend::Role::Master) {
                continue;
            }
            let count = b.replicas.len();
            for r in b
                .replicas
                .iter()
                .filter(|r| !known(r) && !natted(shard, r, count))
            {
                found.insert((m, r.clone()));
            }
        }
        for key in &found {
            if self.suspects.contains(key) && self.reported.insert(key.clone()) {
                let master = topo.backends.get(key.0).map_or("", |b| b.label.as_str());
                tracing::error!(backend = %master, replica = %key.1,
                    "UNEXPECTED REPLICA: a cluster master replicates to a node outside the slot map (a copy of its data leaves the cluster)");
                crate::metrics::unexpected_replica(master);
            }
        }
        self.reported.retain(|key| {
            let still = found.contains(key);
            if !still {
                let master = topo.backends.get(key.0).map_or("", |b| b.label.as_str());
                info!(backend = %master, replica = %key.1, "unexpected replica gone");
            }
            still
        });
        for &m in &state.masters {
            if let Some(b) = topo.backends.get(m) {
                let n = self.reported.iter().filter(|k| k.0 == m).count();
                crate::metrics::unexpected_replicas(&b.label, n);
            }
        }
        self.suspects = found;
    }
}

/// Read the views of up to `VIEWS_WANTED` nodes (the current map's masters first, then
/// its replicas, then the seeds) and publish the newest.
async fn refresh_once(store: &ClusterStore, settings: &ProbeSettings) {
    let mut candidates: Vec<String> = Vec::new();
    if let Some(map) = store.load().map.clone() {
        candidates.extend(map.nodes().map(|n| n.address()));
    }
    candidates.extend(store.config.seeds.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    candidates.retain(|a| seen.insert(a.clone()));
    let mut views: Vec<View> = Vec::new();
    let mut next = 0;
    while let Some(address) = candidates.get(next).cloned() {
        next += 1;
        if views.len() >= VIEWS_WANTED {
            break;
        }
        match read_view(&address, store, settings).await {
            Ok(v) => {
                // The nodes it names are asked too (a first refresh knows only the seeds).
                for n in v.map.nodes() {
                    let a = n.address();
                    if seen.insert(a.clone()) {
                        candidates.push(a);
                    }
                }
                views.push(v);
            }
            Err(e) => debug!(node = %address, error = %e, "cluster: could not read the slot map"),
        }
    }
    store.refreshes.fetch_add(1, Ordering::Relaxed);
    if views.is_empty() {
        warn!("cluster: no node answered for the slot map");
        return;
    }
    if views.len() == 1 && candidates.len() > 1 {
        debug!(node = %views[0].from, "cluster: only one node's view could be read");
    }
    let n = views.len();
    match choose_view(&views) {
        Some(i) => store.publish(views.swap_remove(i), n),
        None => warn!(
            views = n,
            "cluster: nodes disagree at equal config epochs; slot map kept"
        ),
    }
}

/// Keep the slot map current until shutdown: every `refresh_interval`, and at once when
/// a session reports a redirect.
pub async fn run(
    store: Arc<ClusterStore>,
    settings: Arc<ArcSwap<ProbeSettings>>,
    shutdown: CancellationToken,
) {
    let interval = store.config.refresh_interval;
    let mut watch = ReplicaWatch::default();
    loop {
        let s = settings.load_full();
        tokio::select! {
            _ = refresh_once(&store, &s) => {}
            _ = shutdown.cancelled() => return,
        }
        watch.check(&store);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = store.refresh.notified() => {
                tokio::time::sleep(MIN_REFRESH_GAP).await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}
