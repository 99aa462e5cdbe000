//! Metric names (Prometheus conventions, prefix `portcullis_`) and pre-registered handles
//! for the hot path. Labels are low-cardinality: never keys or client addresses.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

/// Open client connections.
pub const CLIENT_CONNECTIONS: &str = "portcullis_client_connections";
/// Client connections accepted since start.
pub const CLIENT_CONNECTIONS_TOTAL: &str = "portcullis_client_connections_total";
/// Connections refused at accept (label `reason`: max_clients, protected_mode).
pub const REJECTED_CONNECTIONS_TOTAL: &str = "portcullis_rejected_connections_total";
/// Commands by outcome (label `outcome`: forwarded, refused, local, unknown).
pub const COMMANDS_TOTAL: &str = "portcullis_commands_total";
/// Refused commands by command name (label `command`: a known command name or `unknown`).
pub const REFUSED_COMMANDS_TOTAL: &str = "portcullis_refused_commands_total";
/// Client connections closed for a protocol error (label `reason`).
pub const PROTOCOL_ERRORS_TOTAL: &str = "portcullis_protocol_errors_total";
/// Failed backend connects (label `backend`).
pub const BACKEND_CONNECT_ERRORS_TOTAL: &str = "portcullis_backend_connect_errors_total";
/// Backend connections lost with requests in flight (label `backend`).
pub const BACKEND_LOST_TOTAL: &str = "portcullis_backend_connections_lost_total";
/// Bytes read from clients.
pub const CLIENT_BYTES_IN_TOTAL: &str = "portcullis_client_received_bytes_total";
/// Forwarded request latency, seconds.
pub const REQUEST_DURATION_SECONDS: &str = "portcullis_request_duration_seconds";
/// Bytes written to clients.
pub const CLIENT_BYTES_OUT_TOTAL: &str = "portcullis_client_sent_bytes_total";

/// Writes answered `-MASTERDOWN` (no confirmed master).
pub const NO_MASTER_ERRORS_TOTAL: &str = "portcullis_no_master_errors_total";
/// Writes retried on the confirmed master after `-READONLY`.
pub const READONLY_RETRIES_TOTAL: &str = "portcullis_readonly_retries_total";
/// Failed AUTH at the proxy.
pub const AUTH_FAILURES_TOTAL: &str = "portcullis_auth_failures_total";
/// Failed TLS handshakes (label `side`: client, backend).
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "portcullis_tls_handshake_failures_total";
/// Config reloads (label `result`: ok, rejected).
pub const CONFIG_RELOADS_TOTAL: &str = "portcullis_config_reloads_total";
/// A backend's state (labels `backend`, `state`: confirmed, busy, slow, down, contradicted,
/// unprobed), 1 for the current one.
pub const BACKEND_STATE: &str = "portcullis_backend_state";
/// Changes of a backend's state (labels `backend`, `from`, `to`).
pub const BACKEND_STATE_CHANGES_TOTAL: &str = "portcullis_backend_state_changes_total";
/// Seconds since a backend's last sign of life (label `backend`).
pub const BACKEND_SILENCE_SECONDS: &str = "portcullis_backend_silence_seconds";

/// `portcullis_backend_unexpected_replicas`.
pub const BACKEND_UNEXPECTED_REPLICAS: &str = "portcullis_backend_unexpected_replicas";
/// `portcullis_cluster_redirects_total`.
pub const CLUSTER_REDIRECTS_TOTAL: &str = "portcullis_cluster_redirects_total";
/// `portcullis_cluster_slot_map_epoch`.
pub const CLUSTER_SLOT_MAP_EPOCH: &str = "portcullis_cluster_slot_map_epoch";
/// `portcullis_cluster_slots_covered`.
pub const CLUSTER_SLOTS_COVERED: &str = "portcullis_cluster_slots_covered";
/// `portcullis_cluster_slots_mapped`.
pub const CLUSTER_SLOTS_MAPPED: &str = "portcullis_cluster_slots_mapped";
/// `portcullis_hidden_request_errors_total`.
pub const HIDDEN_REQUEST_ERRORS_TOTAL: &str = "portcullis_hidden_request_errors_total";
/// `portcullis_unexpected_replica_detections_total`.
pub const UNEXPECTED_REPLICA_DETECTIONS_TOTAL: &str =
    "portcullis_unexpected_replica_detections_total";

/// Batches of sends submitted through io_uring (`src/uring.rs`).
pub const URING_SUBMISSIONS_TOTAL: &str = "portcullis_uring_submissions_total";
/// Sends those batches carried (sends per submission: how much the batching gathers).
pub const URING_SENDS_TOTAL: &str = "portcullis_uring_sends_total";

/// Copy the batched-send totals into the registry (at each scrape: the sends themselves
/// only bump two plain atomics).
pub fn uring_totals() {
    let (submissions, sends) = crate::uring::totals();
    counter!(URING_SUBMISSIONS_TOTAL).absolute(submissions);
    counter!(URING_SENDS_TOTAL).absolute(sends);
}

/// Command classes for `commands_total{class}`, from Redis's own flags.
pub const CLASSES: [&str; 3] = ["write", "read", "other"];

/// Index into `CLASSES`: write (WRITE flag), read (READONLY), other (admin, connection,
/// pub/sub, scripting, ...).
pub fn class_of(spec: &crate::command::CommandSpec) -> usize {
    if spec.is_write() {
        0
    } else if spec.is_readonly() {
        1
    } else {
        2
    }
}

/// Handles for the counters touched per command or per read, registered once.
#[derive(Clone)]
pub struct Hot {
    pub connections: Gauge,
    pub connections_total: Counter,
    /// By class (`CLASSES` order).
    pub forwarded: [Counter; 3],
    /// By class (`CLASSES` order).
    pub refused: [Counter; 3],
    pub local: Counter,
    pub unknown: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// Forwarded request → its reply read from the backend (one clock read per read
    /// batch each side, not per command); includes blocking commands' wait.
    pub request_duration: Histogram,
}

impl Hot {
    /// Register the handles with the installed recorder (a no-op recorder if none).
    pub fn register() -> Hot {
        Hot {
            connections: gauge!(CLIENT_CONNECTIONS),
            connections_total: counter!(CLIENT_CONNECTIONS_TOTAL),
            forwarded: CLASSES
                .map(|c| counter!(COMMANDS_TOTAL, "class" => c, "outcome" => "forwarded")),
            refused: CLASSES
                .map(|c| counter!(COMMANDS_TOTAL, "class" => c, "outcome" => "refused")),
            local: counter!(COMMANDS_TOTAL, "outcome" => "local"),
            unknown: counter!(COMMANDS_TOTAL, "outcome" => "unknown"),
            bytes_in: counter!(CLIENT_BYTES_IN_TOTAL),
            bytes_out: counter!(CLIENT_BYTES_OUT_TOTAL),
            request_duration: histogram!(REQUEST_DURATION_SECONDS),
        }
    }
}

/// Count one refused command under its (table) name.
pub fn refused_command(command: &'static str) {
    counter!(REFUSED_COMMANDS_TOTAL, "command" => command).increment(1);
}

/// Count one command that enforcement would have refused but shadow mode forwarded
/// (`refused_commands_total{command, mode="shadow"}`).
pub fn shadow_refusal(command: &'static str) {
    counter!(REFUSED_COMMANDS_TOTAL, "command" => command, "mode" => "shadow").increment(1);
}

/// Count a protocol error that closed a client connection.
pub fn protocol_error(reason: &'static str) {
    counter!(PROTOCOL_ERRORS_TOTAL, "reason" => reason).increment(1);
}

/// Count a connection refused at accept.
pub fn rejected_connection(reason: &'static str) {
    counter!(REJECTED_CONNECTIONS_TOTAL, "reason" => reason).increment(1);
}

/// Count a failed backend connect.
pub fn backend_connect_error(backend: &str) {
    counter!(BACKEND_CONNECT_ERRORS_TOTAL, "backend" => backend.to_string()).increment(1);
}

/// Count a backend connection lost under a session.
pub fn backend_lost(backend: &str) {
    counter!(BACKEND_LOST_TOTAL, "backend" => backend.to_string()).increment(1);
}

/// Count a write answered `-MASTERDOWN` (no confirmed master).
pub fn no_master() {
    counter!(NO_MASTER_ERRORS_TOTAL).increment(1);
}

/// Count a write retried on the confirmed master after `-READONLY`.
pub fn readonly_retry() {
    counter!(READONLY_RETRIES_TOTAL).increment(1);
}

/// Count a cluster redirect (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `READONLY`) a node
/// answered, by node and kind; the proxy retried it and the client never saw it.
pub fn cluster_redirect(node: &str, kind: &'static str) {
    counter!(CLUSTER_REDIRECTS_TOTAL, "node" => node.to_string(), "kind" => kind).increment(1);
}

/// Publish the slot map's version (highest master config epoch) and the slots it covers.
pub fn cluster_map(epoch: u64, slots: usize) {
    gauge!(CLUSTER_SLOT_MAP_EPOCH).set(epoch as f64);
    gauge!(CLUSTER_SLOTS_MAPPED).set(slots as f64);
}

/// A request the proxy added on its own (`what`: the WAIT offset bump, ASKING, a script
/// load) got an error (an ACL without its permission, OOM, an old server): counted, and
/// logged at WARN the first time in the process (then at DEBUG), since no client sees it.
pub fn hidden_request_failed(what: &'static str, peer: &std::net::SocketAddr) {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    counter!(HIDDEN_REQUEST_ERRORS_TOTAL, "request" => what).increment(1);
    if !LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(%peer, request = what, "a request the proxy adds on its own was refused (check the backend user's permissions; further refusals are counted in portcullis_hidden_request_errors_total)");
    } else {
        tracing::debug!(%peer, request = what, "a request the proxy adds on its own was refused");
    }
}

/// Count a replica outside the slot map found in a cluster master's `ROLE` (labelled by
/// master only: the replica's address comes from the backend, so it stays in the log
/// line, not in a label whose values a stranger could multiply).
pub fn unexpected_replica(master: &str) {
    counter!(UNEXPECTED_REPLICA_DETECTIONS_TOTAL, "backend" => master.to_string()).increment(1);
}

/// Publish how many replicas outside the slot map a cluster master feeds now.
pub fn unexpected_replicas(master: &str, n: usize) {
    gauge!(BACKEND_UNEXPECTED_REPLICAS, "backend" => master.to_string()).set(n as f64);
}

/// Publish the slots served by a confirmed master (16384 when the proxy is ready).
pub fn cluster_slots_covered(slots: usize) {
    gauge!(CLUSTER_SLOTS_COVERED).set(slots as f64);
}

/// Count a failed AUTH at the proxy.
pub fn auth_failure() {
    counter!(AUTH_FAILURES_TOTAL).increment(1);
}

/// A TLS handshake failed (`side`: client or backend).
pub fn tls_handshake_failure(side: &'static str) {
    counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "side" => side).increment(1);
}

/// Count a config reload (`ok`: applied; else rejected).
pub fn config_reload(ok: bool) {
    let result = if ok { "ok" } else { "rejected" };
    counter!(CONFIG_RELOADS_TOTAL, "result" => result).increment(1);
}

/// A backend's standing changed: `portcullis_backend_state{state}` is 1 for the new one,
/// 0 for the others, and the change is counted.
pub fn backend_standing(backend: &str, from: &'static str, to: &'static str) {
    for s in crate::backend::Standing::ALL {
        gauge!(BACKEND_STATE, "backend" => backend.to_string(), "state" => s.name())
            .set(if s.name() == to { 1.0 } else { 0.0 });
    }
    counter!(BACKEND_STATE_CHANGES_TOTAL, "backend" => backend.to_string(), "from" => from, "to" => to)
        .increment(1);
}

/// Seconds since the backend last gave a sign of life (a probe answer, a session reply).
pub fn backend_silence(backend: &str, seconds: f64) {
    gauge!(BACKEND_SILENCE_SECONDS, "backend" => backend.to_string()).set(seconds);
}
