//! Admin HTTP listener, separate from the data port: `/metrics` (Prometheus text),
//! `/healthz` (process alive), `/readyz` (200 only while a confirmed master exists, which
//! a stall within `probe.down_after` does not end, and the proxy accepts clients),
//! `/topology` (JSON: each backend's state, evidence and its age). Read-only: nothing
//! here changes the proxy.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::backend::TopologyStore;

/// What the admin endpoints read.
pub struct AdminState {
    pub topology: Arc<TopologyStore>,
    pub metrics: Option<PrometheusHandle>,
    /// Cancelled when the proxy stops accepting clients (drain starts).
    pub draining: CancellationToken,
    /// `protection.mode = "shadow"` is in force (kept current across reloads): `/topology`
    /// says loudly that nothing is refused.
    pub shadow: Arc<std::sync::atomic::AtomicBool>,
    /// Cluster mode: the slot map and per-shard masters.
    pub cluster: Option<Arc<crate::cluster::ClusterStore>>,
}

/// Serve admin requests until `stop` (after the drain, so `/readyz` reports it).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(admin = %addr, "admin endpoints: /metrics /healthz /readyz /topology");
    }
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

fn response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// `/topology`'s cluster part: the map's version and, per shard, its slot ranges, the
/// master the map names and whether its own ROLE confirms it.
fn cluster_json(
    state: &crate::cluster::ClusterState,
    topo: &crate::backend::Topology,
) -> serde_json::Value {
    let covered = state.slots_covered(topo);
    crate::metrics::cluster_slots_covered(covered);
    let confirmed = state.confirmed_masters(topo);
    let shards: Vec<_> = state
        .map
        .iter()
        .flat_map(|m| m.shards.iter().zip(&state.masters))
        .map(|(shard, &index)| {
            let ranges: Vec<String> = shard
                .ranges
                .iter()
                .map(|&(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            json!({
                "slots": ranges,
                "master": shard.master.address(),
                "master_id": shard.master.id,
                "confirmed_master": confirmed.contains(&index).then(|| shard.master.address()),
                "replicas": shard.replicas.iter().map(|r| r.address()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "epoch": state.epoch,
        "map_from": state.from,
        "views_compared": state.views,
        "slots_mapped": state.map.as_ref().map_or(0, |m| m.covered()),
        "slots_covered": covered,
        "shards": shards,
    })
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => response(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let topo = state.topology.load();
            if state.draining.is_cancelled() {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "shutting down\n",
                )
            } else if let Some(cluster) = &state.cluster {
                // Cluster mode: every slot served by a confirmed master.
                let covered = cluster.load().slots_covered(&topo);
                crate::metrics::cluster_slots_covered(covered);
                if covered == crate::cluster::SLOTS {
                    response(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!(
                            "{covered} of {} slots served by a confirmed master\n",
                            crate::cluster::SLOTS
                        ),
                    )
                }
            } else if topo.master_now().is_some() {
                response(StatusCode::OK, "text/plain", "ready\n")
            } else {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("no confirmed master: {}\n", topo.explain()),
                )
            }
        }
        "/metrics" => match &state.metrics {
            Some(h) => {
                h.run_upkeep();
                crate::metrics::uring_totals();
                response(StatusCode::OK, "text/plain; version=0.0.4", h.render())
            }
            None => response(StatusCode::NOT_FOUND, "text/plain", "no metrics recorder\n"),
        },
        "/topology" => {
            let topo = state.topology.load();
            let now = Instant::now();
            let bounds = topo.bounds();
            let ms_ago = |t: Instant| now.saturating_duration_since(t).as_millis() as u64;
            let backends: Vec<_> = topo
                .backends
                .iter()
                .map(|b| {
                    let (evidence, seen) = b.evidence(now, bounds);
                    json!({
                        "name": b.label,
                        "address": b.address,
                        "state": b.standing(now, bounds).name(),
                        "evidence": evidence,
                        "evidence_age_ms": seen.map(ms_ago),
                        "last_alive_ms_ago": b.last_alive().map(ms_ago),
                        "role": b.role.as_ref().map(|r| r.name()),
                        "detail": b.role.as_ref().map(|r| r.to_string()),
                        "last_probe_ms_ago": b.probed_at.map(ms_ago),
                        "probe_error": b.error,
                        "readonly_seen": b.readonly_seen,
                        "hijacked": b.hijacked,
                        "server": b.commands.as_ref().and_then(|c| c.server.clone()),
                        "commands_reported": b.commands.as_ref().map(|c| c.reported),
                        "commands_learned": b.commands.as_ref().map(|c| c.names()),
                    })
                })
                .collect();
            // Cluster mode: masters are per shard (`cluster.shards`), not one for all.
            let master = topo
                .master_now()
                .filter(|_| state.cluster.is_none())
                .and_then(|i| topo.backends.get(i))
                .map(|b| b.label.clone());
            let shadow = state.shadow.load(std::sync::atomic::Ordering::Relaxed);
            let cluster = state
                .cluster
                .as_ref()
                .map(|c| cluster_json(&c.load(), &topo));
            let body = json!({
                "cluster": cluster,
                "protection_mode": if shadow { "shadow" } else { "enforce" },
                "protection_enforced": !shadow,
                "protection_warning": shadow.then_some(
                    "PROTECTION NOT ENFORCED: shadow mode forwards every command the policy would refuse and only logs and counts it",
                ),
                "confirmed_master": master,
                "reason": match (&state.cluster, &master) {
                    (Some(_), _) => Some("cluster mode: each shard's confirmed master is in cluster.shards".to_string()),
                    (None, None) => Some(topo.explain()),
                    (None, Some(_)) => None,
                },
                "generation": topo.generation,
                "down_after_ms": bounds.down_after.as_millis() as u64,
                "backends": backends,
            });
            response(StatusCode::OK, "application/json", format!("{body:#}\n"))
        }
        _ => response(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
