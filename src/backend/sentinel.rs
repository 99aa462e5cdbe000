//! Sentinel mode: learn the master's address from Sentinel (`SENTINEL
//! get-master-addr-by-name`, and at once on `+switch-master` over pub/sub) and the
//! replicas from `SENTINEL replicas`. Every address learned becomes a backend with its own
//! prober, so it is still confirmed by `ROLE`; Sentinel only decides which one may be.

use std::sync::Arc;
use std::time::Duration;

use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::prober::ProbeSettings;
use crate::backend::{BackendLink, Handshake, TopologyStore};
use crate::config::{BackendConfig, SentinelConfig};
use crate::protocol::{Item, Reply, ReplyLimits, Request};
use crate::tls::BackendTls;
use arc_swap::ArcSwap;

/// Called with each newly discovered backend's index and config: starts its prober.
pub type SpawnProber = Arc<dyn Fn(usize, BackendConfig) + Send + Sync>;

/// Poll Sentinel every `interval` (and at once on `+switch-master`) until shutdown.
pub async fn run(
    cfg: SentinelConfig,
    settings: Arc<ArcSwap<ProbeSettings>>,
    store: Arc<TopologyStore>,
    spawn: SpawnProber,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let switched = Arc::new(Notify::new());
    tokio::spawn(watch_switch(
        cfg.clone(),
        settings.clone(),
        switched.clone(),
        timeout,
        shutdown.clone(),
    ));
    let mut conn: Option<BackendLink> = None;
    let mut last_master: Option<String> = None;
    loop {
        let tls = tls_for(&cfg, &settings);
        match tokio::time::timeout(timeout, poll(&cfg, tls.as_deref(), &mut conn, timeout)).await {
            Ok(Ok((master, replicas))) => {
                let node = |address: String| BackendConfig {
                    address,
                    name: None,
                    username: cfg.backend_username.clone(),
                    password: cfg.backend_password.clone(),
                };
                let mut index_of = |address: String| {
                    let (index, added) = store.ensure_backend(node(address.clone()))?;
                    if added {
                        info!(backend = %address, "sentinel: discovered backend");
                        spawn(index, node(address));
                    }
                    Some(index)
                };
                for r in replicas {
                    index_of(r);
                }
                let master_index = master.clone().and_then(&mut index_of);
                if master != last_master {
                    warn!(master = ?master, master_name = %cfg.master_name, "sentinel: master address");
                    last_master = master;
                }
                store.update_all(|t| t.sentinel_master = Some(master_index));
                if let Some(i) = master_index {
                    store.request_probe(i);
                }
            }
            Ok(Err(e)) => {
                conn = None;
                warn!(error = %e, "sentinel query failed");
            }
            Err(_) => {
                conn = None;
                warn!("sentinel query timed out");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = switched.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// `[backend_tls]` as of now (reloads rotate certificates) when `sentinel.tls` is set.
fn tls_for(cfg: &SentinelConfig, settings: &ArcSwap<ProbeSettings>) -> Option<Arc<BackendTls>> {
    if cfg.tls {
        settings.load().tls.clone()
    } else {
        None
    }
}

/// One round: the master's address and the replicas' addresses.
async fn poll(
    cfg: &SentinelConfig,
    tls: Option<&BackendTls>,
    conn: &mut Option<BackendLink>,
    timeout: Duration,
) -> Result<(Option<String>, Vec<String>), String> {
    if conn.is_none() {
        *conn = Some(connect(cfg, tls, timeout).await?);
    }
    let Some(link) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let name = cfg.master_name.as_bytes();
    let master = call(
        link,
        &Request::from_args(&[b"SENTINEL".as_slice(), b"get-master-addr-by-name", name]),
    )
    .await?;
    let master = match master.items().as_deref() {
        Some([Item::Str(host), Item::Str(port)]) => Some(format!(
            "{}:{}",
            String::from_utf8_lossy(host),
            String::from_utf8_lossy(port)
        )),
        _ => None,
    };
    let replicas = call(
        link,
        &Request::from_args(&[b"SENTINEL".as_slice(), b"replicas", name]),
    )
    .await?;
    Ok((master, replica_addresses(&replicas)))
}

/// `ip:port` of every replica in a `SENTINEL replicas` reply (arrays of field/value).
fn replica_addresses(reply: &Reply) -> Vec<String> {
    // The frame was already bounded by our scanner; decode it fully to read the maps.
    let Ok(Some((OwnedFrame::Array(entries), _))) =
        redis_protocol::resp2::decode::decode(reply.frame())
    else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let OwnedFrame::Array(fields) = entry else {
                return None;
            };
            let get = |key: &[u8]| {
                fields.chunks(2).find_map(|kv| match kv {
                    [OwnedFrame::BulkString(k), OwnedFrame::BulkString(v)] if k == key => {
                        Some(String::from_utf8_lossy(v).into_owned())
                    }
                    _ => None,
                })
            };
            Some(format!("{}:{}", get(b"ip")?, get(b"port")?))
        })
        .collect()
}

async fn connect(
    cfg: &SentinelConfig,
    tls: Option<&BackendTls>,
    timeout: Duration,
) -> Result<BackendLink, String> {
    let mut last = String::from("no sentinel addresses");
    for address in &cfg.addresses {
        let node = BackendConfig {
            address: address.clone(),
            name: None,
            username: cfg.username.clone(),
            password: cfg.password.clone(),
        };
        match BackendLink::open(
            &node,
            &Handshake::default(),
            timeout,
            ReplyLimits::default(),
            tls,
        )
        .await
        {
            Ok(link) => return Ok(link),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

async fn call(link: &mut BackendLink, req: &Request) -> Result<Reply, String> {
    link.send(req.frame()).await.map_err(|e| e.to_string())?;
    next_reply(link).await
}

/// The next reply from a Sentinel; an error reply is an error.
async fn next_reply(link: &mut BackendLink) -> Result<Reply, String> {
    let r = link
        .next_reply()
        .await
        .map_err(|e| format!("sentinel: {e}"))?;
    if r.is_error() {
        return Err(String::from_utf8_lossy(r.frame().trim_ascii_end()).into_owned());
    }
    Ok(r)
}

/// One subscription: returns only on error.
async fn switch_session(
    cfg: &SentinelConfig,
    tls: Option<&BackendTls>,
    switched: &Notify,
    timeout: Duration,
) -> Result<(), String> {
    let mut link = connect(cfg, tls, timeout).await?;
    link.send(Request::from_args(&[b"SUBSCRIBE".as_slice(), b"+switch-master"]).frame())
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let msg = next_reply(&mut link).await?;
        if let Some([Item::Str(b"message"), _, Item::Str(payload)]) = msg.items().as_deref() {
            // "<master name> <old ip> <old port> <new ip> <new port>"
            if payload.split(|b| *b == b' ').next() == Some(cfg.master_name.as_bytes()) {
                info!(event = %String::from_utf8_lossy(payload), "sentinel: +switch-master");
                switched.notify_one();
            }
        }
    }
}

/// Subscribe to `+switch-master` and wake the poller on each event for our master.
async fn watch_switch(
    cfg: SentinelConfig,
    settings: Arc<ArcSwap<ProbeSettings>>,
    switched: Arc<Notify>,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let tls = tls_for(&cfg, &settings);
        tokio::select! {
            r = switch_session(&cfg, tls.as_deref(), &switched, timeout) => {
                if let Err(e) = r {
                    warn!(error = %e, "sentinel +switch-master subscription lost; retrying");
                }
            }
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(timeout) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
