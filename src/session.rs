//! One client connection: read → parse → classify → authorize → forward → match replies.
//!
//! Lifecycle (one task per client):
//! 1. Reads client bytes, parses requests (`protocol::request`), checks each against the
//!    policy. Refused and proxy-answered commands become `Pending::Local` replies queued in
//!    request order; forwarded ones are written to the session's own backend connection,
//!    opened on the first forwarded command.
//! 2. Reads backend bytes, cuts them into replies (`protocol::reply`) and matches each to
//!    the head of the pending queue. Reply accounting is exact: the queue records how many
//!    replies each request produces, taking CLIENT REPLY OFF/SKIP, pub/sub confirmations,
//!    RESP3 push frames and MULTI/EXEC into account; push frames and RESP2 pub/sub
//!    messages are forwarded out of band.
//! 3. Client EOF closes the backend at once (a blocked BLPOP must not pop for a gone
//!    client). Backend EOF answers every pending request with an error; the session keeps
//!    the client if its state can be replayed on a fresh connection, else closes it.
//!
//! Must not block on one direction while the other could make progress: all socket I/O is
//! readiness-driven and non-blocking (`read_some` / `try_write_vectored`).

use std::collections::{HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use arc_swap::ArcSwap;

use crate::auth::User;
use crate::backend::{BackendLink, Handshake, Liveness, TopologyStore};
use crate::command::{AclCategories, CommandSpec, Flags, Lookup, PubSubKind, Special};
use crate::config::ReadPolicy;
use crate::metrics::{self, Hot};
use crate::net::Stream;
use crate::policy::{self, Verdict};
use crate::protocol::{
    Item, ProtocolError, Reply, ReplyKind, ReplyScanner, Request, RequestParser,
};
use crate::runtime::Runtime;

/// An empty read buffer larger than this is released (after a big value went through).
const READ_KEEP: usize = 64 * 1024;

/// Give back an emptied buffer that grew for a big frame.
fn release_if_big(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > READ_KEEP {
        *buf = BytesMut::new();
    }
}
/// Shortest time between two connect attempts to a master that is silent or busy.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Most chunks handed to one `writev`.
const MAX_IOVECS: usize = 64;

/// What every session shares: the reloadable runtime, the topology, metric handles.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub hot: Hot,
    pub topology: Arc<TopologyStore>,
}

impl Shared {
    /// `-MASTERDOWN` with what the proxy knows about every backend.
    fn masterdown(&self) -> Bytes {
        metrics::no_master();
        local_error(&format!(
            "MASTERDOWN portcullis has no confirmed master to send this to: {}",
            self.topology.load().explain()
        ))
    }
}

/// Why a session ended; logged at debug, never sent to the client beyond Redis's texts.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("client sent QUIT")]
    Quit,
    #[error("client protocol error: {0}")]
    Protocol(ProtocolError),
    #[error("cross-protocol input (POST/Host:) from client")]
    CrossProtocol,
    #[error("client i/o error: {0}")]
    ClientIo(io::Error),
    #[error("backend lost with unreplayable session state")]
    BackendLost,
    #[error("backend sent a reply nobody asked for")]
    BackendDesync,
    #[error("client idle timeout")]
    Idle,
    #[error("client did not complete a request frame within limits.frame_timeout")]
    FrameTimeout,
    #[error("proxy shutting down")]
    Shutdown,
}

/// What the proxy must do with the reply (or replies) of one forwarded request.
#[derive(Debug)]
enum OnReply {
    /// Forward as is.
    Forward,
    /// Forward; when not an error, apply the state change.
    Apply(StateChange),
    /// Swallow the backend's reply and send this instead (EXECABORT after a refusal).
    Replace(Bytes),
    /// Pub/sub confirmations: one per named channel, or until the set empties (`all`).
    PubSub { kind: PubSubKind, all: bool },
}

/// Session state that changes when Redis confirms a command.
#[derive(Debug)]
enum StateChange {
    Select(u64),
    ClientName(Option<Bytes>),
    Hello {
        resp3: Option<bool>,
        name: Option<Bytes>,
    },
    Reset,
    /// EXEC: apply the changes queued inside MULTI when the transaction ran.
    Exec(Vec<StateChange>),
}

/// Which of the session's backend connections a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// The confirmed master: writes, transactions, scripts, pub/sub, blocking commands.
    Master,
    /// A replica, for reads when `routing.reads` allows it.
    Replica,
}

/// One entry of the in-order reply queue.
#[derive(Debug)]
enum Pending {
    /// `remaining` replies expected from the backend for one forwarded request;
    /// `retry` keeps a plain write so a `-READONLY` answer can be retried elsewhere.
    Backend {
        remaining: u32,
        on_reply: OnReply,
        retry: Option<Retained>,
        link: Link,
        /// When the request's bytes were read (for the latency histogram).
        sent: Instant,
    },
    /// A write the backend refused with `-READONLY`: not applied, to be retried on the
    /// confirmed master once this link has answered everything before it.
    Retry(Retained),
    /// A reply that arrived while an earlier request waits for its retry.
    Done(Bytes),
    /// A reply produced by the proxy, emitted once everything before it is.
    Local(Bytes),
    /// Close the client once everything before has been written (QUIT).
    Close,
}

/// A forwarded write's frame, kept until its reply in case it must be retried after
/// `-READONLY`. Counted in the session's `retained` total while it lives (dropping it, on
/// any path, takes it off), so a pipeline of big writes to a fast backend cannot pile up
/// answered-but-unread frames beyond the session's buffer bound.
#[derive(Debug)]
struct Retained {
    frame: Bytes,
    total: Arc<AtomicUsize>,
}

impl Retained {
    fn new(frame: Bytes, total: &Arc<AtomicUsize>) -> Retained {
        total.fetch_add(frame.len(), Ordering::Relaxed);
        Retained {
            frame,
            total: total.clone(),
        }
    }
}

impl Drop for Retained {
    fn drop(&mut self) {
        self.total.fetch_sub(self.frame.len(), Ordering::Relaxed);
    }
}

/// CLIENT REPLY state, tracked when a command is sent (as Redis applies it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    Skip,
}

/// Frames up to this size are copied into one contiguous tail buffer (a pipeline of
/// small replies becomes one write); bigger ones stay zero-copy chunks.
const COALESCE_MAX: usize = 2048;

/// Bytes queued for one socket: zero-copy chunks, then a tail of coalesced small frames,
/// written together with `writev`. Order: every chunk precedes the tail.
#[derive(Debug, Default)]
struct OutQueue {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    bytes: usize,
}

impl OutQueue {
    fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.bytes += b.len();
        if b.len() <= COALESCE_MAX {
            self.tail.extend_from_slice(&b);
        } else {
            if !self.tail.is_empty() {
                self.chunks.push_back(self.tail.split().freeze());
            }
            self.chunks.push_back(b);
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Write as much as the socket takes now; `Ok(n)` bytes written.
    fn try_write(&mut self, stream: &mut Stream) -> io::Result<usize> {
        let mut total = 0;
        while self.bytes > 0 {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (slot, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
                *slot = IoSlice::new(chunk);
                n += 1;
            }
            if n < MAX_IOVECS && !self.tail.is_empty() {
                slices[n] = IoSlice::new(&self.tail);
                n += 1;
            }
            let written = match stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) => return Err(e),
            };
            total += written;
            self.advance(written);
        }
        Ok(total)
    }

    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                // The rest is in the tail.
                self.tail.advance(n.min(self.tail.len()));
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }
}

/// The session's connection to its backend.
struct Backend {
    /// Index of the backend in the topology.
    index: usize,
    stream: Stream,
    buf: BytesMut,
    /// Bytes of the previous read batch (sizes the next read).
    batch: usize,
    scanner: ReplyScanner,
    out: OutQueue,
    /// Label for logs and metrics.
    label: String,
    /// Where replies read here count as the backend's proof of life (`probe.down_after`).
    liveness: Arc<Liveness>,
}

impl Backend {
    /// Bytes or TLS records waiting for the socket.
    fn has_output(&self) -> bool {
        !self.out.is_empty() || self.stream.wants_flush()
    }

    /// Write what the socket takes now.
    fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.out.try_write(&mut self.stream)?;
        }
        self.stream.flush_pending()
    }
}

/// Per-connection state that outlives backend connections.
#[derive(Debug, Default)]
struct ConnState {
    db: u64,
    resp3: bool,
    client_name: Option<Bytes>,
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard_channels: HashSet<Bytes>,
}

impl ConnState {
    fn subscribed(&self) -> bool {
        !(self.channels.is_empty() && self.patterns.is_empty() && self.shard_channels.is_empty())
    }

    fn set(&mut self, kind: PubSubKind) -> &mut HashSet<Bytes> {
        match kind {
            PubSubKind::Channel => &mut self.channels,
            PubSubKind::Pattern => &mut self.patterns,
            PubSubKind::Shard => &mut self.shard_channels,
        }
    }

    fn apply(&mut self, change: StateChange) {
        match change {
            StateChange::Select(db) => self.db = db,
            StateChange::ClientName(name) => self.client_name = name,
            StateChange::Hello { resp3, name } => {
                if let Some(r) = resp3 {
                    self.resp3 = r;
                }
                if name.is_some() {
                    self.client_name = name;
                }
            }
            StateChange::Reset => {
                *self = ConnState::default();
            }
            StateChange::Exec(changes) => {
                for c in changes {
                    self.apply(c);
                }
            }
        }
    }
}

/// Static replies.
mod replies {
    pub const OK: &[u8] = b"+OK\r\n";
    pub const EXECABORT: &[u8] =
        b"-EXECABORT Transaction discarded because of previous errors.\r\n";
    pub const WRONGPASS: &[u8] =
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    pub const AUTH_NO_PASSWORD: &[u8] = b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n";
    pub const SYNTAX: &[u8] = b"-ERR syntax error\r\n";
    pub const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
    pub const HELLO_NOAUTH: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
}

fn local_error(text: &str) -> Bytes {
    error_line(text.as_bytes())
}

/// `-<text>\r\n`, with CR/LF inside the text turned into spaces (as Redis does): they
/// would end the line early.
fn error_line(text: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(text.len() + 3);
    b.extend_from_slice(b"-");
    b.extend(
        text.iter()
            .map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
    );
    b.extend_from_slice(b"\r\n");
    b.freeze()
}

/// A client-provided name as Redis's `%.Ns` prints it: raw bytes, cut at a NUL or `max`.
fn shown(arg: &[u8], max: usize) -> &[u8] {
    let end = arg
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(arg.len())
        .min(max);
    &arg[..end]
}

/// Redis's text for an unknown command (`server.c` processCommand), byte for byte.
fn unknown_command(req: &Request) -> Bytes {
    let mut args: Vec<u8> = Vec::new();
    for i in 1..req.argc() {
        if args.len() >= 128 {
            break;
        }
        let room = 128 - args.len();
        args.push(b'\'');
        args.extend_from_slice(shown(req.arg(i).unwrap_or_default(), room));
        args.extend_from_slice(b"' ");
    }
    let mut text = b"ERR unknown command '".to_vec();
    text.extend_from_slice(shown(req.arg(0).unwrap_or_default(), 128));
    text.extend_from_slice(b"', with args beginning with: ");
    text.extend_from_slice(&args);
    error_line(&text)
}

/// Redis's text for an unknown subcommand (or a container called without one).
fn unknown_subcommand(container: &str, req: &Request) -> Bytes {
    match req.arg(1) {
        Some(sub) => local_error(&format!(
            "ERR unknown subcommand '{}'. Try {} HELP.",
            String::from_utf8_lossy(shown(sub, 128)),
            container.to_ascii_uppercase()
        )),
        None => local_error(&format!(
            "ERR wrong number of arguments for '{container}' command"
        )),
    }
}

fn eq(arg: Option<&[u8]>, word: &[u8]) -> bool {
    arg.is_some_and(|a| a.eq_ignore_ascii_case(word))
}

fn parse_u64(arg: Option<&[u8]>) -> Option<u64> {
    std::str::from_utf8(arg?).ok()?.parse().ok()
}

/// Serve one client connection until it ends.
pub async fn run(
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let tls = shared.runtime.load().client_tls.clone();
    let mut client = match tls {
        None => Stream::Plain(client),
        Some(tls) => {
            let handshake = tokio::select! {
                r = tls.accept(client) => r,
                _ = shutdown.cancelled() => return,
            };
            match handshake {
                Ok(stream) => stream,
                Err(e) => {
                    metrics::tls_handshake_failure("client");
                    debug!(%peer, error = %e, "client TLS handshake failed");
                    return;
                }
            }
        }
    };
    let mut session = Session::new(peer, shared);
    let end = session.serve(&mut client, &shutdown).await;
    client.close();
    match &end {
        SessionEnd::Protocol(e) => debug!(%peer, error = %e, "client closed: protocol error"),
        SessionEnd::CrossProtocol => warn!(
            %peer,
            "possible cross-protocol attack (POST or Host: line); connection closed"
        ),
        SessionEnd::FrameTimeout => warn!(
            %peer,
            "client did not complete a request frame within limits.frame_timeout (slow sender); connection closed"
        ),
        other => debug!(%peer, reason = %other, "client closed"),
    }
}

struct Session {
    peer: SocketAddr,
    shared: Arc<Shared>,
    /// The runtime (config, policy, users) this session applies; refreshed at each read.
    rt: Arc<Runtime>,
    parser: RequestParser,
    client_buf: BytesMut,
    /// Bytes of the client's previous read batch (sizes the next read).
    client_batch: usize,
    /// When the incomplete frame at the front of `client_buf` was first seen: it must be
    /// complete within `limits.frame_timeout` (slow senders). Restarted when the session
    /// resumes reading its client after back-pressure, which is not the client's fault.
    partial_since: Option<Instant>,
    to_client: OutQueue,
    backend: Option<Backend>,
    /// Session-affine replica connection for reads (`routing.reads`).
    replica: Option<Backend>,
    /// The replica link predates a state change (SELECT, HELLO, ...): reopen it when idle.
    replica_stale: bool,
    pending: VecDeque<Pending>,
    state: ConnState,
    reply_mode: ReplyMode,
    in_multi: bool,
    /// A command was refused while queuing: EXEC must answer EXECABORT.
    multi_dirty: bool,
    /// State changes queued inside MULTI, applied if EXEC runs.
    multi_changes: Vec<StateChange>,
    watching: bool,
    /// Clients must AUTH first when users are configured.
    authenticated: bool,
    /// The user this connection authenticated as (its policy applies).
    user: Option<Arc<User>>,
    /// A request waiting for the pending queue to drain before the session moves to a
    /// new master (never sent to the old one).
    held: Option<(Request, u32, OnReply, bool)>,
    /// Bytes of forwarded writes kept for a READONLY retry (`Retained`).
    retained: Arc<AtomicUsize>,
    /// `Pending::Retry` entries in the queue.
    retrying: usize,
    /// Metric class of the request being handled (`metrics::CLASSES`).
    class: usize,
    /// The clock, read once per event (after each wake-up): the time of that event's
    /// reads, for the latency histogram.
    now: Instant,
    /// When the latest client bytes were read: the start of their requests' latency.
    read_at: Instant,
    /// When the latest backend bytes were read: the end of their replies' latency.
    replies_at: Instant,
    /// QUIT seen, or a fatal client error: read nothing more from the client.
    client_done: bool,
    /// Replies in flight when the end was decided; the session ends when they are written.
    end: Option<SessionEnd>,
    /// Shutdown seen: finishing what is in flight.
    draining: bool,
    /// A link loss answered requests: parse what the client buffered behind them.
    resume_parse: bool,
}

enum Event {
    ClientReadable,
    BackendReadable(Link),
    Writable,
    Idle,
    FrameTimeout,
    Shutdown,
}

impl Session {
    fn new(peer: SocketAddr, shared: Arc<Shared>) -> Session {
        let rt = shared.runtime.load_full();
        let authenticated = !rt.users.enabled();
        Session {
            peer,
            parser: RequestParser::new(rt.request_limits(authenticated)),
            rt,
            authenticated,
            user: None,
            shared,
            client_buf: BytesMut::new(),
            client_batch: 0,
            partial_since: None,
            to_client: OutQueue::default(),
            backend: None,
            replica: None,
            replica_stale: false,
            pending: VecDeque::new(),
            state: ConnState::default(),
            reply_mode: ReplyMode::On,
            in_multi: false,
            multi_dirty: false,
            multi_changes: Vec::new(),
            watching: false,
            held: None,
            retrying: 0,
            retained: Arc::new(AtomicUsize::new(0)),
            class: 2,
            now: Instant::now(),
            read_at: Instant::now(),
            replies_at: Instant::now(),
            client_done: false,
            end: None,
            draining: false,
            resume_parse: false,
        }
    }

    async fn serve(&mut self, client: &mut Stream, shutdown: &CancellationToken) -> SessionEnd {
        loop {
            if let Err(e) = self.flush(client) {
                return SessionEnd::ClientIo(e);
            }
            // Requests buffered behind a link that was lost outside a backend read (a
            // failed write): no socket event may come for them.
            if std::mem::take(&mut self.resume_parse) && !self.client_buf.is_empty() {
                if let Some(end) = self.parse_buffered().await {
                    return end;
                }
                continue;
            }
            // A held request or READONLY retries may be unblocked by something other than
            // a backend read (a lost link answered locally): resume them here too.
            if (self.held.is_some() || self.retrying > 0) && !self.waiting_on_backend() {
                if let Some(end) = self.after_replies().await {
                    return end;
                }
                // Requests already buffered behind them: no socket event may come.
                if !self.client_buf.is_empty() {
                    if let Some(end) = self.parse_buffered().await {
                        return end;
                    }
                }
            }
            // End only once every reply owed before the end has been written.
            if self.to_client.is_empty() && self.pending.is_empty() && !client.wants_flush() {
                if let Some(end) = self.end.take() {
                    return end;
                }
            }
            let limits = &self.rt.config.limits;
            let idle = limits.idle_timeout;
            // Requests waiting for a slow backend are held to the same bound as replies
            // waiting for a slow client: the proxy stops reading a pipeline Redis is not
            // taking instead of buffering all of it.
            let to_backends = self.backend.as_ref().map_or(0, |b| b.out.bytes)
                + self.replica.as_ref().map_or(0, |b| b.out.bytes);
            let read_client = !self.client_done
                && self.held.is_none()
                && self.retrying == 0
                && self.pending.len() < limits.max_pending
                && self.to_client.bytes < limits.max_reply_buffer
                && to_backends < limits.max_reply_buffer;
            let frame_deadline = match self.partial_since {
                Some(since) if read_client && !limits.frame_timeout.is_zero() => {
                    Some(tokio::time::Instant::from_std(since + limits.frame_timeout))
                }
                _ => None,
            };
            let read_backend =
                self.backend.is_some() && self.to_client.bytes < limits.max_reply_buffer;
            let read_replica =
                self.replica.is_some() && self.to_client.bytes < limits.max_reply_buffer;
            let backend_stream = self.backend.as_ref().map(|b| &b.stream);
            let backend_out = self.backend.as_ref().is_some_and(Backend::has_output);
            let replica_stream = self.replica.as_ref().map(|b| &b.stream);
            let replica_out = self.replica.as_ref().is_some_and(Backend::has_output);
            let client_out = !self.to_client.is_empty() || client.wants_flush();

            let event = tokio::select! {
                biased;
                r = client.readable(), if read_client => match r {
                    Ok(()) => Event::ClientReadable,
                    Err(e) => return SessionEnd::ClientIo(e),
                },
                _ = readable(backend_stream), if read_backend => Event::BackendReadable(Link::Master),
                _ = readable(replica_stream), if read_replica => Event::BackendReadable(Link::Replica),
                _ = client.writable(), if client_out => Event::Writable,
                _ = writable(backend_stream), if backend_out => Event::Writable,
                _ = writable(replica_stream), if replica_out => Event::Writable,
                _ = idle_sleep(idle), if !idle.is_zero() => Event::Idle,
                _ = frame_sleep(frame_deadline), if frame_deadline.is_some() => Event::FrameTimeout,
                // Once draining, the token stays cancelled: polling it again would spin.
                _ = shutdown.cancelled(), if !self.draining => Event::Shutdown,
            };
            self.now = Instant::now();
            if !read_client {
                // The frame clock runs only while the client is read: back-pressure is
                // not its fault. Restarted at every wake-up, so also when reading resumes.
                if let Some(since) = &mut self.partial_since {
                    *since = self.now;
                }
            }
            match event {
                Event::ClientReadable => {
                    if let Some(end) = self.read_client(client).await {
                        return end;
                    }
                }
                Event::BackendReadable(link) => {
                    self.read_backend(link);
                    if let Some(end) = self.after_replies().await {
                        return end;
                    }
                    if !self.client_buf.is_empty() {
                        if let Some(end) = self.parse_buffered().await {
                            return end;
                        }
                    }
                }
                Event::Writable => {}
                Event::Idle => {
                    if self.pending.is_empty() {
                        return SessionEnd::Idle;
                    }
                }
                Event::FrameTimeout => {
                    metrics::protocol_error("frame_timeout");
                    return SessionEnd::FrameTimeout;
                }
                Event::Shutdown => {
                    // Drain: stop reading the client, finish what is in flight.
                    self.draining = true;
                    self.client_done = true;
                    // The end check at the top waits for replies already answered but
                    // not yet written, too (bounded by the server's shutdown grace).
                    self.end.get_or_insert(SessionEnd::Shutdown);
                }
            }
        }
    }

    /// Adopt a reloaded runtime: new policy, users and limits apply from the next command.
    fn refresh_runtime(&mut self) {
        let current = self.shared.runtime.load();
        if current.generation == self.rt.generation {
            return;
        }
        self.rt = arc_swap::Guard::into_inner(current);
        if !self.rt.users.enabled() {
            self.user = None;
            self.authenticated = true;
        } else if let Some(name) = self.user.as_ref().map(|u| u.name.clone()) {
            // Same user, new rules; a removed user is signed out.
            self.user = self.rt.users.get(&name);
            self.authenticated = self.user.is_some();
        }
        self.parser
            .set_limits(self.rt.request_limits(self.authenticated));
    }

    /// Write what both sockets take now. Errors on the backend side are handled as a
    /// lost backend; only client errors are returned.
    fn flush(&mut self, client: &mut Stream) -> io::Result<()> {
        if let Some(b) = &mut self.backend {
            if let Err(e) = b.flush() {
                debug!(peer = %self.peer, error = %e, "backend write failed");
                self.link_lost(Link::Master);
            }
        }
        if let Some(b) = &mut self.replica {
            if let Err(e) = b.flush() {
                debug!(peer = %self.peer, error = %e, "replica write failed");
                self.link_lost(Link::Replica);
            }
        }
        if !self.to_client.is_empty() {
            let n = self.to_client.try_write(client)?;
            self.shared.hot.bytes_out.increment(n as u64);
        }
        client.flush_pending()
    }

    async fn read_client(&mut self, client: &mut Stream) -> Option<SessionEnd> {
        match client.read_batch(&mut self.client_buf, &mut self.client_batch) {
            Ok(0) => return Some(SessionEnd::ClientClosed),
            Ok(n) => {
                self.read_at = self.now;
                self.shared.hot.bytes_in.increment(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            // A TLS client that closed without close_notify (common; not an attack).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Some(SessionEnd::ClientClosed)
            }
            Err(e) => return Some(SessionEnd::ClientIo(e)),
        }
        self.parse_buffered().await
    }

    /// Handle the requests already buffered, up to the pending bound. Called after a
    /// read and whenever replies make room, since the client may have sent everything
    /// already and never make its socket readable again.
    async fn parse_buffered(&mut self) -> Option<SessionEnd> {
        self.refresh_runtime();
        while !self.client_done
            && self.held.is_none()
            && self.retrying == 0
            && self.pending.len() < self.rt.config.limits.max_pending
        {
            match self.parser.parse(&mut self.client_buf) {
                Ok(Some(req)) => {
                    self.partial_since = None;
                    if let Some(end) = self.on_request(req).await {
                        return Some(end);
                    }
                }
                Ok(None) => {
                    release_if_big(&mut self.client_buf);
                    if self.client_buf.is_empty() {
                        self.partial_since = None;
                    } else {
                        self.partial_since.get_or_insert_with(Instant::now);
                    }
                    break;
                }
                Err(e) => {
                    metrics::protocol_error("client");
                    self.client_done = true;
                    self.push_local(local_error(&format!("ERR {e}")));
                    self.end = Some(SessionEnd::Protocol(e));
                    break;
                }
            }
        }
        None
    }

    /// Queue a proxy-produced reply in order (subject to CLIENT REPLY).
    fn push_local(&mut self, reply: Bytes) {
        match self.pending.back() {
            None => self.to_client.push(reply),
            Some(_) => self.pending.push_back(Pending::Local(reply)),
        }
    }

    /// Whether the next reply is to be delivered, consuming a CLIENT REPLY SKIP.
    fn take_reply_slot(&mut self) -> bool {
        match self.reply_mode {
            ReplyMode::On => true,
            ReplyMode::Off => false,
            ReplyMode::Skip => {
                self.reply_mode = ReplyMode::On;
                false
            }
        }
    }

    /// Answer locally (refusals, AUTH, QUIT): in order, subject to CLIENT REPLY.
    fn answer(&mut self, reply: Bytes) {
        if self.take_reply_slot() {
            self.push_local(reply);
        }
    }

    /// Refuse a command; inside MULTI it also dooms the transaction, as Redis does for
    /// commands refused while queuing.
    fn refuse(&mut self, reply: Bytes) {
        if self.in_multi {
            self.multi_dirty = true;
        }
        self.answer(reply);
    }

    async fn on_request(&mut self, req: Request) -> Option<SessionEnd> {
        let name = req.arg(0).unwrap_or_default();
        if name.eq_ignore_ascii_case(b"post") || name.eq_ignore_ascii_case(b"host:") {
            metrics::protocol_error("cross_protocol");
            return Some(SessionEnd::CrossProtocol);
        }
        let policy = match &self.user {
            Some(u) => &u.policy,
            None => &self.rt.policy,
        };
        let (lookup, verdict) = policy::decide(policy, &req);
        let spec = match lookup {
            Lookup::Known(spec) => spec,
            Lookup::UnknownCommand => {
                self.shared.hot.unknown.increment(1);
                metrics::refused_command("unknown");
                warn!(peer = %self.peer, command = %String::from_utf8_lossy(shown(name, 64)), "refused unknown command");
                self.refuse(unknown_command(&req));
                return None;
            }
            Lookup::UnknownSubcommand(container) => {
                self.shared.hot.unknown.increment(1);
                self.refuse(unknown_subcommand(container.name, &req));
                return None;
            }
        };
        self.class = metrics::class_of(spec);
        if !self.authenticated
            && !matches!(
                spec.special,
                Special::Auth | Special::Hello | Special::Quit | Special::Reset
            )
        {
            self.refuse(Bytes::from_static(replies::NOAUTH));
            return None;
        }
        if let Some(Verdict::Deny { command, reason }) = verdict {
            self.shared.hot.refused[metrics::class_of(spec)].increment(1);
            metrics::refused_command(command);
            let user = self.user.as_ref().map_or("default", |u| u.name.as_str());
            warn!(peer = %self.peer, user, command, reason = reason.text(), "refused command");
            self.refuse(local_error(&format!(
                "NOPERM this user has no permissions to run the '{command}' command: refused by portcullis because {}",
                reason.text()
            )));
            return None;
        }

        let mut on_reply = OnReply::Forward;
        let mut forward = req;
        match spec.special {
            Special::Quit => {
                self.shared.hot.local.increment(1);
                self.answer(Bytes::from_static(replies::OK));
                self.pending.push_back(Pending::Close);
                self.client_done = true;
                // Nothing in flight before it: end now, not at a reply that never comes.
                self.drain_locals();
                return None;
            }
            Special::Auth => {
                self.shared.hot.local.increment(1);
                let reply = match forward.argc() {
                    2 if !self.rt.users.enabled() => Bytes::from_static(replies::AUTH_NO_PASSWORD),
                    2 => self.authenticate(b"default", forward.arg(1).unwrap_or_default()),
                    3 => self.authenticate(
                        forward.arg(1).unwrap_or_default(),
                        forward.arg(2).unwrap_or_default(),
                    ),
                    n if n < 2 => local_error("ERR wrong number of arguments for 'auth' command"),
                    _ => Bytes::from_static(replies::SYNTAX),
                };
                self.answer(reply);
                return None;
            }
            Special::Hello => match self.rewrite_hello(&forward) {
                Ok((req, change)) => {
                    forward = req;
                    on_reply = OnReply::Apply(change);
                }
                Err(reply) => {
                    self.answer(reply);
                    return None;
                }
            },
            Special::Subscribe(kind) | Special::Unsubscribe(kind) => {
                if self.in_multi || self.reply_mode != ReplyMode::On {
                    self.refuse(local_error(
                        "ERR portcullis does not forward pub/sub commands inside MULTI or with CLIENT REPLY OFF/SKIP",
                    ));
                    return None;
                }
                let all = matches!(spec.special, Special::Unsubscribe(_)) && forward.argc() == 1;
                let expected = if all {
                    1
                } else {
                    forward.argc().saturating_sub(1).max(1)
                };
                return self
                    .forward(
                        forward,
                        expected as u32,
                        OnReply::PubSub { kind, all },
                        false,
                    )
                    .await;
            }
            Special::ClientReply => {
                if self.in_multi {
                    self.refuse(local_error(
                        "ERR portcullis does not forward CLIENT REPLY inside MULTI",
                    ));
                    return None;
                }
                let arg = forward.arg(2);
                let delivered = if forward.argc() != 3 {
                    self.take_reply_slot()
                } else if eq(arg, b"on") {
                    self.reply_mode = ReplyMode::On;
                    true
                } else if eq(arg, b"off") {
                    self.reply_mode = ReplyMode::Off;
                    false
                } else if eq(arg, b"skip") {
                    if self.reply_mode != ReplyMode::Off {
                        self.reply_mode = ReplyMode::Skip;
                    }
                    false
                } else {
                    self.take_reply_slot()
                };
                return self
                    .forward(forward, u32::from(delivered), OnReply::Forward, false)
                    .await;
            }
            Special::Multi => {
                if !self.in_multi {
                    self.in_multi = true;
                    self.multi_dirty = false;
                    self.multi_changes.clear();
                }
            }
            Special::Exec | Special::Discard => {
                if self.in_multi {
                    self.in_multi = false;
                    self.watching = false;
                    let changes = std::mem::take(&mut self.multi_changes);
                    if std::mem::take(&mut self.multi_dirty) {
                        // Redis never saw the refused command: discard what it queued
                        // and answer as Redis does for commands refused while queuing.
                        let reply = if spec.special == Special::Exec {
                            Bytes::from_static(replies::EXECABORT)
                        } else {
                            Bytes::from_static(replies::OK)
                        };
                        forward = Request::from_args(&[b"DISCARD"]);
                        on_reply = OnReply::Replace(reply);
                    } else if spec.special == Special::Exec && !changes.is_empty() {
                        on_reply = OnReply::Apply(StateChange::Exec(changes));
                    }
                }
            }
            Special::Watch => {
                if !self.in_multi {
                    self.watching = true;
                }
            }
            Special::Unwatch => self.watching = false,
            Special::Select => {
                if let Some(db) = parse_u64(forward.arg(1)) {
                    self.stage(StateChange::Select(db), &mut on_reply);
                }
            }
            Special::ClientSetName => {
                if let Some(name) = forward.arg(2) {
                    let name = (!name.is_empty()).then(|| Bytes::copy_from_slice(name));
                    self.stage(StateChange::ClientName(name), &mut on_reply);
                }
            }
            Special::Reset => {
                // RESET authenticates as the default user: with users configured, that
                // means not authenticated at the proxy.
                if self.rt.users.enabled() {
                    self.authenticated = false;
                    self.user = None;
                    self.parser.set_limits(self.rt.request_limits(false));
                }
                self.in_multi = false;
                self.multi_dirty = false;
                self.multi_changes.clear();
                self.watching = false;
                self.reply_mode = ReplyMode::On;
                on_reply = OnReply::Apply(StateChange::Reset);
            }
            Special::Monitor | Special::Ping | Special::None => {}
        }
        let delivered = self.take_reply_slot();
        if let Some(index) = self.running_script_backend(spec) {
            return self
                .forward_to_script(index, forward, u32::from(delivered))
                .await;
        }
        if matches!(on_reply, OnReply::Apply(_)) {
            // The replica link's replayed state no longer matches.
            self.replica_stale = true;
        }
        let plain = matches!(on_reply, OnReply::Forward) && !self.in_multi;
        if plain && self.rt.config.routing.reads != ReadPolicy::Master && self.replica_read(spec) {
            return self.forward_read(forward, u32::from(delivered)).await;
        }
        // A plain write outside MULTI can be retried if the backend says READONLY.
        let retryable = plain && spec.is_write();
        self.forward(forward, u32::from(delivered), on_reply, retryable)
            .await
    }

    /// `SCRIPT KILL`, `FUNCTION KILL`, `FUNCTION STATS` while a backend other than the
    /// session's link is busy running a script: that backend, whatever its confirmation
    /// state (the command cannot change its role). `None`: route as usual.
    fn running_script_backend(&self, spec: &CommandSpec) -> Option<usize> {
        if !spec.acts_on_running_script() || !self.at_safe_point() {
            return None;
        }
        let busy = self.shared.topology.load().busy_backend()?;
        (self.backend.as_ref().map(|b| b.index) != Some(busy)).then_some(busy)
    }

    /// Send a script-control command to the busy backend on a link of its own (the
    /// session's next command moves back to the confirmed master at this safe point).
    async fn forward_to_script(
        &mut self,
        index: usize,
        req: Request,
        replies: u32,
    ) -> Option<SessionEnd> {
        self.backend = None;
        match self.connect(index).await {
            Ok(()) => self.push_request(req, replies, OnReply::Forward, false),
            Err(reply) => {
                if replies > 0 {
                    self.push_local(reply);
                }
                None
            }
        }
    }

    /// Whether a command may go to a replica: read-only, not blocking, not a script or
    /// pub/sub, and the session is in no state a replica link would not share.
    fn replica_read(&self, spec: &CommandSpec) -> bool {
        spec.is_readonly()
            && spec.special == Special::None
            && !spec.flags.intersects(Flags::BLOCKING.union(Flags::PUBSUB))
            && !spec.acl.intersects(AclCategories::SCRIPTING)
            && !self.watching
            && !self.state.subscribed()
            && self.reply_mode == ReplyMode::On
    }

    /// Send a read to the session's replica link (opening it when needed); without a
    /// healthy replica, `prefer-replica` falls back to the master.
    async fn forward_read(&mut self, req: Request, replies: u32) -> Option<SessionEnd> {
        let topo = self.shared.topology.load();
        let seed = self.peer.port() as usize;
        let choice = topo.replica_for_reads(seed);
        let on_replica = self.pending.iter().any(|p| {
            matches!(
                p,
                Pending::Backend {
                    link: Link::Replica,
                    ..
                }
            )
        });
        let usable = match (&self.replica, choice) {
            (Some(r), Some(c)) => r.index == c && !self.replica_stale,
            _ => false,
        };
        if !usable && !on_replica {
            self.replica = None;
            if let Some(index) = choice {
                match self.open_link(index).await {
                    Ok(link) => {
                        self.replica = Some(link);
                        self.replica_stale = false;
                    }
                    Err(_) => self.shared.topology.request_probe(index),
                }
            }
        }
        let ready = self
            .replica
            .as_ref()
            .is_some_and(|r| Some(r.index) == choice && !self.replica_stale);
        if ready {
            if let Some(r) = &mut self.replica {
                r.out.push(req.frame().clone());
                self.shared.hot.forwarded[self.class].increment(1);
                if replies > 0 {
                    self.pending.push_back(Pending::Backend {
                        remaining: replies,
                        on_reply: OnReply::Forward,
                        retry: None,
                        link: Link::Replica,
                        sent: self.read_at,
                    });
                }
            }
            return None;
        }
        if self.rt.config.routing.reads == ReadPolicy::Replica && !on_replica {
            if replies > 0 {
                self.push_local(local_error(&format!(
                    "MASTERDOWN portcullis has no healthy replica for reads (routing.reads = replica): {}",
                    topo.explain()
                )));
            }
            return None;
        }
        self.forward(req, replies, OnReply::Forward, false).await
    }

    /// AUTH at the proxy. With no users configured, like Redis's passwordless default
    /// user: `default` with any password succeeds, any other user fails.
    fn authenticate(&mut self, name: &[u8], password: &[u8]) -> Bytes {
        if !self.rt.users.enabled() {
            return if name == b"default" {
                Bytes::from_static(replies::OK)
            } else {
                Bytes::from_static(replies::WRONGPASS)
            };
        }
        match self.rt.users.authenticate(name, password) {
            Some(user) => {
                self.user = Some(user);
                if !self.authenticated {
                    self.authenticated = true;
                    self.parser.set_limits(self.rt.request_limits(true));
                }
                Bytes::from_static(replies::OK)
            }
            None => {
                metrics::auth_failure();
                warn!(peer = %self.peer, user = %String::from_utf8_lossy(shown(name, 64)), "AUTH failed");
                Bytes::from_static(replies::WRONGPASS)
            }
        }
    }

    /// A state change takes effect on the reply, or at EXEC when queued in MULTI.
    fn stage(&mut self, change: StateChange, on_reply: &mut OnReply) {
        if self.in_multi {
            self.multi_changes.push(change);
        } else {
            *on_reply = OnReply::Apply(change);
        }
    }

    /// HELLO: authenticate `AUTH user pass` at the proxy, forward the rest.
    fn rewrite_hello(&mut self, req: &Request) -> Result<(Request, StateChange), Bytes> {
        let mut args: Vec<&[u8]> = vec![b"HELLO"];
        let mut resp3 = None;
        let mut name = None;
        let mut i = 1;
        if let Some(proto) = req.arg(1) {
            args.push(proto);
            resp3 = match proto {
                b"3" => Some(true),
                b"2" => Some(false),
                _ => None,
            };
            i = 2;
        }
        while i < req.argc() {
            let opt = req.arg(i).unwrap_or_default();
            if opt.eq_ignore_ascii_case(b"auth") && req.argc() > i + 2 {
                let reply = self.authenticate(
                    req.arg(i + 1).unwrap_or_default(),
                    req.arg(i + 2).unwrap_or_default(),
                );
                if reply.as_ref() != replies::OK {
                    return Err(reply);
                }
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && req.argc() > i + 1 {
                let n = req.arg(i + 1).unwrap_or_default();
                args.push(b"SETNAME");
                args.push(n);
                name = Some(Bytes::copy_from_slice(n));
                i += 2;
            } else {
                // Let Redis produce its own syntax error for the rest.
                args.push(opt);
                i += 1;
            }
        }
        if !self.authenticated {
            return Err(Bytes::from_static(replies::HELLO_NOAUTH));
        }
        Ok((
            Request::from_args(&args),
            StateChange::Hello { resp3, name },
        ))
    }

    /// Whether the session can move to another backend without losing anything.
    fn at_safe_point(&self) -> bool {
        self.pending.is_empty()
            && !self.in_multi
            && !self.watching
            && !self.state.subscribed()
            && self.reply_mode == ReplyMode::On
    }

    /// Send a request to the confirmed master (connecting or moving first if needed) and
    /// queue its replies.
    async fn forward(
        &mut self,
        req: Request,
        replies: u32,
        on_reply: OnReply,
        retryable: bool,
    ) -> Option<SessionEnd> {
        let master = self.shared.topology.load().master_now();
        let current = self.backend.as_ref().map(|b| b.index);
        if current.is_none() || current != master {
            if current.is_some() && !self.at_safe_point() {
                if self.in_multi || self.watching {
                    // Never half a transaction on each side of a failover.
                    let reply = self.shared.masterdown();
                    self.refuse(reply);
                    return None;
                }
                if self.state.subscribed() {
                    // Pub/sub works on any node: stay where the subscriptions are.
                    return self.push_request(req, replies, on_reply, retryable);
                }
                if self.pending.is_empty() {
                    // Nothing in flight, yet the state (CLIENT REPLY OFF/SKIP) cannot be
                    // replayed on a new link: waiting would never end. Close, as when
                    // such a session's link is lost; the client reconnects.
                    self.client_done = true;
                    self.end.get_or_insert(SessionEnd::BackendLost);
                    return None;
                }
                // Finish what is in flight on the old link first.
                self.held = Some((req, replies, on_reply, retryable));
                return None;
            }
            self.backend = None;
            if let Err(reply) = self.connect_to_master().await {
                if replies > 0 {
                    self.push_local(reply);
                }
                return None;
            }
        }
        self.push_request(req, replies, on_reply, retryable)
    }

    fn push_request(
        &mut self,
        req: Request,
        replies: u32,
        on_reply: OnReply,
        retryable: bool,
    ) -> Option<SessionEnd> {
        let Some(backend) = &mut self.backend else {
            return None;
        };
        backend.out.push(req.frame().clone());
        self.shared.hot.forwarded[self.class].increment(1);
        if replies > 0 {
            self.pending.push_back(Pending::Backend {
                remaining: replies,
                on_reply,
                // Kept for a READONLY retry up to the session's buffer bound; past it a
                // READONLY answer becomes MASTERDOWN (not applied either way), so a
                // big-value pipeline cannot pin its frames until their replies.
                retry: (retryable
                    && replies == 1
                    && self.retained.load(Ordering::Relaxed)
                        < self.rt.config.limits.max_reply_buffer)
                    .then(|| Retained::new(req.frame().clone(), &self.retained)),
                link: Link::Master,
                sent: self.read_at,
            });
        }
        None
    }

    /// After a batch of replies: send a held request once the old link is drained, and
    /// retry READONLY-refused writes once the old link has answered everything.
    async fn after_replies(&mut self) -> Option<SessionEnd> {
        if self.retrying > 0 && !self.waiting_on_backend() {
            self.run_retries().await;
        }
        if self.pending.is_empty() {
            if let Some((req, replies, on_reply, retryable)) = self.held.take() {
                return self.forward(req, replies, on_reply, retryable).await;
            }
        }
        None
    }

    fn waiting_on_backend(&self) -> bool {
        self.pending.iter().any(|p| {
            matches!(
                p,
                Pending::Backend {
                    link: Link::Master,
                    ..
                }
            )
        })
    }

    /// Re-send the writes refused with READONLY to the confirmed master, in order; if no
    /// master appears within the failover wait, answer them `-MASTERDOWN`.
    async fn run_retries(&mut self) {
        self.backend = None;
        let connected = self.connect_to_master().await.is_ok();
        let masterdown = self.shared.masterdown();
        for entry in self.pending.iter_mut() {
            let Pending::Retry(retained) = entry else {
                continue;
            };
            *entry = match (&mut self.backend, connected) {
                (Some(b), true) => {
                    metrics::readonly_retry();
                    b.out.push(retained.frame.clone());
                    // No second retry: a master that also says READONLY gets MASTERDOWN.
                    Pending::Backend {
                        remaining: 1,
                        on_reply: OnReply::Forward,
                        retry: None,
                        link: Link::Master,
                        sent: self.read_at,
                    }
                }
                _ => Pending::Done(masterdown.clone()),
            };
        }
        self.retrying = 0;
        self.drain_locals();
    }

    /// Connect to the confirmed master, waiting up to the failover wait for one. A master
    /// that refuses the connection is reported to the topology (and re-probed at once),
    /// so the wait can end on its successor; one that only does not answer in time stays
    /// the master until `probe.down_after`, and the session keeps trying it meanwhile, as
    /// a client of Redis alone would wait.
    async fn connect_to_master(&mut self) -> Result<(), Bytes> {
        let deadline = tokio::time::Instant::now() + self.rt.config.routing.failover_wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(index) = self.shared.topology.wait_for_master(left).await else {
                return Err(self.shared.masterdown());
            };
            let attempt = tokio::time::Instant::now();
            match self.connect(index).await {
                Ok(()) => return Ok(()),
                Err(reply) => {
                    let topo = self.shared.topology.load();
                    let silent = topo.master_now() == Some(index);
                    let now = tokio::time::Instant::now();
                    if now >= deadline && (!silent || now >= deadline + topo.down_after) {
                        return Err(reply);
                    }
                    if silent {
                        // Still the master yet not connectable (a handshake refused -BUSY):
                        // try again shortly, not in a tight loop.
                        tokio::time::sleep_until(attempt + RECONNECT_PAUSE).await;
                    }
                }
            }
        }
    }

    async fn connect(&mut self, index: usize) -> Result<(), Bytes> {
        self.backend = Some(self.open_link(index).await?);
        Ok(())
    }

    /// Open a backend connection with this session's state replayed.
    async fn open_link(&self, index: usize) -> Result<Backend, Bytes> {
        let Some((cfg, liveness)) = self
            .shared
            .topology
            .load()
            .backends
            .get(index)
            .map(|b| (b.config.clone(), b.liveness.clone()))
        else {
            return Err(local_error("ERR portcullis has no backend configured"));
        };
        let handshake = Handshake {
            db: self.state.db,
            resp3: self.state.resp3,
            client_name: self.state.client_name.clone(),
        };
        let timeout = self.rt.config.limits.connect_timeout;
        let tls = self.rt.backend_tls.as_deref();
        match BackendLink::open(&cfg, &handshake, timeout, self.rt.reply_limits(), tls).await {
            Ok(link) => Ok(Backend {
                index,
                stream: link.stream,
                buf: link.leftover,
                batch: 0,
                scanner: ReplyScanner::new(self.rt.reply_limits()),
                out: OutQueue::default(),
                label: cfg.label().to_string(),
                liveness,
            }),
            Err(e) => {
                // Refused: down at once; timed out: silence, the prober decides.
                self.shared
                    .topology
                    .report_connect_error(index, e.evidence());
                metrics::backend_connect_error(cfg.label());
                warn!(backend = cfg.label(), error = %e, "backend connection failed");
                Err(local_error(&format!(
                    "ERR portcullis cannot reach backend {}: {e}",
                    cfg.label()
                )))
            }
        }
    }

    fn link_mut(&mut self, link: Link) -> &mut Option<Backend> {
        match link {
            Link::Master => &mut self.backend,
            Link::Replica => &mut self.replica,
        }
    }

    fn read_backend(&mut self, link: Link) {
        let now = self.now;
        let Some(backend) = self.link_mut(link) else {
            return;
        };
        match backend
            .stream
            .read_batch(&mut backend.buf, &mut backend.batch)
        {
            Ok(0) => return self.link_lost(link),
            Ok(_) => {
                backend.liveness.record(tokio::time::Instant::from_std(now));
                self.replies_at = self.now;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "backend read failed");
                return self.link_lost(link);
            }
        }
        loop {
            let Some(backend) = self.link_mut(link) else {
                return;
            };
            match backend.scanner.next(&mut backend.buf) {
                Ok(Some(reply)) => {
                    if !self.on_reply(reply, link) {
                        let label = self
                            .link_mut(link)
                            .as_ref()
                            .map(|b| b.label.clone())
                            .unwrap_or_default();
                        warn!(peer = %self.peer, backend = %label, "backend sent an unexpected reply; closing session");
                        self.client_done = true;
                        self.end = Some(SessionEnd::BackendDesync);
                        self.backend = None;
                        self.replica = None;
                        self.pending.clear();
                        return;
                    }
                }
                Ok(None) => {
                    release_if_big(&mut backend.buf);
                    return;
                }
                Err(e) => {
                    let label = backend.label.clone();
                    warn!(peer = %self.peer, backend = %label, error = %e, "backend protocol error");
                    return self.link_lost(link);
                }
            }
        }
    }

    /// Match one backend reply; `false` when nothing was waiting for it.
    fn on_reply(&mut self, reply: Reply, link: Link) -> bool {
        // The entry this reply answers: the first one still waiting on this link (the
        // head, unless replies from the other link or retries are outstanding before it).
        let index = match self.pending.front() {
            Some(Pending::Backend { link: l, .. }) if *l == link => 0,
            _ => self
                .pending
                .iter()
                .position(|p| matches!(p, Pending::Backend { link: l, .. } if *l == link))
                .unwrap_or(usize::MAX),
        };
        // Out-of-band frames: RESP3 pushes (except pub/sub confirmations we wait for) and
        // RESP2 pub/sub messages while subscribed.
        let head_pubsub = match self.pending.get(index) {
            Some(Pending::Backend {
                on_reply: OnReply::PubSub { kind, all },
                ..
            }) => Some((*kind, *all)),
            _ => None,
        };
        let confirmation = if head_pubsub.is_some()
            && matches!(reply.kind(), ReplyKind::Array | ReplyKind::Push)
        {
            pubsub_confirmation(&reply)
        } else {
            None
        };
        if confirmation.is_none()
            && (reply.is_push()
                || (!self.state.resp3 && self.state.subscribed() && is_message(&reply)))
        {
            self.to_client.push(reply.into_frame());
            return true;
        }

        let readonly = reply.is_error() && reply.error_code() == Some(b"READONLY".as_slice());
        if link == Link::Master
            && reply.is_error()
            && reply.error_code() == Some(b"MASTERDOWN".as_slice())
        {
            // Only a replica says MASTERDOWN: evidence this is no longer the master.
            if let Some(b) = self.backend.as_ref().map(|b| b.index) {
                self.shared.topology.report_not_master(b, "-MASTERDOWN");
            }
        }
        let is_error = reply.is_error() || reply.kind() == ReplyKind::Null;
        let backend_index = match link {
            Link::Master => self.backend.as_ref().map(|b| b.index),
            Link::Replica => None,
        };
        let Some(Pending::Backend { retry, .. }) = self.pending.get_mut(index) else {
            return false;
        };
        let mut out = reply.into_frame();
        if readonly {
            // Redis did not apply it. Stop routing writes there, and retry or explain.
            if let Some(b) = backend_index {
                self.shared.topology.report_readonly(b);
            }
            if let Some(req) = retry.take() {
                self.pending[index] = Pending::Retry(req);
                self.retrying += 1;
                return true;
            }
            out = self.shared.masterdown();
        }
        let Some(Pending::Backend {
            remaining,
            on_reply,
            ..
        }) = self.pending.get_mut(index)
        else {
            return false;
        };
        let done = match on_reply {
            OnReply::PubSub { all, .. } => {
                let all = *all;
                match (confirmation, head_pubsub) {
                    (Some((name, channel)), Some((kind, _))) => {
                        let set = self.state.set(kind);
                        if name.ends_with(b"unsubscribe") {
                            if let Some(c) = &channel {
                                set.remove(c);
                            }
                        } else if let Some(c) = channel {
                            set.insert(c);
                        }
                        *remaining = remaining.saturating_sub(1);
                        if all {
                            set.is_empty()
                        } else {
                            *remaining == 0
                        }
                    }
                    // An error (or anything else) answers the whole command.
                    _ => true,
                }
            }
            OnReply::Replace(local) => {
                out = local.clone();
                *remaining -= 1;
                *remaining == 0
            }
            OnReply::Forward | OnReply::Apply(_) => {
                *remaining -= 1;
                *remaining == 0
            }
        };
        if !done {
            // Multi-reply commands (SUBSCRIBE a b c) only run without retries pending.
            self.to_client.push(out);
            return true;
        }
        let entry = std::mem::replace(&mut self.pending[index], Pending::Done(out));
        if let Pending::Backend { sent, on_reply, .. } = &entry {
            if !matches!(on_reply, OnReply::PubSub { .. }) {
                self.shared
                    .hot
                    .request_duration
                    .record(self.replies_at.saturating_duration_since(*sent));
            }
        }
        if let Pending::Backend {
            on_reply: OnReply::Apply(change),
            ..
        } = entry
        {
            if !is_error {
                self.state.apply(change);
            }
        }
        self.drain_locals();
        true
    }

    /// Emit proxy replies, held replies (and QUIT's close) that reached the head.
    fn drain_locals(&mut self) {
        loop {
            match self.pending.front() {
                Some(Pending::Local(_)) | Some(Pending::Done(_)) => {
                    if let Some(Pending::Local(b) | Pending::Done(b)) = self.pending.pop_front() {
                        self.to_client.push(b);
                    }
                }
                Some(Pending::Close) => {
                    self.pending.clear();
                    self.end.get_or_insert(SessionEnd::Quit);
                    self.backend = None;
                    return;
                }
                _ => return,
            }
        }
    }

    /// A backend connection ended: answer what was in flight on it (in order), then keep
    /// the client if nothing stateful was lost. Writes refused with READONLY keep their
    /// retry.
    fn link_lost(&mut self, link: Link) {
        let label = self
            .link_mut(link)
            .take()
            .map(|b| b.label)
            .unwrap_or_default();
        let lost = |p: &Pending| matches!(p, Pending::Backend { link: l, .. } if *l == link);
        let in_flight = self.pending.iter().filter(|p| lost(p)).count();
        if in_flight > 0 {
            metrics::backend_lost(&label);
            warn!(peer = %self.peer, backend = %label, in_flight, "backend connection lost with requests in flight");
        }
        let err = local_error(&format!(
            "ERR portcullis lost the connection to backend {label}; the command may or may not have been applied"
        ));
        for entry in self.pending.iter_mut() {
            if lost(entry) {
                *entry = Pending::Done(err.clone());
            }
        }
        self.drain_locals();
        let stateful = link == Link::Master
            && (self.in_multi
                || self.watching
                || self.state.subscribed()
                || self.reply_mode != ReplyMode::On);
        if stateful {
            self.client_done = true;
            self.end.get_or_insert(SessionEnd::BackendLost);
        }
        // Requests may wait in the client buffer for room that just opened.
        self.resume_parse = true;
    }
}

/// `(confirmation name, channel)` of a pub/sub confirmation array or push.
fn pubsub_confirmation(reply: &Reply) -> Option<(&'static [u8], Option<Bytes>)> {
    let items = reply.items()?;
    let Item::Str(name) = items.first()? else {
        return None;
    };
    const NAMES: [&[u8]; 6] = [
        b"subscribe",
        b"unsubscribe",
        b"psubscribe",
        b"punsubscribe",
        b"ssubscribe",
        b"sunsubscribe",
    ];
    let known = NAMES.iter().find(|n| n.eq_ignore_ascii_case(name))?;
    let channel = match items.get(1) {
        Some(Item::Str(c)) => Some(Bytes::copy_from_slice(c)),
        _ => None,
    };
    Some((known, channel))
}

/// A RESP2 pub/sub message (`message`, `pmessage`, `smessage` array).
fn is_message(reply: &Reply) -> bool {
    if reply.kind() != ReplyKind::Array {
        return false;
    }
    match reply.items().as_deref() {
        Some([Item::Str(name), ..]) => {
            [b"message".as_slice(), b"pmessage", b"smessage"].contains(name)
        }
        _ => false,
    }
}

async fn readable(stream: Option<&Stream>) {
    match stream {
        Some(s) => {
            let _ = s.readable().await;
        }
        None => std::future::pending().await,
    }
}

async fn writable(stream: Option<&Stream>) {
    match stream {
        Some(s) => {
            let _ = s.writable().await;
        }
        None => std::future::pending().await,
    }
}

async fn idle_sleep(d: Duration) {
    tokio::time::sleep(d).await
}

async fn frame_sleep(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
