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
use crate::backend::prober::{self, ProbeSettings};
use crate::backend::{BackendState, TopologyStore};
use crate::config::Config;
use crate::metrics::{self, Hot};
use crate::policy::{Policy, PolicyError};
use crate::protocol::ReplyLimits;
use crate::session::{self, Shared};

/// Redis's answer when `maxclients` is reached.
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// How long in-flight requests may take to finish after shutdown starts.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::rejected_connection("max_clients");
            tracker.spawn(refuse(stream));
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
async fn refuse(stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut stream = stream;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(MAX_CLIENTS_REPLY)).await;
}
