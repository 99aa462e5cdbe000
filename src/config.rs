//! Typed configuration: the TOML file, overridden by CLI flags and `PORTCULLIS_*` env vars
//! (see `cli.rs`), validated once into an immutable `Config`. Defaults are named constants
//! next to their meaning. Must not do I/O beyond reading the file it is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::policy::ProtectionConfig;

/// Data port when nothing is configured: next to Redis's 6379, loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6380";
/// Admin HTTP port (metrics, health).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9190";
/// Redis's `proto-max-bulk-len`.
pub const DEFAULT_MAX_BULK_LEN: usize = crate::protocol::PROTO_MAX_BULK_LEN;
/// Redis 7's multibulk count bound (INT_MAX).
pub const DEFAULT_MAX_MULTIBULK_LEN: usize = i32::MAX as usize;
/// Redis's `PROTO_INLINE_MAX_SIZE`.
pub const DEFAULT_MAX_INLINE_LEN: usize = 64 * 1024;
/// Redis's `maxclients`.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// Requests a session may have in flight before it stops reading from its client.
pub const DEFAULT_MAX_PENDING: usize = 4096;
/// Bytes a session buffers in each direction: replies for a slow client before it stops
/// reading its backend, requests for a slow backend before it stops reading its client.
pub const DEFAULT_MAX_REPLY_BUFFER: usize = 8 * 1024 * 1024;
/// Script bodies kept for `-NOSCRIPT` replays (`limits.script_cache`): 8 MiB.
pub const DEFAULT_SCRIPT_CACHE: usize = 8 * 1024 * 1024;
/// How long a backend connect (TCP + AUTH) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deepest reply nesting accepted from a backend: above everything Redis produces
/// (`protocol::reply::DEFAULT_MAX_DEPTH`).
pub const DEFAULT_MAX_REPLY_DEPTH: usize = crate::protocol::reply::DEFAULT_MAX_DEPTH;
/// How long a client may take to complete a request frame it has started (slowloris).
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest non-zero `limits.frame_timeout`: a frame split across TCP segments needs a
/// few round trips, and a shorter bound would cut legitimate clients on slow links.
pub const MIN_FRAME_TIMEOUT: Duration = Duration::from_millis(100);

/// A configuration problem, naming the field and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid value for {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The whole configuration, validated.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Data port clients connect to.
    pub listen: String,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub backends: Vec<BackendConfig>,
    pub limits: Limits,
    pub probe: ProbeConfig,
    pub routing: RoutingConfig,
    pub protection: ProtectionConfig,
    /// Users clients authenticate as; none = no AUTH needed (loopback only unless
    /// `protection.protected_mode = false`).
    pub users: Vec<crate::auth::UserConfig>,
    /// `[auth]`: who checks a client's AUTH (the proxy, or Redis in pass-through).
    pub auth: crate::auth::AuthConfig,
    pub shutdown: ShutdownConfig,
    /// `[runtime]`: how the proxy uses the machine (read at start only).
    pub runtime: RuntimeConfig,
    /// Sentinel mode: the master (and replicas) come from Sentinel, still confirmed by ROLE.
    pub sentinel: Option<SentinelConfig>,
    /// Redis Cluster mode: the slot map comes from the cluster's nodes, each shard's master
    /// still confirmed by its own ROLE probe. Exclusive with `[[backends]]` and Sentinel.
    pub cluster: Option<ClusterConfig>,
    /// TLS for clients: when set, `listen` accepts TLS connections only.
    pub tls: Option<TlsConfig>,
    /// TLS to the backends (managed Redis with in-transit encryption).
    pub backend_tls: Option<BackendTlsConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.to_string(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            backends: Vec::new(),
            limits: Limits::default(),
            probe: ProbeConfig::default(),
            routing: RoutingConfig::default(),
            protection: ProtectionConfig::default(),
            users: Vec::new(),
            auth: crate::auth::AuthConfig::default(),
            shutdown: ShutdownConfig::default(),
            runtime: RuntimeConfig::default(),
            sentinel: None,
            cluster: None,
            tls: None,
            backend_tls: None,
        }
    }
}

/// How long a client's TLS handshake may take before the connection is closed.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tls]`: the proxy's server certificate, and optionally client-certificate checks.
/// Files are PEM and read at start and on every reload (certificate rotation).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default = "default_tls_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn default_tls_handshake_timeout() -> Duration {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT
}

/// `[backend_tls]`: how the proxy's backend connections (sessions and probes) verify and
/// identify themselves. Sentinel connections use it when `sentinel.tls` is set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// CA certificates that sign the backends' certificates (PEM; a system bundle such as
    /// /etc/ssl/certs/ca-certificates.crt works for public CAs).
    pub ca: PathBuf,
    /// Name sent as SNI and verified in the backend's certificate, for every backend.
    /// Default: the host part of each backend's address (an IP is checked against the
    /// certificate's IP addresses).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate chain, for backends that require one (with `key`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// How often each backend's role is probed.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long one ROLE probe may take.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a master may stay silent (probes time out, nothing answers) before it counts
/// as down. Longer than the stalls Redis has in normal operation (a 4 s `CLIENT PAUSE`, a
/// 3 s `DEBUG SLEEP`, a fork during BGSAVE, a 3 s SIGSTOP), shorter than Sentinel's 30 s.
pub const DEFAULT_PROBE_DOWN_AFTER: Duration = Duration::from_secs(10);
/// How long a write waits for a confirmed master before `-MASTERDOWN`.
pub const DEFAULT_FAILOVER_WAIT: Duration = Duration::from_secs(2);

/// `[probe]`: role probing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Time between two ROLE probes of one backend.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Bound on one probe (connect + ROLE).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A master probe older than this no longer confirms it (default: 2 × interval + timeout).
    #[serde(with = "humantime_serde::option")]
    pub staleness: Option<Duration>,
    /// A backend that gives no sign of life (probe timeouts, no reply to sessions) for this
    /// long is down; until then its last known role holds (default: 10 s, at least
    /// `staleness`). Evidence (a refused connection, ROLE naming another role) acts at once.
    #[serde(with = "humantime_serde::option")]
    pub down_after: Option<Duration>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: DEFAULT_PROBE_INTERVAL,
            timeout: DEFAULT_PROBE_TIMEOUT,
            staleness: None,
            down_after: None,
        }
    }
}

impl ProbeConfig {
    /// The staleness bound in effect.
    pub fn staleness(&self) -> Duration {
        self.staleness.unwrap_or(self.interval * 2 + self.timeout)
    }

    /// The silence bound in effect: `down_after`, or the default (never below staleness).
    pub fn down_after(&self) -> Duration {
        self.down_after
            .unwrap_or_else(|| DEFAULT_PROBE_DOWN_AFTER.max(self.staleness()))
    }
}

/// `[routing]`: where commands go.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// How long a write waits for a confirmed master (no master, or after READONLY).
    #[serde(with = "humantime_serde")]
    pub failover_wait: Duration,
    /// Where reads go.
    pub reads: ReadPolicy,
    /// How sessions reach the master: a connection of their own, or a few connections
    /// per backend shared by every session without connection state.
    pub backend_connections: BackendConnections,
    /// `shared` mode: connections per backend that stateless commands share.
    pub shared_connections: usize,
}

/// Most `routing.shared_connections`.
pub const MAX_SHARED_CONNECTIONS: usize = 64;

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            failover_wait: DEFAULT_FAILOVER_WAIT,
            reads: ReadPolicy::Master,
            backend_connections: BackendConnections::Dedicated,
            shared_connections: 2,
        }
    }
}

/// `routing.backend_connections`: how sessions reach the master.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendConnections {
    /// One master connection per client session (Redis sees every client as its own
    /// connection).
    Dedicated,
    /// Commands of sessions without connection state share `shared_connections` per
    /// backend, written together and answered in order; a session with state (MULTI,
    /// WATCH, pub/sub, blocking commands, tracking, MONITOR, a db other than 0, RESP3,
    /// a name or library info, pass-through credentials) uses a connection of its own
    /// until that state ends.
    Shared,
}

/// `routing.reads`: where read-only commands go.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ReadPolicy {
    /// Everything to the confirmed master (consistent reads).
    Master,
    /// Reads to a healthy replica of the confirmed master, the master when there is none.
    PreferReplica,
    /// Reads only to replicas; `-MASTERDOWN` when none is healthy.
    Replica,
}

/// How long in-flight requests may take after SIGTERM (below ECS's 30 s stop timeout).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// `[sentinel]`: follow a Sentinel-managed master.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// Sentinel `host:port`s, tried in order.
    pub addresses: Vec<String>,
    /// The monitored master's name (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// Credentials for the Sentinels themselves.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Credentials for the data nodes Sentinel reports.
    #[serde(default)]
    pub backend_username: Option<String>,
    #[serde(default)]
    pub backend_password: Option<String>,
    /// Connect to the Sentinels with TLS, using `[backend_tls]` (its CA and client
    /// certificate; each Sentinel address's host, or `backend_tls.server_name`, is the
    /// name verified).
    #[serde(default)]
    pub tls: bool,
}

impl std::fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |p: &Option<String>| p.as_ref().map(|_| "<redacted>");
        f.debug_struct("SentinelConfig")
            .field("addresses", &self.addresses)
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &redact(&self.password))
            .field("backend_username", &self.backend_username)
            .field("backend_password", &redact(&self.backend_password))
            .field("tls", &self.tls)
            .finish()
    }
}

/// How often the slot map is re-read when nothing asks for it sooner.
pub const DEFAULT_CLUSTER_REFRESH: Duration = Duration::from_secs(5);

/// `[cluster]`: serve a Redis Cluster (or Valkey cluster) behind one endpoint.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port`s of some nodes; the rest are learned from the slot map.
    pub seeds: Vec<String>,
    /// How often the slot map is re-read (at once, too, after a redirect).
    #[serde(default = "default_cluster_refresh", with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// ACL user the proxy authenticates as on every node; none = `default`.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for every node; never shown to clients or logged.
    #[serde(default)]
    pub password: Option<String>,
}

fn default_cluster_refresh() -> Duration {
    DEFAULT_CLUSTER_REFRESH
}

impl ClusterConfig {
    /// The backend settings of a node at `address` (credentials shared by every node).
    pub fn node(&self, address: String) -> BackendConfig {
        BackendConfig {
            address,
            name: None,
            username: self.username.clone(),
            password: self.password.clone(),
        }
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("seeds", &self.seeds)
            .field("refresh_interval", &self.refresh_interval)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `[shutdown]`: draining.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT: stop accepting, let in-flight requests finish for this long.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// `[runtime]`: how the proxy uses the machine. Read at start; a reload keeps the
/// running values.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Batched sends through io_uring on the single-threaded runtime (`src/uring.rs`).
    pub io_uring: IoUringMode,
}

/// `runtime.io_uring`: whether small writes of all connections go to the kernel together.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoUringMode {
    /// On when the proxy runs one thread (one CPU) and the kernel allows io_uring;
    /// otherwise writes are direct.
    #[default]
    Auto,
    /// Every write is a direct `send`/`writev`.
    Off,
}

/// Admin HTTP listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`; empty string disables it.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: DEFAULT_ADMIN_LISTEN.to_string(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One Redis backend.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `host:port` of the Redis server.
    pub address: String,
    /// Label in logs and metrics; defaults to the address.
    #[serde(default)]
    pub name: Option<String>,
    /// ACL user the proxy authenticates as (Redis 6+); none = `default`.
    #[serde(default)]
    pub username: Option<String>,
    /// Password the proxy authenticates with; never shown to clients or logged.
    #[serde(default)]
    pub password: Option<String>,
}

impl BackendConfig {
    /// A backend with only an address.
    pub fn from_address(address: impl Into<String>) -> Self {
        BackendConfig {
            address: address.into(),
            name: None,
            username: None,
            password: None,
        }
    }

    /// The label used in logs and metrics.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.address)
    }
}

// Hand-written so the password never lands in a log line.
impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("address", &self.address)
            .field("name", &self.name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Input, connection and buffer bounds. Defaults mirror Redis's.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest bulk string a client may send (Redis `proto-max-bulk-len`).
    pub max_bulk_len: usize,
    /// Most elements in one request array.
    pub max_multibulk_len: usize,
    /// Longest inline command line.
    pub max_inline_len: usize,
    /// Concurrent client connections; more get `-ERR max number of clients reached`.
    pub max_clients: usize,
    /// Requests in flight per session before the proxy stops reading that client.
    pub max_pending: usize,
    /// Reply bytes buffered per session before the proxy stops reading its backend; also
    /// the bound on request bytes waiting for a slow backend before it stops reading the
    /// client.
    pub max_reply_buffer: usize,
    /// Close a client idle this long (`0s` = never, Redis's `timeout 0`).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Close a client that started a request frame and did not complete it within this
    /// long (`0s` = never). The idle timeout cannot catch a client that sends one byte
    /// every few seconds; this does.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// Backend connect + authentication bound.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deepest reply nesting accepted from a backend.
    pub max_reply_depth: usize,
    /// Bytes of script bodies (SCRIPT LOAD, EVAL) the proxy keeps to load them again on a
    /// server that answers `-NOSCRIPT` (a promoted replica); 0 keeps none.
    pub script_cache: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: DEFAULT_MAX_BULK_LEN,
            max_multibulk_len: DEFAULT_MAX_MULTIBULK_LEN,
            max_inline_len: DEFAULT_MAX_INLINE_LEN,
            max_clients: DEFAULT_MAX_CLIENTS,
            max_pending: DEFAULT_MAX_PENDING,
            max_reply_buffer: DEFAULT_MAX_REPLY_BUFFER,
            idle_timeout: Duration::ZERO,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_reply_depth: DEFAULT_MAX_REPLY_DEPTH,
            script_cache: DEFAULT_SCRIPT_CACHE,
        }
    }
}

impl Config {
    /// Parse TOML text (no validation).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Read and parse a TOML file (no validation).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Check every field; the first problem found is returned, naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("listen", &self.listen)?;
        if !self.admin.listen.is_empty() {
            parse_addr("admin.listen", &self.admin.listen)?;
        }
        if let Some(s) = &self.sentinel {
            if s.addresses.is_empty() {
                return Err(invalid(
                    "sentinel.addresses",
                    "at least one Sentinel is required",
                ));
            }
            for (i, a) in s.addresses.iter().enumerate() {
                check_host_port(&format!("sentinel.addresses[{i}]"), a)?;
            }
            if s.master_name.is_empty() {
                return Err(invalid("sentinel.master_name", "must not be empty"));
            }
            if s.tls && self.backend_tls.is_none() {
                return Err(invalid(
                    "sentinel.tls",
                    "needs a [backend_tls] section (its CA verifies the Sentinels)",
                ));
            }
        }
        if let Some(c) = &self.cluster {
            if !self.backends.is_empty() || self.sentinel.is_some() {
                return Err(invalid(
                    "cluster",
                    "[cluster] replaces [[backends]] and [sentinel]: the nodes come from the cluster's slot map",
                ));
            }
            if c.seeds.is_empty() {
                return Err(invalid("cluster.seeds", "at least one node is required"));
            }
            for (i, a) in c.seeds.iter().enumerate() {
                check_host_port(&format!("cluster.seeds[{i}]"), a)?;
            }
            if c.refresh_interval.is_zero() {
                return Err(invalid(
                    "cluster.refresh_interval",
                    "must be greater than 0",
                ));
            }
            if c.username.is_some() && c.password.is_none() {
                return Err(invalid("cluster.password", "a username needs a password"));
            }
            if self.routing.reads != ReadPolicy::Master {
                return Err(invalid(
                    "routing.reads",
                    "cluster mode reads from each slot's master only (replica reads are not supported yet)",
                ));
            }
        }
        if self.backends.is_empty() && self.sentinel.is_none() && self.cluster.is_none() {
            return Err(invalid(
                "backends",
                "at least one backend is required (--backend HOST:PORT or [[backends]])",
            ));
        }
        for (i, b) in self.backends.iter().enumerate() {
            let field = format!("backends[{i}].address");
            check_host_port(&field, &b.address)?;
            if b.username.is_some() && b.password.is_none() {
                return Err(invalid(
                    format!("backends[{i}].password"),
                    "a username needs a password",
                ));
            }
        }
        let l = &self.limits;
        if !(1..=DEFAULT_MAX_BULK_LEN).contains(&l.max_bulk_len) {
            return Err(invalid(
                "limits.max_bulk_len",
                format!("must be between 1 and {DEFAULT_MAX_BULK_LEN}"),
            ));
        }
        if !(1..=DEFAULT_MAX_MULTIBULK_LEN).contains(&l.max_multibulk_len) {
            return Err(invalid(
                "limits.max_multibulk_len",
                format!("must be between 1 and {DEFAULT_MAX_MULTIBULK_LEN}"),
            ));
        }
        if !(16..=DEFAULT_MAX_BULK_LEN).contains(&l.max_inline_len) {
            return Err(invalid(
                "limits.max_inline_len",
                "must be between 16 and 536870912",
            ));
        }
        if !(1..=MAX_SHARED_CONNECTIONS).contains(&self.routing.shared_connections) {
            return Err(invalid(
                "routing.shared_connections",
                format!("must be between 1 and {MAX_SHARED_CONNECTIONS}"),
            ));
        }
        for (field, v) in [
            ("limits.max_clients", l.max_clients),
            ("limits.max_pending", l.max_pending),
            ("limits.max_reply_buffer", l.max_reply_buffer),
            ("limits.max_reply_depth", l.max_reply_depth),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        for (field, d) in [
            ("probe.interval", self.probe.interval),
            ("probe.timeout", self.probe.timeout),
            ("probe.staleness", self.probe.staleness()),
            ("probe.down_after", self.probe.down_after()),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if self.probe.staleness() < self.probe.interval {
            return Err(invalid(
                "probe.staleness",
                "must be at least probe.interval, or every master would go stale between probes",
            ));
        }
        if self.probe.down_after() < self.probe.staleness() {
            return Err(invalid(
                "probe.down_after",
                "must be at least probe.staleness: a silent master cannot be down before its last probe is stale",
            ));
        }
        crate::policy::Policy::new(&self.protection).map_err(|e| ConfigError::Invalid {
            field: format!("protection.{}", e.list),
            reason: e.to_string(),
        })?;
        crate::auth::Users::new(&self.users, &self.protection).map_err(|e| {
            let text = e.to_string();
            let (field, reason) = text.split_once(": ").unwrap_or(("users", &text));
            invalid(field, reason)
        })?;
        if self.auth.mode == crate::auth::AuthMode::Passthrough && !self.users.is_empty() {
            return Err(invalid(
                "auth.mode",
                "\"passthrough\" sends AUTH to Redis, whose ACL decides; [[users]] at the proxy would never be asked. Remove [[users]] (create them as Redis ACL users) or use mode = \"proxy\"",
            ));
        }
        if l.connect_timeout.is_zero() {
            return Err(invalid("limits.connect_timeout", "must be greater than 0"));
        }
        if !l.frame_timeout.is_zero() && l.frame_timeout < MIN_FRAME_TIMEOUT {
            return Err(invalid(
                "limits.frame_timeout",
                "must be 0s (never) or at least 100ms",
            ));
        }
        if let Some(t) = &self.tls {
            if t.handshake_timeout.is_zero() {
                return Err(invalid("tls.handshake_timeout", "must be greater than 0"));
            }
        }
        if let Some(t) = &self.backend_tls {
            if t.cert.is_some() != t.key.is_some() {
                return Err(invalid(
                    "backend_tls.key",
                    "a client certificate needs both cert and key",
                ));
            }
            if let Some(name) = &t.server_name {
                rustls_pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
                    invalid(
                        "backend_tls.server_name",
                        format!("{name:?} is not a DNS name or IP address"),
                    )
                })?;
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }
}

/// Parse a listen address (`ip:port`).
pub fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(field, format!("{s:?} is not an IP:PORT address")))
}

/// Check a backend address: `host:port`, host non-empty, port a number.
fn check_host_port(field: &str, s: &str) -> Result<(), ConfigError> {
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{s:?} is not a HOST:PORT address")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            backends: vec![BackendConfig::from_address("127.0.0.1:6379")],
            ..Config::default()
        }
    }

    #[test]
    fn cluster_section_is_validated() {
        let c = Config::from_toml(
            "[cluster]\nseeds = [\"127.0.0.1:7000\", \"node-b.example:7001\"]\nrefresh_interval = \"2s\"\n",
            "test",
        )
        .unwrap();
        c.validate().unwrap();
        let cluster = c.cluster.clone().unwrap();
        assert_eq!(cluster.refresh_interval, Duration::from_secs(2));
        assert_eq!(cluster.seeds.len(), 2);
        let err = |text: &str| {
            Config::from_toml(text, "test")
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(err("[cluster]\nseeds = []\n").contains("cluster.seeds"));
        assert!(err("[cluster]\nseeds = [\"nope\"]\n").contains("cluster.seeds[0]"));
        assert!(err(
            "[[backends]]\naddress = \"127.0.0.1:6379\"\n[cluster]\nseeds = [\"127.0.0.1:7000\"]\n"
        )
        .contains("replaces [[backends]]"));
        assert!(
            err("[cluster]\nseeds = [\"127.0.0.1:7000\"]\n[routing]\nreads = \"replica\"\n")
                .contains("routing.reads")
        );
        assert!(
            err("[cluster]\nseeds = [\"127.0.0.1:7000\"]\nusername = \"u\"\n")
                .contains("cluster.password")
        );
        // Defaults.
        let c = Config::from_toml("[cluster]\nseeds = [\"127.0.0.1:7000\"]\n", "test").unwrap();
        assert_eq!(c.cluster.unwrap().refresh_interval, DEFAULT_CLUSTER_REFRESH);
    }

    #[test]
    fn defaults_validate_with_a_backend() {
        valid().validate().unwrap();
        assert!(matches!(
            Config::default().validate(),
            Err(ConfigError::Invalid { field, .. }) if field == "backends"
        ));
    }

    #[test]
    fn invalid_fields_are_named() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("listen", Box::new(|c| c.listen = "nope".into())),
            (
                "admin.listen",
                Box::new(|c| c.admin.listen = "1.2.3.4".into()),
            ),
            (
                "backends[0].address",
                Box::new(|c| c.backends[0].address = "localhost".into()),
            ),
            (
                "backends[0].password",
                Box::new(|c| c.backends[0].username = Some("u".into())),
            ),
            (
                "limits.max_bulk_len",
                Box::new(|c| c.limits.max_bulk_len = 0),
            ),
            ("limits.max_clients", Box::new(|c| c.limits.max_clients = 0)),
            (
                "limits.frame_timeout",
                Box::new(|c| c.limits.frame_timeout = Duration::from_millis(5)),
            ),
            (
                "log.level",
                Box::new(|c| c.log.level = "no=such=level".into()),
            ),
            (
                "probe.down_after",
                Box::new(|c| c.probe.down_after = Some(Duration::from_millis(100))),
            ),
            (
                "auth.mode",
                Box::new(|c| {
                    c.auth.mode = crate::auth::AuthMode::Passthrough;
                    c.users = vec![crate::auth::UserConfig {
                        name: "app".into(),
                        password_sha256: "0".repeat(64),
                        allow: vec![],
                        deny: vec![],
                    }];
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = valid();
            mutate(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn frame_timeout_defaults_to_30s_and_0s_disables() {
        assert_eq!(Limits::default().frame_timeout, Duration::from_secs(30));
        let c = Config::from_toml(
            "[[backends]]\naddress = \"r:6379\"\n[limits]\nframe_timeout = \"0s\"\n",
            "t.toml",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.limits.frame_timeout.is_zero());
    }

    #[test]
    fn down_after_defaults_to_10s_and_never_below_staleness() {
        assert_eq!(ProbeConfig::default().down_after(), Duration::from_secs(10));
        let slow = ProbeConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            ..ProbeConfig::default()
        };
        assert_eq!(slow.down_after(), Duration::from_secs(15));
        let c = Config::from_toml(
            "[[backends]]\naddress = \"r:6379\"\n[probe]\ndown_after = \"3s\"\n",
            "t.toml",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.probe.down_after(), Duration::from_secs(3));
    }

    #[test]
    fn toml_unknown_field_is_an_error_naming_it() {
        let err = Config::from_toml("[limits]\nmax_clientz = 3\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("max_clientz"), "{err}");
        let err = Config::from_toml("[limits]\nmax_clients = \"x\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("max_clients"), "{err}");
    }

    #[test]
    fn toml_full_example() {
        let c = Config::from_toml(
            r#"
            listen = "0.0.0.0:6380"
            [admin]
            listen = ""
            [log]
            level = "debug"
            format = "json"
            [[backends]]
            address = "redis:6379"
            name = "primary"
            username = "portcullis"
            password = "s3cret"
            [auth]
            mode = "passthrough"
            [limits]
            idle_timeout = "5m"
            frame_timeout = "10s"
            connect_timeout = "500ms"
            "#,
            "t.toml",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.frame_timeout, Duration::from_secs(10));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.backends[0].label(), "primary");
        assert_eq!(c.auth.mode, crate::auth::AuthMode::Passthrough);
        assert_eq!(Config::default().auth.mode, crate::auth::AuthMode::Proxy);
        assert!(Config::from_toml("[auth]\nmode = \"redis\"\n", "t.toml").is_err());
        assert!(!format!("{:?}", c.backends[0]).contains("s3cret"));
    }
}
