//! The accept loop: one session task per client, a connection limit with Redis's error
//! text, and a bounded drain on shutdown. Must not parse or route anything itself.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::backend::prober::{self, ProbeSettings};
use crate::backend::sentinel;
use crate::backend::{BackendState, TopologyStore};
use crate::config::Config;
use crate::metrics::{self, Hot};
use crate::net::Stream;
use crate::policy::ProtectionMode;
use crate::runtime::{self, Runtime, RuntimeError};
use crate::session::{self, Shared};

/// Redis's answer when `maxclients` is reached.
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// Answer to a non-loopback client in protected mode, then close (as Redis does).
const PROTECTED_REPLY: &[u8] = b"-DENIED portcullis is running in protected mode because no [[users]] are configured: only loopback clients are accepted. Configure [[users]] (AUTH at the proxy), require client certificates (tls.client_ca), use auth.mode = passthrough with a Redis that requires a password, or set protection.protected_mode = false (--protected-mode false) if the network already restricts who can connect.\r\n";

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// A reload request: the new config, and where to say how it went.
pub type ReloadRequest = (Config, Option<oneshot::Sender<Result<u64, RuntimeError>>>);

/// What `run` is given besides the config.
pub struct Control {
    /// Cancelled to stop accepting and drain.
    pub shutdown: CancellationToken,
    /// New configs to apply in place (SIGHUP in `main`).
    pub reloads: Option<mpsc::Receiver<ReloadRequest>>,
    /// Rendered at `/metrics` when an admin listener is given.
    pub metrics: Option<PrometheusHandle>,
}

/// Serve clients from `listener` until `control.shutdown` is cancelled, then drain for at
/// most `shutdown.grace`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    control: Control,
) -> Result<(), RunError> {
    let Control {
        shutdown,
        reloads,
        metrics: metrics_handle,
    } = control;
    let runtime = Runtime::build(config, 0)?;
    let config = &runtime.config;
    runtime::warn_if_shadow(&runtime);
    let max_clients = config.limits.max_clients;
    let grace = config.shutdown.grace;
    let topology = TopologyStore::new(
        config
            .backends
            .iter()
            .map(|b| BackendState::from_config(b.clone()))
            .collect(),
        config.probe.staleness(),
    );
    let down_after = config.probe.down_after();
    topology.update_all(|t| t.down_after = down_after);
    let settings = Arc::new(ArcSwap::from_pointee(probe_settings(&runtime)));
    let probers = TaskTracker::new();
    // Starts the prober of a backend added later (Sentinel discovery, reload).
    let spawner: sentinel::SpawnProber = {
        let (topology, probers, shutdown, settings) = (
            topology.clone(),
            probers.clone(),
            shutdown.clone(),
            settings.clone(),
        );
        Arc::new(move |index, backend| {
            probers.spawn(prober::run(
                index,
                backend,
                topology.clone(),
                settings.clone(),
                shutdown.clone(),
            ));
        })
    };
    for (index, backend) in config.backends.iter().enumerate() {
        spawner(index, backend.clone());
    }
    let cluster = config.cluster.clone().map(|cfg| {
        let store = crate::cluster::ClusterStore::new(cfg, topology.clone(), spawner.clone());
        probers.spawn(crate::cluster::store::run(
            store.clone(),
            settings.clone(),
            shutdown.clone(),
        ));
        store
    });
    if let Some(sentinel_cfg) = config.sentinel.clone() {
        topology.update_all(|t| t.sentinel_master = Some(None));
        probers.spawn(sentinel::run(
            sentinel_cfg,
            settings.clone(),
            topology.clone(),
            spawner.clone(),
            config.probe.interval,
            config.probe.timeout,
            shutdown.clone(),
        ));
    }
    // Stopped after the drain, not at shutdown: the drain stays observable.
    let admin_stop = CancellationToken::new();
    let shadow = Arc::new(std::sync::atomic::AtomicBool::new(
        runtime.config.protection.mode == ProtectionMode::Shadow,
    ));
    if let Some(admin_listener) = admin {
        let state = Arc::new(AdminState {
            topology: topology.clone(),
            metrics: metrics_handle,
            draining: shutdown.clone(),
            shadow: shadow.clone(),
            cluster: cluster.clone(),
        });
        probers.spawn(admin::serve(admin_listener, state, admin_stop.clone()));
    }
    let shared = Arc::new(Shared {
        runtime: ArcSwap::from_pointee(runtime),
        hot: Hot::register(),
        topology,
        pools: session::Pools::default(),
        cluster,
        scripts: session::ScriptCache::default(),
    });
    if let Some(mut rx) = reloads {
        let shared = shared.clone();
        let settings = settings.clone();
        let stop = shutdown.clone();
        probers.spawn(async move {
            loop {
                let request = tokio::select! {
                    r = rx.recv() => r,
                    _ = stop.cancelled() => None,
                };
                let Some((config, reply)) = request else {
                    return;
                };
                let old = shared.runtime.load_full();
                // Off the runtime's threads: a reload reads certificate files and parses
                // them, which would pause every session on a single-threaded runtime.
                let target = shared.clone();
                let built =
                    tokio::task::spawn_blocking(move || runtime::reload(&target.runtime, config))
                        .await;
                // Whatever the outcome, a runtime that was swapped in gets its backends and
                // probe settings applied.
                let new = shared.runtime.load_full();
                if !Arc::ptr_eq(&old, &new) {
                    shadow.store(
                        new.config.protection.mode == ProtectionMode::Shadow,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    apply_backends(&shared.topology, &old.config, &new.config, &spawner);
                    settings.store(Arc::new(probe_settings(&new)));
                }
                match built {
                    Ok(result) => {
                        if let Some(reply) = reply {
                            let _ = reply.send(result);
                        }
                    }
                    // A panic in the reload: dropping `reply` tells the requester it got no
                    // answer; counted as rejected unless the new runtime was swapped in.
                    Err(e) => {
                        if Arc::ptr_eq(&old, &new) {
                            crate::metrics::config_reload(false);
                        }
                        error!(error = %e, "the config reload failed");
                    }
                }
            }
        });
    }
    probers.close();
    let permits = Arc::new(Semaphore::new(max_clients));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let tracker = TaskTracker::new();
    info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "portcullis accepting clients");

    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Read per connection: a reload that adds users (or client certificates) lifts it.
        // Pass-through: a Redis that requires a password authenticates clients itself.
        let protected = shared
            .runtime
            .load()
            .protected_now(shared.topology.load().backends_require_auth());
        if !admitted(protected, peer.ip()) {
            metrics::rejected_connection("protected_mode");
            warn!(%peer, "protected mode: refused a non-loopback client (configure [[users]], tls.client_ca, auth.mode = passthrough with a password-protected Redis, or protection.protected_mode = false)");
            refuse(&tracker, &refusals, stream, PROTECTED_REPLY, &shared);
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::rejected_connection("max_clients");
            refuse(&tracker, &refusals, stream, MAX_CLIENTS_REPLY, &shared);
            continue;
        };
        let shared = shared.clone();
        let token = shutdown.clone();
        tracker.spawn(async move {
            shared.hot.connections.increment(1.0);
            shared.hot.connections_total.increment(1);
            debug!(%peer, "client connected");
            session::run(stream, peer, shared.clone(), token).await;
            shared.hot.connections.decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    info!(sessions = tracker.len(), "shutting down: draining sessions");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            sessions = tracker.len(),
            "shutdown grace expired; closing remaining sessions"
        );
    }
    // The admin endpoints answered through the drain (`/readyz` 503, `/metrics`).
    admin_stop.cancel();
    shared.pools.close();
    Ok(())
}

/// Probe settings from a runtime.
fn probe_settings(runtime: &Runtime) -> ProbeSettings {
    let config = &runtime.config;
    ProbeSettings {
        tls: runtime.backend_tls.clone(),
        check_auth: runtime.passthrough(),
        interval: config.probe.interval,
        timeout: config.probe.timeout,
        auto_heal: config.protection.auto_heal,
        reply_limits: crate::protocol::ReplyLimits {
            max_depth: config.limits.max_reply_depth,
            ..crate::protocol::ReplyLimits::default()
        },
    }
}

/// Apply a reloaded backend list and probe bounds (staleness, down_after) to the topology: new backends are
/// added and probed, changed ones get their new name and credentials (used by the next
/// connection), removed ones are retired (no longer routed to; their prober stops).
/// Sessions move off a retired master at their next safe point.
fn apply_backends(
    topology: &TopologyStore,
    old: &Config,
    new: &Config,
    spawn: &sentinel::SpawnProber,
) {
    for b in &new.backends {
        if let Some((index, added)) = topology.ensure_backend(b.clone()) {
            let cfg = b.clone();
            topology.update(index, |s| {
                s.config = cfg.clone();
                s.label = cfg.label().to_string();
                s.retired = false;
            });
            if added {
                info!(backend = %b.label(), "reload: backend added");
                spawn(index, b.clone());
            }
        }
    }
    let removed: Vec<&str> = old
        .backends
        .iter()
        .filter(|o| !new.backends.iter().any(|n| n.address == o.address))
        .map(|o| o.address.as_str())
        .collect();
    let staleness = new.probe.staleness();
    let down_after = new.probe.down_after();
    topology.update_all(|t| {
        t.staleness = staleness;
        t.down_after = down_after;
        for b in t.backends.iter_mut() {
            if removed.contains(&b.config.address.as_str()) {
                b.retired = true;
            }
        }
    });
    for r in removed {
        warn!(backend = %r, "reload: backend removed; no longer routed to");
    }
}

/// Refusals explained at once; past this, refused connections are closed without a
/// word, so a flood of them cannot hold file descriptors (a TLS refusal costs a handshake
/// and up to a second).
const MAX_REFUSALS: usize = 64;

/// Tell a refused client why, as Redis does (over TLS on a TLS listener), and close; or
/// just close when `MAX_REFUSALS` are already being told.
fn refuse(
    tracker: &TaskTracker,
    refusals: &Arc<Semaphore>,
    tcp: TcpStream,
    reply: &'static [u8],
    shared: &Shared,
) {
    const BOUND: Duration = Duration::from_secs(1);
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    let tls = shared.runtime.load().client_tls.clone();
    tracker.spawn(async move {
        let mut stream = match tls {
            None => Stream::plain(tcp),
            Some(tls) => match tokio::time::timeout(BOUND, tls.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                _ => return,
            },
        };
        let _ = tokio::time::timeout(BOUND, stream.write_all(reply)).await;
        stream.close();
        drop(permit);
    });
}

/// Protected mode admits only loopback clients (IPv4 127.0.0.0/8, IPv6 ::1, and
/// IPv4-mapped loopback).
fn admitted(protected: bool, ip: std::net::IpAddr) -> bool {
    !protected || ip.is_loopback() || ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::admitted;

    #[test]
    fn protected_mode_admits_only_loopback() {
        for (ip, ok) in [
            ("127.0.0.1", true),
            ("127.1.2.3", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("10.0.0.5", false),
            ("192.168.1.1", false),
            ("::ffff:10.0.0.5", false),
            ("2001:db8::1", false),
        ] {
            let ip = ip.parse().unwrap();
            assert_eq!(admitted(true, ip), ok, "{ip}");
            assert!(admitted(false, ip));
        }
    }
}
