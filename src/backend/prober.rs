//! One prober per backend: its own connection, `ROLE` every interval (or at once when a
//! session saw `-READONLY`), results published to the topology store. Detects hijacks (a
//! replica of a master outside the configured set) and, when enabled, heals them with
//! `REPLICAOF` on its own connection. In pass-through mode it also checks, on a second
//! connection that never authenticates, whether the backend requires a password (protected
//! mode counts that as authentication). Never touches client traffic.
//!
//! A failed probe is classified (`Evidence`): a timeout is silence (the last known role
//! holds, the connection is dropped and the next probe opens a fresh one, so a stuck
//! connection never stops probing), `-BUSY`/`-LOADING` prove life (the connection is
//! kept), anything else (refused, reset, a refused handshake) is evidence: down at once.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::{counter, gauge, histogram};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backend::topology::{Evidence, Role, Stall, Standing, TopologyStore};
use crate::backend::{BackendError, BackendLink, Handshake, LinkAuth, ReadReplyError};
use crate::catalog::Catalog;
use crate::config::BackendConfig;
use crate::protocol::{Item, Reply, ReplyLimits, Request};
use crate::tls::BackendTls;

/// Probe settings.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub auto_heal: bool,
    pub reply_limits: ReplyLimits,
    /// `[backend_tls]`: probes connect the way sessions do.
    pub tls: Option<Arc<BackendTls>>,
    /// Pass-through mode: also check whether the backend requires a password.
    pub check_auth: bool,
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Read(#[from] ReadReplyError),
    #[error("unexpected ROLE reply: {0}")]
    Unexpected(String),
    #[error("ROLE answered {0}")]
    Busy(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl ProbeError {
    /// What this failure says about the backend.
    fn evidence(&self) -> Evidence {
        match self {
            ProbeError::Timeout(_) => Evidence::Silence(self.to_string()),
            ProbeError::Busy(_) => Evidence::Alive(self.to_string()),
            ProbeError::Backend(e) => e.evidence(),
            _ => Evidence::Down(self.to_string()),
        }
    }
}

/// How long reading a backend's `COMMAND` metadata may take (a few hundred KB with
/// modules), at least.
const LEARN_TIMEOUT: Duration = Duration::from_secs(2);

/// Run the prober for backend `index` until shutdown.
pub async fn run(
    index: usize,
    backend: BackendConfig,
    store: Arc<TopologyStore>,
    shared_settings: Arc<ArcSwap<ProbeSettings>>,
    shutdown: CancellationToken,
) {
    let label = backend.label().to_string();
    let mut backend = backend;
    resolve_aliases(index, &backend, &store).await;
    let mut conn: Option<BackendLink> = None;
    // Pass-through: the never-authenticated connection for `requires_auth`.
    let mut anon: Option<BackendLink> = None;
    let mut last_role: Option<&'static str> = None;
    // The role gauges were zeroed by a failed probe and must be set again.
    let mut gauges_unknown = true;
    let mut was_hijacked = false;
    // The server (INFO run_id) whose metadata was last read: a reconnect to the same
    // server does not rebuild the catalog; a restart or another server does.
    let mut learned_run_id: Option<String> = None;
    loop {
        // A reload may change the settings, this backend's credentials, or remove it.
        let settings = shared_settings.load_full();
        match store.load().backends.get(index) {
            Some(b) if b.retired => {
                info!(backend = %label, "backend removed from the configuration; prober stops");
                set_role_gauges(&label, None);
                return;
            }
            Some(b) if b.config != backend => {
                backend = b.config.clone();
                conn = None;
                anon = None;
            }
            _ => {}
        }
        let started = Instant::now();
        // A new connection also reads the command metadata: allow for its size.
        let timeout = if conn.is_none() {
            settings.timeout.max(LEARN_TIMEOUT)
        } else {
            settings.timeout
        };
        let result =
            match tokio::time::timeout(timeout, probe(&mut conn, &backend, &settings)).await {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout(timeout)),
            };
        let result = result.map(|(role, replicas, metadata)| {
            if let Some(m) = metadata {
                learn(index, &label, &store, m, &mut learned_run_id);
            }
            (role, replicas)
        });
        histogram!("portcullis_probe_duration_seconds", "backend" => label.clone())
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok((role, replicas)) => {
                let requires_auth = if settings.check_auth {
                    check_requires_auth(&mut anon, &backend, &settings).await
                } else {
                    None
                };
                let known = store
                    .load()
                    .backends
                    .get(index)
                    .and_then(|b| b.requires_auth);
                if requires_auth.is_some() && requires_auth != known {
                    info!(backend = %label, requires_password = requires_auth, "pass-through: backend password requirement");
                }
                let now = Instant::now();
                let foreign = match &role {
                    Role::Replica {
                        master_host,
                        master_port,
                        ..
                    } => !store
                        .load()
                        .backends
                        .iter()
                        .any(|b| b.is(master_host, *master_port)),
                    _ => false,
                };
                let name = role.name();
                if last_role != Some(name) {
                    if let Some(from) = last_role {
                        warn!(backend = %label, from, to = name, role = %role, "backend role changed");
                        counter!("portcullis_role_changes_total", "backend" => label.clone(), "from" => from, "to" => name).increment(1);
                    } else {
                        info!(backend = %label, role = %role, "backend role");
                    }
                    last_role = Some(name);
                    gauges_unknown = true;
                }
                if gauges_unknown {
                    set_role_gauges(&label, Some(name));
                    gauges_unknown = false;
                }
                if foreign && !was_hijacked {
                    if let Role::Replica {
                        master_host,
                        master_port,
                        link,
                    } = &role
                    {
                        error!(backend = %label, foreign_master = %format!("{master_host}:{master_port}"), link = %link,
                            "HIJACK: backend replicates from a master outside the configured backends; excluded from routing");
                    }
                    counter!("portcullis_hijack_detections_total", "backend" => label.clone())
                        .increment(1);
                }
                was_hijacked = foreign;
                gauge!("portcullis_backend_hijacked", "backend" => label.clone()).set(if foreign {
                    1.0
                } else {
                    0.0
                });
                store.update(index, |b| {
                    b.role = Some(role.clone());
                    b.probed_at = Some(now);
                    b.alive_at = Some(now);
                    b.error = None;
                    b.stall = None;
                    b.readonly_seen = false;
                    b.contradiction = None;
                    b.hijacked = foreign;
                    b.replicas.clone_from(&replicas);
                    if requires_auth.is_some() {
                        b.requires_auth = requires_auth;
                    }
                });
                if foreign && settings.auto_heal {
                    if let Some(c) = conn.as_mut() {
                        heal(index, &label, c, &store).await;
                        // Probe again at once to confirm the healed role.
                        continue;
                    }
                }
            }
            Err(e) => {
                counter!("portcullis_probe_failures_total", "backend" => label.clone())
                    .increment(1);
                let now = Instant::now();
                match e.evidence() {
                    Evidence::Down(why) => {
                        conn = None;
                        store.update(index, |b| {
                            b.error = Some(why.clone());
                            b.evidence_at = Some(now);
                            b.stall = None;
                        });
                        // An unreachable backend has no role anyone should alert on as current.
                        set_role_gauges(&label, None);
                        gauges_unknown = true;
                    }
                    evidence => {
                        let (busy, why) = match evidence {
                            Evidence::Alive(why) => (true, why),
                            Evidence::Silence(why) | Evidence::Down(why) => (false, why),
                        };
                        if !busy {
                            // A timed-out connection may still deliver the late reply: a
                            // fresh one next time keeps replies and probes paired.
                            conn = None;
                        }
                        let bounds = store.load().bounds();
                        store.update(index, |b| {
                            let since = match &b.stall {
                                Some(s) if s.busy == busy => s.since,
                                _ => now,
                            };
                            b.stall = Some(Stall {
                                busy,
                                evidence: why.clone(),
                                since,
                            });
                            if busy {
                                b.alive_at = Some(now);
                            }
                            // Silent past the bound: down until a probe succeeds again (a
                            // late reply to a session does not bring it back unprobed).
                            if b.error.is_none() && b.standing(now, bounds) == Standing::Down {
                                let (silence, at) = b.evidence(now, bounds);
                                b.error = Some(silence);
                                b.evidence_at = at;
                            }
                        });
                    }
                }
            }
        }
        if let Some(b) = store.load().backends.get(index) {
            let silent = b.last_alive().map_or(0.0, |t| {
                Instant::now().saturating_duration_since(t).as_secs_f64()
            });
            crate::metrics::backend_silence(&label, silent);
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = store.probe_requested(index) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// `portcullis_backend_role{role}`: 1 for the current role, 0 for the others (all 0 while
/// probes fail).
fn set_role_gauges(label: &str, role: Option<&str>) {
    for r in ["master", "replica", "sentinel"] {
        gauge!("portcullis_backend_role", "backend" => label.to_string(), "role" => r)
            .set(if Some(r) == role { 1.0 } else { 0.0 });
    }
}

/// One ROLE round trip (connecting first when needed): the role, and a master's
/// replicas.
async fn probe(
    conn: &mut Option<BackendLink>,
    backend: &BackendConfig,
    settings: &ProbeSettings,
) -> Result<(Role, Vec<String>, Option<Metadata>), ProbeError> {
    let limits = settings.reply_limits;
    let fresh = conn.is_none();
    if fresh {
        let link = BackendLink::open(
            backend,
            &Handshake::default(),
            settings.timeout,
            limits,
            settings.tls.as_deref(),
        )
        .await?;
        *conn = Some(link);
    }
    let Some(c) = conn.as_mut() else {
        return Err(ProbeError::Closed);
    };
    let role = Request::from_args(&[b"ROLE"]);
    if !fresh {
        let reply = c.call(&role).await?;
        return Ok((parse_role(&reply)?, master_replicas(&reply), None));
    }
    // A new connection (first contact, restart, another server at the address) also
    // reads the command metadata, pipelined before ROLE in one write: the server runs
    // all three at once, so its CLIENT LIST never shows the probe connection at anything
    // but ROLE.
    let mut out = Vec::new();
    out.extend_from_slice(Request::from_args(&[b"INFO".as_slice(), b"server"]).frame());
    out.extend_from_slice(Request::from_args(&[b"COMMAND"]).frame());
    out.extend_from_slice(role.frame());
    c.send(&out).await?;
    let info = c.next_reply().await?;
    let commands = c.next_reply().await?;
    let reply = c.next_reply().await?;
    Ok((
        parse_role(&reply)?,
        master_replicas(&reply),
        Some(Metadata { info, commands }),
    ))
}

/// The replies to `INFO server` and `COMMAND` read on a new probe connection.
struct Metadata {
    info: Reply,
    commands: Reply,
}

/// Publish what a new connection's `COMMAND` reported beyond the built-in table, unless
/// it is the server (run_id) already learned. A failure keeps the previous metadata and
/// is logged.
fn learn(
    index: usize,
    label: &str,
    store: &TopologyStore,
    m: Metadata,
    learned_run_id: &mut Option<String>,
) {
    let info = m
        .info
        .text()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
    };
    let run_id = field("run_id:");
    if run_id.is_some() && run_id == *learned_run_id {
        return;
    }
    let server = field("valkey_version:")
        .map(|v| format!("valkey {v}"))
        .or_else(|| field("redis_version:").map(|v| format!("redis {v}")));
    match Catalog::from_reply(&m.commands, server) {
        Ok(catalog) => {
            let learned = catalog.names();
            info!(
                backend = %label,
                server = catalog.server.as_deref().unwrap_or("?"),
                reported = catalog.reported,
                learned = learned.len(),
                names = %learned.join(" "),
                "command metadata read from the backend (learned: commands the built-in table lacks)"
            );
            let catalog = Arc::new(catalog);
            store.update(index, |b| b.commands = Some(catalog.clone()));
            *learned_run_id = run_id;
        }
        Err(e) => {
            warn!(backend = %label, error = %e, "could not read the backend's COMMAND metadata; commands the built-in table lacks stay unknown");
            // Not again for this server on every reconnect.
            *learned_run_id = run_id;
        }
    }
}

/// Whether the backend refuses an unauthenticated client: `PING` on a connection that
/// never authenticates answers `-NOAUTH` (`Some(true)`) or `+PONG` (`Some(false)`). `None`
/// when there is no clear answer (the connection is then dropped and reopened next time);
/// the caller keeps the last known value.
async fn check_requires_auth(
    anon: &mut Option<BackendLink>,
    backend: &BackendConfig,
    settings: &ProbeSettings,
) -> Option<bool> {
    let check = async {
        if anon.is_none() {
            let state = Handshake {
                auth: LinkAuth::Unauthenticated,
                ..Handshake::default()
            };
            let limits = settings.reply_limits;
            let link = BackendLink::open(
                backend,
                &state,
                settings.timeout,
                limits,
                settings.tls.as_deref(),
            )
            .await?;
            *anon = Some(link);
        }
        let Some(c) = anon.as_mut() else {
            return Err(ProbeError::Closed);
        };
        Ok(c.call(&Request::from_args(&[b"PING"])).await?)
    };
    let answer = match tokio::time::timeout(settings.timeout, check).await {
        Ok(Ok(reply)) => requires_auth_from(&reply),
        _ => None,
    };
    if answer.is_none() {
        *anon = None;
    }
    answer
}

/// `-NOAUTH` → requires a password; any non-error → does not; other errors → unknown.
fn requires_auth_from(reply: &Reply) -> Option<bool> {
    match reply.error_code() {
        Some(b"NOAUTH") => Some(true),
        Some(_) => None,
        None => Some(false),
    }
}

/// Parse a `ROLE` reply.
fn parse_role(reply: &Reply) -> Result<Role, ProbeError> {
    let unexpected = || {
        ProbeError::Unexpected(
            String::from_utf8_lossy(&reply.frame()[..reply.frame().len().min(120)]).into_owned(),
        )
    };
    if reply.is_error() {
        let text = String::from_utf8_lossy(&reply.frame()[..reply.frame().len().min(120)])
            .trim_end()
            .to_string();
        return match Evidence::of_error_reply(&text) {
            Evidence::Alive(_) => Err(ProbeError::Busy(text)),
            _ => Err(unexpected()),
        };
    }
    let items = reply.items().ok_or_else(unexpected)?;
    match items.as_slice() {
        [Item::Str(b"master"), ..] => Ok(Role::Master),
        [Item::Str(b"slave"), Item::Str(host), Item::Int(port), Item::Str(link), ..] => {
            Ok(Role::Replica {
                master_host: String::from_utf8_lossy(host).into_owned(),
                master_port: u16::try_from(*port).map_err(|_| unexpected())?,
                link: String::from_utf8_lossy(link).into_owned(),
            })
        }
        [Item::Str(b"sentinel"), ..] => Ok(Role::Sentinel),
        _ => Err(unexpected()),
    }
}

/// The replicas a master's `ROLE` lists (`["master", offset, [[ip, port, offset], ...]]`,
/// the port a bulk string), as `ip:port`; empty for any other reply or shape.
fn master_replicas(reply: &Reply) -> Vec<String> {
    let mut r = RespCursor {
        b: reply.frame(),
        pos: 0,
    };
    let parsed = (|| {
        if r.header(b'*')? < 3 || r.bulk()? != b"master" {
            return None;
        }
        r.line()?; // :offset
        let n = r.header(b'*')?;
        let mut out = Vec::new();
        for _ in 0..n {
            if r.header(b'*')? < 2 {
                return None;
            }
            let ip = String::from_utf8_lossy(r.bulk()?).into_owned();
            let port = std::str::from_utf8(r.bulk()?).ok()?.parse::<u16>().ok()?;
            out.push(format!("{ip}:{port}"));
            r.bulk()?; // offset
        }
        Some(out)
    })();
    parsed.unwrap_or_default()
}

/// A reader over a validated reply frame, for the one nested shape the prober needs.
struct RespCursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> RespCursor<'a> {
    /// The next `\r\n`-terminated line, without its terminator.
    fn line(&mut self) -> Option<&'a [u8]> {
        let rest = self.b.get(self.pos..)?;
        let end = memchr::memmem::find(rest, b"\r\n")?;
        self.pos += end + 2;
        rest.get(..end)
    }

    /// An aggregate header of type `kind`: its length.
    fn header(&mut self, kind: u8) -> Option<usize> {
        let line = self.line()?;
        let (&t, n) = line.split_first()?;
        (t == kind).then_some(())?;
        std::str::from_utf8(n).ok()?.parse().ok()
    }

    /// A bulk (or simple) string's bytes.
    fn bulk(&mut self) -> Option<&'a [u8]> {
        let line = self.line()?;
        match line.split_first()? {
            (b'$', n) => {
                let len: usize = std::str::from_utf8(n).ok()?.parse().ok()?;
                let s = self.b.get(self.pos..self.pos.checked_add(len)?)?;
                self.pos += len + 2;
                Some(s)
            }
            (b'+', s) => Some(s),
            _ => None,
        }
    }
}

/// Heal a hijacked backend on the prober's own connection: follow the confirmed master
/// when there is one, else become master again (`REPLICAOF NO ONE`).
async fn heal(index: usize, label: &str, conn: &mut BackendLink, store: &TopologyStore) {
    let topo = store.load();
    let target = topo
        .master_now()
        .filter(|&m| m != index)
        .and_then(|m| topo.backends.get(m))
        .and_then(|b| {
            b.address
                .rsplit_once(':')
                .map(|(h, p)| (h.to_string(), p.to_string()))
        });
    let req = match &target {
        Some((host, port)) => {
            Request::from_args(&[b"REPLICAOF".as_slice(), host.as_bytes(), port.as_bytes()])
        }
        None => Request::from_args(&[b"REPLICAOF".as_slice(), b"NO", b"ONE"]),
    };
    let what = match &target {
        Some((h, p)) => format!("REPLICAOF {h} {p}"),
        None => "REPLICAOF NO ONE".to_string(),
    };
    match conn.call(&req).await {
        Ok(r) if !r.is_error() => {
            warn!(backend = %label, command = %what, "auto-heal: hijacked backend healed");
            counter!("portcullis_auto_heals_total", "backend" => label.to_string()).increment(1);
        }
        Ok(r) => {
            error!(backend = %label, command = %what, reply = %String::from_utf8_lossy(r.frame().trim_ascii_end()), "auto-heal refused by the backend")
        }
        Err(e) => error!(backend = %label, command = %what, error = %e, "auto-heal failed"),
    }
}

/// Record every `ip:port` the backend's host resolves to, so replicas that name their
/// master by IP are recognised as following a configured backend.
async fn resolve_aliases(index: usize, backend: &BackendConfig, store: &TopologyStore) {
    let Ok(addrs) = tokio::net::lookup_host(backend.address.as_str()).await else {
        return;
    };
    let aliases: Vec<String> = addrs.map(|a| format!("{}:{}", a.ip(), a.port())).collect();
    store.update(index, |b| {
        for a in &aliases {
            if !b.aliases.contains(a) {
                b.aliases.push(a.clone());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &[u8]) -> Reply {
        Reply::parse_one(bytes)
    }

    #[test]
    fn password_requirement_from_an_anonymous_ping() {
        assert_eq!(
            requires_auth_from(&reply(b"-NOAUTH Authentication required.\r\n")),
            Some(true)
        );
        assert_eq!(requires_auth_from(&reply(b"+PONG\r\n")), Some(false));
        assert_eq!(requires_auth_from(&reply(b"-LOADING x\r\n")), None);
    }

    #[test]
    fn lists_a_masters_replicas() {
        assert_eq!(
            master_replicas(&reply(b"*3\r\n$6\r\nmaster\r\n:0\r\n*2\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n$1\r\n0\r\n*3\r\n$8\r\n10.0.0.9\r\n$4\r\n7001\r\n$3\r\n120\r\n")),
            vec!["127.0.0.1:6380".to_string(), "10.0.0.9:7001".to_string()]
        );
        assert!(master_replicas(&reply(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")).is_empty());
        assert!(master_replicas(&reply(
            b"*5\r\n$5\r\nslave\r\n$9\r\n10.0.0.99\r\n:8886\r\n$7\r\nconnect\r\n:-1\r\n"
        ))
        .is_empty());
        // A port that is not one: nothing rather than a guess.
        assert!(master_replicas(&reply(
            b"*3\r\n$6\r\nmaster\r\n:0\r\n*1\r\n*3\r\n$1\r\nh\r\n$5\r\n70000\r\n$1\r\n0\r\n"
        ))
        .is_empty());
    }

    #[test]
    fn parses_role_replies() {
        assert_eq!(
            parse_role(&reply(b"*3\r\n$6\r\nmaster\r\n:0\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n$1\r\n0\r\n")).unwrap(),
            Role::Master
        );
        assert_eq!(
            parse_role(&reply(
                b"*5\r\n$5\r\nslave\r\n$9\r\n10.0.0.99\r\n:8886\r\n$7\r\nconnect\r\n:-1\r\n"
            ))
            .unwrap(),
            Role::Replica {
                master_host: "10.0.0.99".into(),
                master_port: 8886,
                link: "connect".into()
            }
        );
        assert_eq!(
            parse_role(&reply(b"*2\r\n$8\r\nsentinel\r\n*0\r\n")).unwrap(),
            Role::Sentinel
        );
        assert!(matches!(
            parse_role(&reply(b"-NOPERM no\r\n"))
                .unwrap_err()
                .evidence(),
            Evidence::Down(_)
        ));
        for busy in [
            b"-BUSY Redis is busy running a script.\r\n".as_slice(),
            b"-LOADING Redis is loading the dataset in memory\r\n",
        ] {
            assert!(matches!(
                parse_role(&reply(busy)).unwrap_err().evidence(),
                Evidence::Alive(_)
            ));
        }
        assert!(matches!(
            ProbeError::Timeout(Duration::from_millis(500)).evidence(),
            Evidence::Silence(_)
        ));
        assert!(parse_role(&reply(b"*1\r\n$5\r\nother\r\n")).is_err());
        assert!(parse_role(&reply(
            b"*5\r\n$5\r\nslave\r\n$1\r\nh\r\n:70000\r\n$1\r\nx\r\n:0\r\n"
        ))
        .is_err());
    }
}
