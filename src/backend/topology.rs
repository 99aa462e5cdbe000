//! The topology store: what the probers last learned about every backend, published as an
//! immutable snapshot (`ArcSwap`) plus a change notification, and the pure decision of
//! which backend is the *confirmed master*. Must not do I/O (it logs each backend's
//! standing transition and sets its gauges, nothing else).
//!
//! Evidence, not silence (DESIGN.md): a backend's [`Standing`] moves to `Down` or
//! `Contradicted` at once on evidence (a refused or reset connection, `-READONLY` or
//! `-MASTERDOWN`, a hijack); silence (probe timeouts) and answers that prove life (`-BUSY`,
//! `-LOADING`, replies read by sessions) only make it `Slow` or `Busy`, keeping the last
//! known role until it has been silent for `probe.down_after`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::catalog::Catalog;
use crate::config::BackendConfig;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

/// A backend's replication role, as its latest `ROLE` reply gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica {
        master_host: String,
        master_port: u16,
        /// `connected`, `connecting`, `connect`, `sync`, `handshake`, ...
        link: String,
    },
    Sentinel,
}

impl Role {
    /// Short name for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Replica { .. } => "replica",
            Role::Sentinel => "sentinel",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Master => f.write_str("master"),
            Role::Replica {
                master_host,
                master_port,
                link,
            } => write!(f, "replica of {master_host}:{master_port} (link {link})"),
            Role::Sentinel => f.write_str("sentinel"),
        }
    }
}

/// Where a backend stands, from the evidence the proxy has (shown in `/topology`, the
/// `portcullis_backend_state` gauge and a log line at each change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Never probed yet.
    Unprobed,
    /// Its latest probe answered ROLE, within `probe.staleness`.
    Confirmed,
    /// Its latest probe got `-BUSY` or `-LOADING`: alive, last known role kept.
    Busy,
    /// Its latest probe got no answer in time, or none is recent: last known role kept
    /// until it has been silent for `probe.down_after`.
    Slow,
    /// A refused or reset connection, or silent for longer than `probe.down_after`.
    Down,
    /// Evidence against its last probe: `-READONLY`/`-MASTERDOWN` to a client, a hijack.
    Contradicted,
}

impl Standing {
    /// Every standing, in gauge order.
    pub const ALL: [Standing; 6] = [
        Standing::Unprobed,
        Standing::Confirmed,
        Standing::Busy,
        Standing::Slow,
        Standing::Down,
        Standing::Contradicted,
    ];

    /// Name for `/topology`, logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Standing::Unprobed => "unprobed",
            Standing::Confirmed => "confirmed",
            Standing::Busy => "busy",
            Standing::Slow => "slow",
            Standing::Down => "down",
            Standing::Contradicted => "contradicted",
        }
    }

    /// Whether a backend in this standing keeps its last known role for routing.
    pub fn keeps_role(self) -> bool {
        matches!(self, Standing::Confirmed | Standing::Busy | Standing::Slow)
    }
}

/// What one failed exchange with a backend says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// No answer in time: proves nothing about the role.
    Silence(String),
    /// An answer proving the same server is alive, only busy (`-BUSY`, `-LOADING`).
    Alive(String),
    /// It cannot serve now: refused or reset connection, refused handshake, bad reply.
    Down(String),
}

impl Evidence {
    /// Classify an error reply's text: `BUSY` and `LOADING` prove life, the rest is down.
    pub fn of_error_reply(text: &str) -> Evidence {
        let code = text.trim_start_matches('-');
        if code.starts_with("BUSY") || code.starts_with("LOADING") {
            Evidence::Alive(text.to_string())
        } else {
            Evidence::Down(text.to_string())
        }
    }
}

/// Why the latest probe did not confirm the role without proving anything against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// `true` for `-BUSY`/`-LOADING` answers, `false` for silence.
    pub busy: bool,
    /// What was seen (the reply, or the timeout).
    pub evidence: String,
    /// When this kind of stall began.
    pub since: Instant,
}

/// Proof of life from sessions: when one last read a reply from the backend. Shared by
/// every snapshot of a backend so sessions record into it without publishing anything.
#[derive(Debug)]
pub struct Liveness {
    base: Instant,
    /// Milliseconds after `base`, plus one; 0 = never.
    millis: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            base: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }
}

impl Liveness {
    /// A reply arrived at `at` (one relaxed load per call, a write only when it advances).
    pub fn record(&self, at: Instant) {
        let v = at.saturating_duration_since(self.base).as_millis() as u64 + 1;
        if v > self.millis.load(Ordering::Relaxed) {
            self.millis.fetch_max(v, Ordering::Relaxed);
        }
    }

    /// When a session last read a reply, if ever.
    pub fn last(&self) -> Option<Instant> {
        match self.millis.load(Ordering::Relaxed) {
            0 => None,
            v => Some(self.base + Duration::from_millis(v - 1)),
        }
    }
}

/// The two time bounds of the confirmed-master rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// A probe older than this no longer confirms the role (`probe.staleness`).
    pub staleness: Duration,
    /// Silent this long, a backend is down (`probe.down_after`).
    pub down_after: Duration,
}

/// What the proxy knows about one backend.
#[derive(Debug, Clone)]
pub struct BackendState {
    /// How to connect (address, credentials).
    pub config: BackendConfig,
    /// Label (name or address).
    pub label: String,
    /// `host:port` as configured.
    pub address: String,
    /// Addresses this backend is known by (configured host, resolved IPs), `ip:port`.
    pub aliases: Vec<String>,
    /// Role from the latest successful probe.
    pub role: Option<Role>,
    /// When that probe answered.
    pub probed_at: Option<Instant>,
    /// Evidence that it is down (refused or reset connection, ...), until a probe succeeds.
    pub error: Option<String>,
    /// A client got `-READONLY` or `-MASTERDOWN` here since the last successful probe.
    pub readonly_seen: bool,
    /// What that reply was, for `/topology` and errors.
    pub contradiction: Option<String>,
    /// When `error` or `contradiction` was recorded (the age of the evidence).
    pub evidence_at: Option<Instant>,
    /// The latest proof of life seen by the prober: any ROLE reply, `-BUSY`, `-LOADING`.
    pub alive_at: Option<Instant>,
    /// Proof of life seen by sessions (replies read on their links).
    pub liveness: Arc<Liveness>,
    /// The latest probe neither confirmed the role nor proved anything against it.
    pub stall: Option<Stall>,
    /// Its standing as of the latest publication (a change is logged once).
    pub last_standing: Standing,
    /// It follows a master outside the configured set.
    pub hijacked: bool,
    /// The replicas its latest ROLE listed as master (`host:port` as the master sees
    /// them); empty otherwise. Cluster mode checks them against the slot map.
    pub replicas: Vec<String>,
    /// Removed from the configuration by a reload: never routed to again.
    pub retired: bool,
    /// Pass-through mode: whether the backend refuses an unauthenticated client
    /// (`-NOAUTH` to PING), as last checked by the prober; `None` until known. Kept
    /// across failed probes: only a new answer changes it.
    pub requires_auth: Option<bool>,
    /// What its own `COMMAND` reported beyond the built-in table, read at each new probe
    /// connection (first contact, restart, a different server at the address).
    pub commands: Option<Arc<Catalog>>,
}

impl BackendState {
    /// A backend never probed yet.
    pub fn new(label: &str, address: &str) -> BackendState {
        BackendState::from_config(BackendConfig {
            name: Some(label.to_string()),
            ..BackendConfig::from_address(address)
        })
    }

    /// A backend from its configuration, never probed yet.
    pub fn from_config(config: BackendConfig) -> BackendState {
        let label = config.label().to_string();
        let address = config.address.clone();
        BackendState {
            config,
            label,
            aliases: vec![address.clone()],
            address,
            role: None,
            probed_at: None,
            error: None,
            readonly_seen: false,
            contradiction: None,
            evidence_at: None,
            alive_at: None,
            liveness: Arc::new(Liveness::default()),
            stall: None,
            last_standing: Standing::Unprobed,
            hijacked: false,
            replicas: Vec::new(),
            retired: false,
            requires_auth: None,
            commands: None,
        }
    }

    /// Its latest probe answered ROLE within `staleness` and nothing failed since.
    fn fresh(&self, now: Instant, staleness: Duration) -> bool {
        self.error.is_none()
            && self.stall.is_none()
            && self
                .probed_at
                .is_some_and(|t| now.saturating_duration_since(t) <= staleness)
    }

    /// The latest proof of life, from the prober or a session.
    pub fn last_alive(&self) -> Option<Instant> {
        self.alive_at.max(self.liveness.last())
    }

    /// When silence began: the latest proof of life, else the first stall.
    fn silent_since(&self) -> Option<Instant> {
        self.last_alive()
            .or_else(|| self.stall.as_ref().map(|s| s.since))
    }

    /// Where it stands as of `now` (see [`Standing`]).
    pub fn standing(&self, now: Instant, bounds: Bounds) -> Standing {
        if self.error.is_some() {
            return Standing::Down;
        }
        if self.readonly_seen || self.hijacked {
            return Standing::Contradicted;
        }
        if self.role.is_none() && self.stall.is_none() {
            return Standing::Unprobed;
        }
        if self
            .silent_since()
            .is_some_and(|t| now.saturating_duration_since(t) > bounds.down_after)
        {
            return Standing::Down;
        }
        match &self.stall {
            Some(s) if s.busy => Standing::Busy,
            Some(_) => Standing::Slow,
            None if self.fresh(now, bounds.staleness) => Standing::Confirmed,
            None => Standing::Slow,
        }
    }

    /// The evidence behind its standing and when it was seen, for `/topology` and logs.
    pub fn evidence(&self, now: Instant, bounds: Bounds) -> (String, Option<Instant>) {
        match self.standing(now, bounds) {
            Standing::Unprobed => ("not probed yet".to_string(), None),
            Standing::Down => match &self.error {
                Some(e) => (e.clone(), self.evidence_at),
                None => {
                    let since = self.silent_since();
                    let silent = since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                    let last = self.stall.as_ref().map_or("", |s| s.evidence.as_str());
                    (
                        format!(
                            "silent for {} (probe.down_after {}); last: {last}",
                            humantime::format_duration(round_ms(silent)),
                            humantime::format_duration(bounds.down_after)
                        ),
                        since,
                    )
                }
            },
            Standing::Contradicted => match (&self.contradiction, &self.role) {
                (Some(c), _) => (c.clone(), self.evidence_at),
                (None, Some(r)) => (
                    format!("{r}: outside the configured backends"),
                    self.probed_at,
                ),
                (None, None) => ("contradicted".to_string(), self.evidence_at),
            },
            Standing::Busy | Standing::Slow => match &self.stall {
                Some(s) => (s.evidence.clone(), Some(s.since)),
                None => ("no recent probe".to_string(), self.probed_at),
            },
            Standing::Confirmed => (
                format!(
                    "ROLE: {}",
                    self.role
                        .as_ref()
                        .map_or("?".to_string(), |r| r.to_string())
                ),
                self.probed_at,
            ),
        }
    }

    /// Writable: its last known role is master and no evidence contradicts it (a fresh
    /// probe, or silence within `down_after`).
    pub fn writable(&self, now: Instant, bounds: Bounds) -> bool {
        !self.retired && self.role == Some(Role::Master) && self.standing(now, bounds).keeps_role()
    }

    /// Whether `host:port` names this backend.
    pub fn is(&self, host: &str, port: u16) -> bool {
        self.aliases.iter().any(|a| {
            a.rsplit_once(':')
                .is_some_and(|(h, p)| h == host && p.parse::<u16>() == Ok(port))
        })
    }

    /// One-line description for errors: `label (address): role, standing (evidence)`.
    pub fn describe(&self, now: Instant, bounds: Bounds) -> String {
        let standing = self.standing(now, bounds);
        let (evidence, _) = self.evidence(now, bounds);
        let what = match (standing, &self.role) {
            (Standing::Unprobed, _) => evidence,
            (Standing::Down, _) if self.error.is_some() => format!("unreachable ({evidence})"),
            (Standing::Down, _) => format!("down ({evidence})"),
            (Standing::Contradicted, Some(r)) if self.hijacked => {
                format!("{r}: outside the configured backends")
            }
            (Standing::Contradicted, r) => format!(
                "{}, answered {evidence}",
                r.as_ref()
                    .map_or("unknown role".to_string(), |r| r.to_string())
            ),
            (Standing::Confirmed, Some(r)) => r.to_string(),
            (s, r) => format!(
                "{} ({}: {evidence})",
                r.as_ref()
                    .map_or("unknown role".to_string(), |r| r.to_string()),
                s.name()
            ),
        };
        if self.label == self.address {
            format!("{}: {what}", self.label)
        } else {
            format!("{} ({}): {what}", self.label, self.address)
        }
    }
}

/// A duration cut to whole milliseconds (for humantime output).
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Why no backend is the confirmed master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoMaster {
    /// No backend is a master that evidence has not ruled out.
    None,
    /// Several claim master and the replicas do not decide between them.
    SplitBrain(Vec<usize>),
}

/// The confirmed-master rule (DESIGN.md): exactly one writable backend; several
/// writable → the freshly confirmed ones over the merely silent ones, then the one the
/// (fresh) replicas follow, if that decides; none → no master.
pub fn confirm(backends: &[BackendState], now: Instant, bounds: Bounds) -> Result<usize, NoMaster> {
    confirm_with(backends, now, bounds, None)
}

/// The confirmed-master rule with Sentinel's view: when Sentinel names a master
/// (`Some(Some(i))`), only that backend can be confirmed, and only once its own ROLE says
/// master; `Some(None)` means Sentinel has not answered yet.
pub fn confirm_with(
    backends: &[BackendState],
    now: Instant,
    bounds: Bounds,
    sentinel: Option<Option<usize>>,
) -> Result<usize, NoMaster> {
    if let Some(named) = sentinel {
        return match named {
            Some(i) if backends.get(i).is_some_and(|b| b.writable(now, bounds)) => Ok(i),
            _ => Err(NoMaster::None),
        };
    }
    let mut candidates: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].writable(now, bounds))
        .collect();
    // A replica promoted while the old master is frozen: the fresh master wins over the
    // silent one (which proves nothing either way).
    if candidates.len() > 1 {
        let confirmed: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| backends[i].standing(now, bounds) == Standing::Confirmed)
            .collect();
        if !confirmed.is_empty() {
            candidates = confirmed;
        }
    }
    match candidates.as_slice() {
        [] => Err(NoMaster::None),
        [one] => Ok(*one),
        many => {
            let followed: Vec<usize> = many
                .iter()
                .copied()
                .filter(|&c| {
                    backends.iter().any(|b| {
                        b.fresh(now, bounds.staleness)
                            && matches!(&b.role, Some(Role::Replica { master_host, master_port, .. })
                                if backends[c].is(master_host, *master_port))
                    })
                })
                .collect();
            match followed.as_slice() {
                [one] => Ok(*one),
                _ => Err(NoMaster::SplitBrain(many.to_vec())),
            }
        }
    }
}

/// An immutable view of every backend and the decision taken from it.
#[derive(Debug, Clone)]
pub struct Topology {
    pub backends: Vec<BackendState>,
    /// Index of the confirmed master, or why there is none.
    pub master: Result<usize, NoMaster>,
    /// Until when `master` holds without a newer probe.
    pub valid_until: Instant,
    /// Increases with every publication.
    pub generation: u64,
    /// The staleness bound the decision used.
    pub staleness: Duration,
    /// The silence bound the decision used (`probe.down_after`).
    pub down_after: Duration,
    /// Sentinel mode: the backend Sentinel names as master (`Some(None)` until it answers).
    pub sentinel_master: Option<Option<usize>>,
}

impl Topology {
    /// The bounds the decision used.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            staleness: self.staleness,
            down_after: self.down_after,
        }
    }

    /// The backend a running script or function blocks: its latest probe got `-BUSY`
    /// (where `SCRIPT KILL` and `FUNCTION KILL` must go, whatever its confirmation state).
    pub fn busy_backend(&self) -> Option<usize> {
        self.backends.iter().position(|b| {
            !b.retired
                && b.stall
                    .as_ref()
                    .is_some_and(|s| s.busy && s.evidence.contains("BUSY"))
        })
    }

    /// The confirmed master's index, if one is confirmed and not stale.
    pub fn master_now(&self) -> Option<usize> {
        self.master_at(Instant::now())
    }

    /// As `master_now`, at `now` (a session reads the clock once per wake-up, not per
    /// command).
    pub fn master_at(&self, now: Instant) -> Option<usize> {
        match self.master {
            Ok(i) if now <= self.valid_until => Some(i),
            _ => None,
        }
    }

    /// Every backend still configured is known to refuse unauthenticated clients (so in
    /// pass-through mode Redis authenticates every client). Unknown counts as no.
    pub fn backends_require_auth(&self) -> bool {
        let mut live = self.backends.iter().filter(|b| !b.retired).peekable();
        live.peek().is_some() && live.all(|b| b.requires_auth == Some(true))
    }

    /// A replica for reads: fresh, following the confirmed master with its link up, not
    /// hijacked. `seed` spreads sessions over the candidates.
    pub fn replica_for_reads(&self, seed: usize) -> Option<usize> {
        let master = self.backends.get(self.master_now()?)?;
        let now = Instant::now();
        let candidates: Vec<usize> = (0..self.backends.len())
            .filter(|&i| {
                let b = &self.backends[i];
                b.fresh(now, self.staleness)
                    && !b.hijacked
                    && !b.retired
                    && matches!(&b.role, Some(Role::Replica { master_host, master_port, link })
                        if link == "connected" && master.is(master_host, *master_port))
            })
            .collect();
        candidates.get(seed % candidates.len().max(1)).copied()
    }

    /// What the proxy knows, for `-MASTERDOWN` replies and logs.
    pub fn explain(&self) -> String {
        let why = match &self.master {
            Err(NoMaster::SplitBrain(ids)) => format!(
                "several backends claim master and the replicas do not decide between them ({})",
                ids.iter()
                    .filter_map(|&i| self.backends.get(i).map(|b| b.label.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Ok(_) => format!(
                "the master has given no sign of life for longer than probe.down_after ({})",
                humantime::format_duration(self.down_after)
            ),
            Err(NoMaster::None) => "no backend is a confirmed master".to_string(),
        };
        let now = Instant::now();
        let states: Vec<String> = self
            .backends
            .iter()
            .map(|b| b.describe(now, self.bounds()))
            .collect();
        format!("{why}; {}", states.join("; "))
    }
}

/// A session's copy of the confirmed master and its deadline (`TopologyStore::
/// master_cached`): refreshed only when a new snapshot was published, so the per-request
/// check is one plain atomic load and a clock comparison, where loading the snapshot
/// costs a read-modify-write.
#[derive(Debug, Clone, Copy)]
pub struct MasterCache {
    generation: u64,
    master: Option<usize>,
    valid_until: Instant,
}

impl Default for MasterCache {
    fn default() -> Self {
        MasterCache {
            // Never a published generation: the first check loads the snapshot.
            generation: u64::MAX,
            master: None,
            valid_until: Instant::now(),
        }
    }
}

/// Shared store of the current topology.
pub struct TopologyStore {
    current: ArcSwap<Topology>,
    /// The newest generation published or being published, stored before its snapshot
    /// (`master_cached`).
    generation: AtomicU64,
    changed: watch::Sender<u64>,
    /// One per backend: wakes its prober for an immediate probe.
    probe_now: Mutex<Vec<Arc<Notify>>>,
}

impl TopologyStore {
    /// A store for these backends (all unprobed: no master yet); `down_after` starts at
    /// `staleness` (set it with `update_all`).
    pub fn new(backends: Vec<BackendState>, staleness: Duration) -> Arc<TopologyStore> {
        let n = backends.len();
        let topo = Topology {
            backends,
            master: Err(NoMaster::None),
            valid_until: Instant::now(),
            generation: 0,
            staleness,
            down_after: staleness,
            sentinel_master: None,
        };
        let (changed, _) = watch::channel(0);
        Arc::new(TopologyStore {
            current: ArcSwap::from_pointee(topo),
            generation: AtomicU64::new(0),
            changed,
            probe_now: Mutex::new((0..n).map(|_| Arc::new(Notify::new())).collect()),
        })
    }

    /// The current snapshot (lock-free).
    pub fn load(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// The confirmed master at `now` (as `Topology::master_at`), without taking a
    /// reference to the snapshot: the per-request check of the session's path.
    pub fn master_at(&self, now: Instant) -> Option<usize> {
        self.current.load().master_at(now)
    }

    /// As `master_at`, through the caller's `cache`: the snapshot is loaded only when
    /// one newer than the cached one was published.
    pub fn master_cached(&self, cache: &mut MasterCache, now: Instant) -> Option<usize> {
        if self.generation.load(Ordering::SeqCst) != cache.generation {
            let topo = self.current.load();
            *cache = MasterCache {
                generation: topo.generation,
                master: topo.master.as_ref().ok().copied(),
                valid_until: topo.valid_until,
            };
        }
        cache.master.filter(|_| now <= cache.valid_until)
    }

    /// The command metadata to resolve a name the built-in table lacks: the confirmed
    /// master's, else the first backend's that has one (off the hot path: only for
    /// names the built-in table does not know).
    pub fn catalog(&self) -> Option<Arc<Catalog>> {
        let topo = self.current.load();
        topo.master_now()
            .and_then(|m| topo.backends.get(m))
            .and_then(|b| b.commands.clone())
            .or_else(|| {
                topo.backends
                    .iter()
                    .filter(|b| !b.retired)
                    .find_map(|b| b.commands.clone())
            })
    }

    /// A receiver that wakes on every publication.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Replace one backend's state and re-decide. Returns the new snapshot.
    pub fn update(&self, index: usize, f: impl Fn(&mut BackendState)) -> Arc<Topology> {
        self.update_all(|t| {
            if let Some(b) = t.backends.get_mut(index) {
                f(b);
            }
        })
    }

    /// Change the topology as a whole (add backends, set Sentinel's master) and re-decide.
    /// Each backend whose standing changed gets a log line and its gauges set.
    pub fn update_all(&self, f: impl Fn(&mut Topology)) -> Arc<Topology> {
        let mut published = None;
        let mut previous = None;
        self.current.rcu(|old| {
            let mut next = Topology::clone(old);
            f(&mut next);
            let now = Instant::now();
            let bounds = next.bounds();
            for b in next.backends.iter_mut() {
                b.last_standing = b.standing(now, bounds);
            }
            next.master = confirm_with(&next.backends, now, bounds, next.sentinel_master);
            next.valid_until = match next.master {
                Ok(i) => valid_until(&next.backends, i, now, bounds),
                Err(_) => now,
            };
            next.generation = old.generation + 1;
            // Announced before the snapshot is visible: a session whose cache is older
            // reloads from now on, so none goes on with the old master once a session
            // can see the new one. (A number announced by an attempt that loses the race
            // only makes caches reload until the winner is visible; never moves back.)
            self.generation.fetch_max(next.generation, Ordering::SeqCst);
            let next = Arc::new(next);
            published = Some(next.clone());
            previous = Some(Arc::clone(old));
            next
        });
        let snapshot = published.unwrap_or_else(|| self.load());
        if let Some(old) = previous {
            log_transitions(&old, &snapshot);
        }
        self.changed.send_replace(snapshot.generation);
        snapshot
    }

    /// A client write got `-READONLY` from this backend: stop routing writes there and
    /// probe it at once.
    pub fn report_readonly(&self, index: usize) {
        self.report_not_master(index, "-READONLY");
    }

    /// A client got an answer only a non-master gives (`-READONLY`, `-MASTERDOWN`): stop
    /// routing there until a probe confirms it again, and probe it at once.
    pub fn report_not_master(&self, index: usize, reply: &str) {
        let what = format!("{reply} to a client");
        let now = Instant::now();
        self.update(index, |b| {
            b.readonly_seen = true;
            b.contradiction = Some(what.clone());
            b.evidence_at = Some(now);
        });
        self.request_probe(index);
    }

    /// A session's connect to this backend failed: a refused or reset connection is
    /// evidence (down at once); a timeout is only silence (the prober decides).
    pub fn report_connect_error(&self, index: usize, evidence: Evidence) {
        if let Evidence::Down(why) = evidence {
            let now = Instant::now();
            self.update(index, |b| {
                b.error = Some(why.clone());
                b.evidence_at = Some(now);
            });
        }
        self.request_probe(index);
    }

    /// Wake a backend's prober now.
    pub fn request_probe(&self, index: usize) {
        if let Some(n) = self.notify(index) {
            n.notify_one();
        }
    }

    fn notify(&self, index: usize) -> Option<Arc<Notify>> {
        self.probe_now
            .lock()
            .ok()
            .and_then(|v| v.get(index).cloned())
    }

    /// The index of the backend at `host:port`, adding it (unprobed) when new; `true` when
    /// it was added (its prober must be started).
    pub fn ensure_backend(&self, config: BackendConfig) -> Option<(usize, bool)> {
        // One writer at a time keeps snapshot indexes and probe notifiers aligned.
        let mut notifies = self.probe_now.lock().ok()?;
        let topo = self.load();
        let (host, port) = config.address.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        if let Some(i) = topo.backends.iter().position(|b| b.is(host, port)) {
            return Some((i, false));
        }
        let index = topo.backends.len();
        notifies.push(Arc::new(Notify::new()));
        let state = BackendState::from_config(config);
        self.update_all(|t| {
            if t.backends.len() == index {
                t.backends.push(state.clone());
            }
        });
        Some((index, true))
    }

    /// Wait until a probe is requested for this backend.
    pub async fn probe_requested(&self, index: usize) {
        match self.notify(index) {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Wait up to `wait` for a confirmed master; returns its index.
    pub async fn wait_for_master(&self, wait: Duration) -> Option<usize> {
        let mut rx = self.subscribe();
        let deadline = Instant::now() + wait;
        loop {
            if let Some(i) = self.load().master_now() {
                return Some(i);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.load().master_now(),
            }
        }
    }
}

/// Until when the decision for master `i` holds without a new publication: while it
/// stays alive within `down_after`; only while its probe is fresh when it won over other
/// candidates (the choice must be re-made once that freshness ends).
fn valid_until(backends: &[BackendState], i: usize, now: Instant, bounds: Bounds) -> Instant {
    let Some(b) = backends.get(i) else {
        return now;
    };
    let alive = b
        .silent_since()
        .map_or(now, |t| t + bounds.down_after)
        .max(b.probed_at.map_or(now, |t| t + bounds.staleness));
    let contested = backends
        .iter()
        .enumerate()
        .any(|(j, o)| j != i && o.writable(now, bounds));
    if contested {
        b.probed_at.map_or(now, |t| t + bounds.staleness).min(alive)
    } else {
        alive
    }
}

/// One log line and the gauges for each backend whose standing changed.
fn log_transitions(old: &Topology, new: &Topology) {
    let now = Instant::now();
    for (i, b) in new.backends.iter().enumerate() {
        let from = old
            .backends
            .get(i)
            .map_or(Standing::Unprobed, |o| o.last_standing);
        let to = b.last_standing;
        if from == to {
            continue;
        }
        let (evidence, at) = b.evidence(now, new.bounds());
        let age_ms = at.map_or(0, |t| now.saturating_duration_since(t).as_millis() as u64);
        let role = b.role.as_ref().map(|r| r.name()).unwrap_or("unknown");
        if to == Standing::Confirmed {
            info!(backend = %b.label, from = from.name(), to = to.name(), role, %evidence, "backend standing");
        } else {
            warn!(backend = %b.label, from = from.name(), to = to.name(), role, %evidence, evidence_age_ms = age_ms, "backend standing");
        }
        crate::metrics::backend_standing(&b.label, from.name(), to.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(2);
    const BOUNDS: Bounds = Bounds {
        staleness: STALE,
        down_after: Duration::from_secs(10),
    };

    fn b(name: &str, port: u16, role: Option<Role>) -> BackendState {
        let mut s = BackendState::new(name, &format!("127.0.0.1:{port}"));
        s.probed_at = role.as_ref().map(|_| Instant::now());
        s.role = role;
        s
    }

    #[test]
    fn backends_require_auth_only_when_all_live_ones_are_known_to() {
        let topo = |states: Vec<(Option<bool>, bool)>| Topology {
            backends: states
                .into_iter()
                .enumerate()
                .map(|(i, (requires_auth, retired))| BackendState {
                    requires_auth,
                    retired,
                    ..b("x", 7000 + i as u16, None)
                })
                .collect(),
            master: Err(NoMaster::None),
            valid_until: Instant::now(),
            generation: 0,
            staleness: STALE,
            down_after: BOUNDS.down_after,
            sentinel_master: None,
        };
        assert!(!topo(vec![]).backends_require_auth());
        assert!(topo(vec![(Some(true), false)]).backends_require_auth());
        assert!(!topo(vec![(Some(true), false), (None, false)]).backends_require_auth());
        assert!(!topo(vec![(Some(true), false), (Some(false), false)]).backends_require_auth());
        assert!(topo(vec![(Some(true), false), (Some(false), true)]).backends_require_auth());
        assert!(!topo(vec![(Some(true), true)]).backends_require_auth());
    }

    fn replica_of(port: u16) -> Option<Role> {
        Some(Role::Replica {
            master_host: "127.0.0.1".into(),
            master_port: port,
            link: "connected".into(),
        })
    }

    #[test]
    fn confirmed_master_table() {
        let now = Instant::now();
        let mut stale = b("s", 1, Some(Role::Master));
        stale.probed_at = Some(now - Duration::from_secs(11));
        stale.alive_at = stale.probed_at;
        let mut failed = b("f", 1, Some(Role::Master));
        failed.error = Some("timeout".into());
        let mut ro = b("ro", 1, Some(Role::Master));
        ro.readonly_seen = true;
        let mut hijacked = b("h", 1, replica_of(9));
        hijacked.hijacked = true;

        let cases: Vec<(&str, Vec<BackendState>, Result<usize, NoMaster>)> = vec![
            ("single master", vec![b("a", 1, Some(Role::Master))], Ok(0)),
            ("unprobed", vec![b("a", 1, None)], Err(NoMaster::None)),
            ("silent past down_after", vec![stale], Err(NoMaster::None)),
            ("failed probe", vec![failed], Err(NoMaster::None)),
            ("readonly seen", vec![ro], Err(NoMaster::None)),
            ("hijacked replica", vec![hijacked], Err(NoMaster::None)),
            (
                "master and replicas",
                vec![
                    b("r1", 2, replica_of(1)),
                    b("m", 1, Some(Role::Master)),
                    b("r2", 3, replica_of(1)),
                ],
                Ok(1),
            ),
            (
                "only replicas",
                vec![b("r1", 2, replica_of(1)), b("r2", 3, replica_of(1))],
                Err(NoMaster::None),
            ),
            (
                "split brain decided by replicas",
                vec![
                    b("m1", 1, Some(Role::Master)),
                    b("m2", 2, Some(Role::Master)),
                    b("r", 3, replica_of(2)),
                ],
                Ok(1),
            ),
            (
                "split brain undecided",
                vec![
                    b("m1", 1, Some(Role::Master)),
                    b("m2", 2, Some(Role::Master)),
                ],
                Err(NoMaster::SplitBrain(vec![0, 1])),
            ),
            (
                "split brain with replicas on both sides",
                vec![
                    b("m1", 1, Some(Role::Master)),
                    b("m2", 2, Some(Role::Master)),
                    b("r1", 3, replica_of(1)),
                    b("r2", 4, replica_of(2)),
                ],
                Err(NoMaster::SplitBrain(vec![0, 1])),
            ),
            (
                "sentinel is never master",
                vec![b("s", 1, Some(Role::Sentinel))],
                Err(NoMaster::None),
            ),
        ];
        for (name, backends, expected) in cases {
            assert_eq!(confirm(&backends, now, BOUNDS), expected, "{name}");
        }
    }

    #[tokio::test]
    async fn store_publishes_and_notifies() {
        let store = TopologyStore::new(vec![BackendState::new("a", "127.0.0.1:1")], STALE);
        let mut rx = store.subscribe();
        assert_eq!(store.load().master_now(), None);
        store.update(0, |b| {
            b.role = Some(Role::Master);
            b.probed_at = Some(Instant::now());
        });
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(store.load().master_now(), Some(0));
        assert_eq!(
            store.wait_for_master(Duration::from_millis(1)).await,
            Some(0)
        );
        store.report_readonly(0);
        assert_eq!(store.load().master_now(), None);
        assert!(store.load().explain().contains("READONLY"));
    }

    fn stalled(busy: bool, silent_for: Duration) -> BackendState {
        let now = Instant::now();
        let mut s = b("m", 1, Some(Role::Master));
        s.probed_at = Some(now - silent_for);
        s.alive_at = s.probed_at;
        s.stall = Some(Stall {
            busy,
            evidence: if busy {
                "-BUSY".into()
            } else {
                "timed out after 500ms".into()
            },
            since: now - silent_for,
        });
        s
    }

    #[test]
    fn silence_keeps_the_role_until_down_after_and_evidence_acts_at_once() {
        let now = Instant::now();
        let cases: Vec<(&str, BackendState, Standing, bool)> = vec![
            (
                "fresh",
                b("m", 1, Some(Role::Master)),
                Standing::Confirmed,
                true,
            ),
            (
                "slow 3 s",
                stalled(false, Duration::from_secs(3)),
                Standing::Slow,
                true,
            ),
            (
                "busy 3 s",
                stalled(true, Duration::from_secs(3)),
                Standing::Busy,
                true,
            ),
            (
                "silent 11 s",
                stalled(false, Duration::from_secs(11)),
                Standing::Down,
                false,
            ),
            (
                "refused",
                {
                    let mut s = b("m", 1, Some(Role::Master));
                    s.error = Some("connection refused".into());
                    s
                },
                Standing::Down,
                false,
            ),
            (
                "readonly",
                {
                    let mut s = stalled(false, Duration::from_secs(1));
                    s.readonly_seen = true;
                    s
                },
                Standing::Contradicted,
                false,
            ),
            (
                "stale, no stall recorded",
                {
                    let mut s = b("m", 1, Some(Role::Master));
                    s.probed_at = Some(now - Duration::from_secs(5));
                    s.alive_at = s.probed_at;
                    s
                },
                Standing::Slow,
                true,
            ),
        ];
        for (name, backend, standing, writable) in cases {
            assert_eq!(backend.standing(now, BOUNDS), standing, "{name}");
            assert_eq!(backend.writable(now, BOUNDS), writable, "{name}");
        }
        // A reply read by a session is proof of life too.
        let s = stalled(false, Duration::from_secs(11));
        s.liveness.record(now - Duration::from_secs(1));
        assert_eq!(s.standing(now, BOUNDS), Standing::Slow);
    }

    #[test]
    fn a_fresh_master_wins_over_a_silent_one() {
        let now = Instant::now();
        let frozen = stalled(false, Duration::from_secs(2));
        let promoted = b("p", 2, Some(Role::Master));
        assert_eq!(confirm(&[frozen.clone(), promoted], now, BOUNDS), Ok(1));
        // Two silent masters decide nothing.
        let other = stalled(false, Duration::from_secs(1));
        assert_eq!(
            confirm(&[frozen, other], now, BOUNDS),
            Err(NoMaster::SplitBrain(vec![0, 1]))
        );
    }

    /// A session's cached master follows every publication at its next check: a
    /// demotion, a new master, and the deadline of the confirmation itself.
    #[tokio::test]
    async fn the_cached_master_follows_each_publication() {
        let store = TopologyStore::new(
            vec![
                BackendState::new("a", "127.0.0.1:1"),
                BackendState::new("b", "127.0.0.1:2"),
            ],
            STALE,
        );
        let mut cache = MasterCache::default();
        let now = Instant::now;
        assert_eq!(store.master_cached(&mut cache, now()), None);
        let confirm = |i: usize| {
            store.update(i, |b| {
                b.role = Some(Role::Master);
                b.probed_at = Some(Instant::now());
                b.alive_at = b.probed_at;
            })
        };
        confirm(0);
        assert_eq!(store.master_cached(&mut cache, now()), Some(0));
        assert_eq!(store.master_cached(&mut cache, now()), Some(0));
        store.report_readonly(0);
        assert_eq!(store.master_cached(&mut cache, now()), None);
        confirm(1);
        assert_eq!(store.master_cached(&mut cache, now()), Some(1));
        let until = store.load().valid_until;
        assert_eq!(store.master_cached(&mut cache, until), Some(1));
        assert_eq!(
            store.master_cached(&mut cache, until + Duration::from_millis(1)),
            None
        );
    }

    #[tokio::test]
    async fn silent_master_stays_published_until_down_after() {
        let store = TopologyStore::new(vec![BackendState::new("a", "127.0.0.1:1")], STALE);
        store.update_all(|t| t.down_after = Duration::from_secs(10));
        store.update(0, |b| {
            b.role = Some(Role::Master);
            b.probed_at = Some(Instant::now());
            b.alive_at = b.probed_at;
        });
        store.update(0, |b| {
            b.stall = Some(Stall {
                busy: false,
                evidence: "timed out after 500ms".into(),
                since: Instant::now(),
            })
        });
        let topo = store.load();
        assert_eq!(topo.master_now(), Some(0));
        assert_eq!(topo.backends[0].last_standing, Standing::Slow);
        assert!(topo.valid_until >= Instant::now() + Duration::from_secs(9));
        store.report_connect_error(0, Evidence::Silence("timed out".into()));
        assert_eq!(store.load().master_now(), Some(0));
        store.report_connect_error(0, Evidence::Down("connection refused".into()));
        assert_eq!(store.load().master_now(), None);
        assert!(store.load().explain().contains("connection refused"));
    }
}
