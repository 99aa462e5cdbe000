//! The accept loop: one session task per client, a connection limit with Redis's error
//! text, and a bounded drain on shutdown. Must not parse or route anything itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::admin::{self, AdminState};
use crate::auth::{UserError, Users};
use crate::backend::prober::{self, ProbeSettings};
use crate::backend::{BackendState, TopologyStore};
use crate::config::Config;
use crate::metrics::{self, Hot};
use crate::policy::{Policy, PolicyError};
use crate::protocol::ReplyLimits;
use crate::session::{self, Shared};

/// Redis's answer when `maxclients` is reached.
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// Answer to a non-loopback client in protected mode, then close (as Redis does).
const PROTECTED_REPLY: &[u8] = b"-DENIED portcullis is running in protected mode because no [[users]] are configured: only loopback clients are accepted. Configure [[users]] (AUTH at the proxy) or set protection.protected_mode = false (--protected-mode false) if the network already restricts who can connect.\r\n";
/// How long in-flight requests may take to finish after shutdown starts.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Users(#[from] UserError),
}

/// Serve clients from `listener` until `shutdown` is cancelled, then drain for at most
/// `DEFAULT_SHUTDOWN_GRACE`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    metrics_handle: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let policy = Policy::new(&config.protection)?;
    let users = Users::new(&config.users, &config.protection)?;
    let protected = config.protection.protected_mode && !users.enabled();
    let max_clients = config.limits.max_clients;
    let topology = TopologyStore::new(
        config
            .backends
            .iter()
            .map(|b| BackendState::new(b.label(), &b.address))
            .collect(),
        config.probe.staleness(),
    );
    let settings = ProbeSettings {
        interval: config.probe.interval,
        timeout: config.probe.timeout,
        auto_heal: config.protection.auto_heal,
        reply_limits: ReplyLimits {
            max_depth: config.limits.max_reply_depth,
            ..ReplyLimits::default()
        },
    };
    let probers = TaskTracker::new();
    for (index, backend) in config.backends.iter().enumerate() {
        probers.spawn(prober::run(
            index,
            backend.clone(),
            topology.clone(),
            settings,
            shutdown.clone(),
        ));
    }
    let admin_stop = CancellationToken::new();
    if let Some(admin_listener) = admin {
        let state = Arc::new(AdminState {
            topology: topology.clone(),
            metrics: metrics_handle,
            draining: shutdown.clone(),
        });
        probers.spawn(admin::serve(admin_listener, state, admin_stop.clone()));
    }
    probers.close();
    let shared = Arc::new(Shared {
        config,
        policy,
        users,
        hot: Hot::register(),
        topology,
    });
    let permits = Arc::new(Semaphore::new(max_clients));
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
        if !admitted(protected, peer.ip()) {
            metrics::rejected_connection("protected_mode");
            warn!(%peer, "protected mode: refused a non-loopback client (configure [[users]] or protection.protected_mode = false)");
            tracker.spawn(refuse(stream, PROTECTED_REPLY));
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::rejected_connection("max_clients");
            tracker.spawn(refuse(stream, MAX_CLIENTS_REPLY));
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
    if tokio::time::timeout(DEFAULT_SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            sessions = tracker.len(),
            "shutdown grace expired; closing remaining sessions"
        );
    }
    Ok(())
}

/// Tell a client over the limit why, as Redis does, and close.
async fn refuse(stream: TcpStream, reply: &'static [u8]) {
    use tokio::io::AsyncWriteExt;
    let mut stream = stream;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply)).await;
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
