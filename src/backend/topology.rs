//! The topology store: what the probers last learned about every backend, published as an
//! immutable snapshot (`ArcSwap`) plus a change notification, and the pure decision of
//! which backend is the *confirmed master*. Must not do I/O.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::catalog::Catalog;
use crate::config::BackendConfig;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

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
    /// The latest probe failure, if the latest probe failed.
    pub error: Option<String>,
    /// A client write got `-READONLY` here since the last successful probe.
    pub readonly_seen: bool,
    /// It follows a master outside the configured set.
    pub hijacked: bool,
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
            hijacked: false,
            retired: false,
            requires_auth: None,
            commands: None,
        }
    }

    fn fresh(&self, now: Instant, staleness: Duration) -> bool {
        self.error.is_none()
            && self
                .probed_at
                .is_some_and(|t| now.saturating_duration_since(t) <= staleness)
    }

    /// Writable: fresh master probe, nothing since contradicting it.
    pub fn writable(&self, now: Instant, staleness: Duration) -> bool {
        !self.retired
            && self.role == Some(Role::Master)
            && self.fresh(now, staleness)
            && !self.readonly_seen
            && !self.hijacked
    }

    /// Whether `host:port` names this backend.
    pub fn is(&self, host: &str, port: u16) -> bool {
        self.aliases.iter().any(|a| {
            a.rsplit_once(':')
                .is_some_and(|(h, p)| h == host && p.parse::<u16>() == Ok(port))
        })
    }

    /// One-line description for errors: `label (address): role`.
    pub fn describe(&self) -> String {
        let what = match (&self.role, &self.error) {
            (_, Some(e)) => format!("unreachable ({e})"),
            (Some(r), None) if self.hijacked => format!("{r}: outside the configured backends"),
            (Some(r), None) if self.readonly_seen => format!("{r}, answered READONLY"),
            (Some(r), None) => r.to_string(),
            (None, None) => "not probed yet".to_string(),
        };
        if self.label == self.address {
            format!("{}: {what}", self.label)
        } else {
            format!("{} ({}): {what}", self.label, self.address)
        }
    }
}

/// Why no backend is the confirmed master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoMaster {
    /// No backend is a fresh, uncontradicted master.
    None,
    /// Several claim master and the replicas do not decide between them.
    SplitBrain(Vec<usize>),
}

/// The confirmed-master rule (DESIGN.md): exactly one writable backend; several
/// writable → the one the (fresh) replicas follow, if that decides; none → no master.
pub fn confirm(
    backends: &[BackendState],
    now: Instant,
    staleness: Duration,
) -> Result<usize, NoMaster> {
    confirm_with(backends, now, staleness, None)
}

/// The confirmed-master rule with Sentinel's view: when Sentinel names a master
/// (`Some(Some(i))`), only that backend can be confirmed, and only once its own ROLE says
/// master; `Some(None)` means Sentinel has not answered yet.
pub fn confirm_with(
    backends: &[BackendState],
    now: Instant,
    staleness: Duration,
    sentinel: Option<Option<usize>>,
) -> Result<usize, NoMaster> {
    if let Some(named) = sentinel {
        return match named {
            Some(i) if backends.get(i).is_some_and(|b| b.writable(now, staleness)) => Ok(i),
            _ => Err(NoMaster::None),
        };
    }
    let candidates: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].writable(now, staleness))
        .collect();
    match candidates.as_slice() {
        [] => Err(NoMaster::None),
        [one] => Ok(*one),
        many => {
            let followed: Vec<usize> = many
                .iter()
                .copied()
                .filter(|&c| {
                    backends.iter().any(|b| {
                        b.fresh(now, staleness)
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
    /// Sentinel mode: the backend Sentinel names as master (`Some(None)` until it answers).
    pub sentinel_master: Option<Option<usize>>,
}

impl Topology {
    /// The confirmed master's index, if one is confirmed and not stale.
    pub fn master_now(&self) -> Option<usize> {
        self.master_at(Instant::now())
    }

    /// The confirmed master as of `now` (a clock read the caller already has).
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
            Ok(_) => "the master's last probe is too old".to_string(),
            Err(NoMaster::None) => "no backend is a confirmed master".to_string(),
        };
        let states: Vec<String> = self.backends.iter().map(|b| b.describe()).collect();
        format!("{why}; {}", states.join("; "))
    }
}

/// Shared store of the current topology.
pub struct TopologyStore {
    current: ArcSwap<Topology>,
    changed: watch::Sender<u64>,
    /// One per backend: wakes its prober for an immediate probe.
    probe_now: Mutex<Vec<Arc<Notify>>>,
}

impl TopologyStore {
    /// A store for these backends (all unprobed: no master yet).
    pub fn new(backends: Vec<BackendState>, staleness: Duration) -> Arc<TopologyStore> {
        let n = backends.len();
        let topo = Topology {
            backends,
            master: Err(NoMaster::None),
            valid_until: Instant::now(),
            generation: 0,
            staleness,
            sentinel_master: None,
        };
        let (changed, _) = watch::channel(0);
        Arc::new(TopologyStore {
            current: ArcSwap::from_pointee(topo),
            changed,
            probe_now: Mutex::new((0..n).map(|_| Arc::new(Notify::new())).collect()),
        })
    }

    /// The current snapshot (lock-free).
    pub fn load(&self) -> Arc<Topology> {
        self.current.load_full()
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
    pub fn update_all(&self, f: impl Fn(&mut Topology)) -> Arc<Topology> {
        let mut published = None;
        self.current.rcu(|old| {
            let mut next = Topology::clone(old);
            f(&mut next);
            let now = Instant::now();
            next.master = confirm_with(&next.backends, now, next.staleness, next.sentinel_master);
            next.valid_until = match next.master {
                Ok(i) => next.backends[i]
                    .probed_at
                    .map(|t| t + next.staleness)
                    .unwrap_or(now),
                Err(_) => now,
            };
            next.generation = old.generation + 1;
            let next = Arc::new(next);
            published = Some(next.clone());
            next
        });
        let snapshot = published.unwrap_or_else(|| self.load());
        self.changed.send_replace(snapshot.generation);
        snapshot
    }

    /// A client write got `-READONLY` from this backend: stop routing writes there and
    /// probe it at once.
    pub fn report_readonly(&self, index: usize) {
        self.update(index, |b| b.readonly_seen = true);
        self.request_probe(index);
    }

    /// A session could not connect to this backend: unconfirmed until a probe succeeds.
    pub fn report_unreachable(&self, index: usize, why: &[u8]) {
        let why = String::from_utf8_lossy(why.trim_ascii()).into_owned();
        self.update(index, |b| b.error = Some(why.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(2);

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
        stale.probed_at = Some(now - Duration::from_secs(10));
        let mut failed = b("f", 1, Some(Role::Master));
        failed.error = Some("timeout".into());
        let mut ro = b("ro", 1, Some(Role::Master));
        ro.readonly_seen = true;
        let mut hijacked = b("h", 1, replica_of(9));
        hijacked.hijacked = true;

        let cases: Vec<(&str, Vec<BackendState>, Result<usize, NoMaster>)> = vec![
            ("single master", vec![b("a", 1, Some(Role::Master))], Ok(0)),
            ("unprobed", vec![b("a", 1, None)], Err(NoMaster::None)),
            ("stale probe", vec![stale], Err(NoMaster::None)),
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
            assert_eq!(confirm(&backends, now, STALE), expected, "{name}");
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
}
