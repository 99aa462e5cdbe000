//! One client connection: read → parse → classify → authorize → plan → forward → match
//! replies, as small parts wired here:
//!
//! - `plan`: what a classified request asks of the session (pure);
//! - `queue`: what each request is owed, in order, and Redis's `CLIENT REPLY` rules;
//! - `state`: what the connection carries (db, protocol, name, tracking, subscriptions,
//!   MONITOR) and the open transaction;
//! - `upstream`: the session's backend connections, each a stream with its queues;
//! - `out`: bytes waiting for a socket.
//!
//! Lifecycle (one task per client), `Phase`:
//! 1. `Open`: reads client bytes, parses requests, answers or forwards each in order.
//! 2. `Draining` (shutdown): still serving; ends between two requests, at the first
//!    moment when nothing the client sent is unanswered and nothing more is arriving.
//! 3. `InputClosed` (the client closed its sending side): handles what it had sent,
//!    then half-closes the backend connections, so Redis answers what it read and
//!    closes, exactly as for a client half-closing to it directly; ends once answered.
//! 4. `Ending(why)`: reads nothing more; ends once what is owed is written.
//!
//! A backend connection that ends answers what was in flight on it with an error; the
//! session keeps the client when its state can be replayed on a fresh connection, and
//! closes it (as Redis would) when it cannot (`ConnState::pinned`, transactions). In
//! cluster mode, subscriptions are made again on a confirmed master, hidden
//! (`cluster::cluster_resubscribe`).
//!
//! Must not block on one direction while the other could make progress: all socket I/O is
//! readiness-driven and non-blocking.

mod cluster;
mod out;
mod plan;
mod pool;
mod queue;
mod scripts;
mod state;
mod upstream;
mod wake;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use arc_swap::ArcSwap;

use crate::auth::{Credentials, ProxyAuthAnswer, User};
use crate::backend::{LinkAuth, MasterCache, TopologyStore};
use crate::command::{self, AclCategories, CommandSpec, Flags, Lookup, Special};
use crate::config::{BackendConnections, ReadPolicy};
use crate::metrics::{self, Hot};
use crate::net::Stream;
use crate::policy::{self, ProtectionMode, Verdict};
use crate::protocol::{texts, ProtocolError, Reply, ReplyKind, Request, RequestParser};
use crate::runtime::Runtime;

use out::OutQueue;
use plan::Plan;
pub use pool::Pools;
use pool::{Delivery, SharedLink};
use queue::{Awaiting, Entry, ReplyMode, ReplyQueue, Retained, Unsent};
pub use scripts::ScriptCache;
use state::{ConnState, Effect, ExecPlan, OnReply, StateChange, Transaction};
use upstream::{Link, LinkEnd, LinkId, Upstream};
use wake::Source;

/// An empty read buffer larger than this is released (after a big value went through).
const READ_KEEP: usize = 64 * 1024;
/// Shortest time between two connect attempts to a master that is silent or busy.
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Give back an emptied buffer that grew for a big frame.
fn release_if_big(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > READ_KEEP {
        *buf = BytesMut::new();
    }
}

/// What every session shares: the reloadable runtime, the topology, metric handles.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub hot: Hot,
    pub topology: Arc<TopologyStore>,
    /// Shared backend connections (`routing.backend_connections = "shared"`).
    pub pools: Pools,
    /// Cluster mode (`[cluster]`): the slot map and per-shard masters.
    pub cluster: Option<Arc<crate::cluster::ClusterStore>>,
    /// Script bodies seen, loaded again where `EVALSHA` meets `-NOSCRIPT`.
    pub scripts: ScriptCache,
}

impl Shared {
    /// `-MASTERDOWN` with what the proxy knows about every backend.
    fn masterdown(&self) -> Bytes {
        metrics::no_master();
        texts::masterdown(&self.topology.load().explain())
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
    #[error("pass-through: the backend refused this client's credentials on a new link")]
    CredentialsRefused,
    #[error("backend sent a reply nobody asked for")]
    BackendDesync,
    #[error("client idle timeout")]
    Idle,
    #[error("client did not complete a request frame within limits.frame_timeout")]
    FrameTimeout,
    #[error("proxy shutting down")]
    Shutdown,
    #[error("session had nothing left to wait for (a proxy defect)")]
    Stalled,
}

/// Where a session is in its life (see the module header).
#[derive(Debug)]
enum Phase {
    Open,
    Draining,
    InputClosed,
    Ending(SessionEnd),
}

/// A request on its way to a backend, with what its answer is owed. Parked when it must
/// wait for the session's in-flight answers before moving to a new master (never sent
/// to the old one).
#[derive(Debug)]
struct Outgoing {
    /// The request's canonical frame (its arguments were needed only to plan it).
    frame: Bytes,
    /// Frames its answer takes.
    frames: u32,
    /// Whether the answer reaches the client (`CLIENT REPLY`).
    deliver: bool,
    on_reply: OnReply,
    /// A plain write, retried on the confirmed master after `-READONLY`.
    retryable: bool,
    /// It can wait indefinitely (`CommandSpec::may_block`).
    blocking: bool,
    /// `WAIT`/`WAITAOF` after writes that went through a shared connection: a hidden
    /// propagated no-op goes first on the same link (see `pool::wait_offset_bump`).
    bump_write_offset: bool,
}

impl Outgoing {
    /// A request answered by one frame, with no special handling.
    fn plain(req: Request, deliver: bool) -> Outgoing {
        Outgoing {
            frame: req.into_frame(),
            frames: 1,
            deliver,
            on_reply: OnReply::Forward,
            retryable: false,
            blocking: false,
            bump_write_offset: false,
        }
    }
}

/// The part of handling a request that waits (see `Session::deferred`).
#[derive(Debug)]
enum Deferred {
    /// Connect to (or move to) the confirmed master, or cluster routing that waits.
    Send(Outgoing),
    /// A script-control command for the busy backend (`forward_to_script`).
    Script { index: usize, req: Request },
    /// A read for a replica link (`forward_read`).
    Read {
        req: Request,
        deliver: bool,
        class: usize,
    },
}

/// Why a session could not open a backend link.
#[derive(Debug)]
struct LinkFailure {
    /// The error reply owed to the request that needed the link.
    reply: Bytes,
    /// Pass-through: Redis refused the client's own credentials; the backend itself is
    /// fine (never reported unreachable) and the session closes.
    credentials_refused: bool,
}

impl LinkFailure {
    fn unreachable(reply: Bytes) -> LinkFailure {
        LinkFailure {
            reply,
            credentials_refused: false,
        }
    }
}

/// Serve one client connection until it ends.
pub async fn run(
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let tls = shared.runtime.load().client_tls.clone();
    let local = client.local_addr().ok();
    let mut client = match tls {
        None => Stream::plain(client),
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
    session.cl.local = local;
    let end = match session.serve(&mut client, &shutdown).await {
        Ok(never) => match never {},
        Err(end) => end,
    };
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

/// The loop never ends with `Ok`.
enum Never {}

struct Session {
    peer: SocketAddr,
    shared: Arc<Shared>,
    /// The runtime (config, policy, users) this session applies; refreshed at each parse.
    rt: Arc<Runtime>,
    phase: Phase,
    parser: RequestParser,
    client_buf: BytesMut,
    /// Bytes of the client's previous read batch (sizes the next read).
    client_batch: usize,
    /// When the incomplete frame at the front of `client_buf` was first seen: it must be
    /// complete within `limits.frame_timeout` (slow senders). Restarted when the session
    /// resumes reading its client after back-pressure, which is not the client's fault.
    partial_since: Option<Instant>,
    to_client: OutQueue,
    upstream: Upstream,
    queue: ReplyQueue,
    mode: ReplyMode,
    state: ConnState,
    txn: Option<Transaction>,
    watching: bool,
    /// Clients must AUTH first when users are configured.
    authenticated: bool,
    /// The user this connection authenticated as (its policy applies).
    user: Option<Arc<User>>,
    parked: Option<Outgoing>,
    /// A request whose sending has to wait (a link to open first): carried out, awaited,
    /// before the next request is handled (`run_deferred`). The common path never waits,
    /// so it runs as plain function calls.
    deferred: Option<Deferred>,
    /// Parse nothing more until everything sent is answered: an EXEC whose transaction
    /// changes `CLIENT REPLY` is in flight (whether later answers are delivered depends
    /// on its outcome), or, in pass-through under pre-auth bounds, an AUTH (Redis runs it
    /// before it parses the next command, and its bounds depend on the outcome).
    barrier: bool,
    /// An EXEC that sets `CLIENT REPLY` is in flight: the mode comes from its answer.
    mode_pending: bool,
    /// Bytes of forwarded writes kept for a READONLY retry (`Retained`).
    retained: Arc<AtomicUsize>,
    /// The confirmed master as last looked up (`TopologyStore::master_cached`).
    master_cache: MasterCache,
    /// The clock, read once per event (after each wake-up).
    now: Instant,
    /// When the latest client bytes were read: the start of their requests' latency.
    read_at: Instant,
    /// When the latest backend bytes were read: the end of their replies' latency.
    replies_at: Instant,
    /// The request being handled may use a shared connection (`pool::shareable_command`).
    cmd_shareable: bool,
    /// Shared mode: the session keeps its own link for good. Set once the client has seen
    /// its connection's id (`CLIENT ID`, `CLIENT INFO`, `HELLO`: Redis keeps one id per
    /// connection, and a move to a shared connection and back would change it) or has
    /// used `WAIT`/`WAITAOF` (they count this connection's writes). RESET keeps it.
    own_link: bool,
    /// Shared mode: requests went through a shared connection, or the session's own link
    /// was released, since the last offset bump: the next `WAIT`/`WAITAOF` outside MULTI
    /// must first make its link's write offset cover them (any command may write: a
    /// script, a blocking move).
    wait_needs_bump: bool,
    /// Metrics of this wake-up, recorded once per wake-up (`Tally::record`).
    tally: Tally,
    /// Whether the previous wait read the client (see the frame clock in `wait`).
    client_was_read: bool,
    /// The client, master link and shutdown token wake the session through their own
    /// wakers (`wake.rs`): a source still waiting with its waker is not polled again.
    sources: wake::Sources,
    /// The client socket's read readiness is registered with its waker, not fired since.
    client_armed: bool,
    /// Cluster mode: routing state of this session (`cluster.rs`).
    cl: cluster::ClusterSession,
}

/// Per-wake-up metrics: counted in the session, handed to the recorder once per wake-up
/// instead of once per command.
#[derive(Debug, Default)]
struct Tally {
    /// Forwarded commands by class (`metrics::CLASSES`).
    forwarded: [u64; 3],
    /// When the oldest request answered in this wake-up was read: its latency, up to
    /// `Session::replies_at`, is the wake-up's one histogram sample (the longest one;
    /// one subtraction per wake-up instead of one per reply).
    oldest_answered: Option<Instant>,
}

impl Tally {
    /// Whether anything waits to be recorded.
    fn pending(&self) -> bool {
        self.oldest_answered.is_some() || self.forwarded.iter().any(|&n| n > 0)
    }

    fn record(&mut self, hot: &Hot, replies_at: Instant) {
        for (class, n) in self.forwarded.iter_mut().enumerate() {
            if *n > 0 {
                hot.forwarded[class].increment(std::mem::take(n));
            }
        }
        if let Some(sent) = self.oldest_answered.take() {
            hot.request_duration
                .record(replies_at.saturating_duration_since(sent));
        }
    }
}

/// What woke the session up.
enum Event {
    ClientReadable,
    BackendReadable(LinkId),
    /// Replies (or a failure) from the session's shared connection.
    Shared(Delivery),
    /// Cluster mode: replies from a node's shared connection.
    SharedNode(LinkId, Delivery),
    Writable,
    Idle,
    FrameTimeout,
    Shutdown,
}

impl Session {
    fn new(peer: SocketAddr, shared: Arc<Shared>) -> Session {
        let rt = shared.runtime.load_full();
        let authenticated = !rt.users.enabled();
        let now = Instant::now();
        Session {
            peer,
            parser: RequestParser::new(rt.request_limits(authenticated)),
            rt,
            phase: Phase::Open,
            authenticated,
            user: None,
            shared,
            client_buf: BytesMut::new(),
            client_batch: 0,
            partial_since: None,
            to_client: OutQueue::default(),
            upstream: Upstream::default(),
            queue: ReplyQueue::default(),
            mode: ReplyMode::default(),
            state: ConnState::default(),
            txn: None,
            watching: false,
            parked: None,
            deferred: None,
            master_cache: MasterCache::default(),
            barrier: false,
            mode_pending: false,
            retained: Arc::new(AtomicUsize::new(0)),
            now,
            read_at: now,
            replies_at: now,
            cmd_shareable: false,
            own_link: false,
            wait_needs_bump: false,
            tally: Tally::default(),
            client_was_read: true,
            sources: wake::Sources::default(),
            client_armed: false,
            cl: cluster::ClusterSession::default(),
        }
    }

    /// Whether the session still takes requests from the client.
    fn reading(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Draining)
    }

    /// End for `why` once what is owed is written (a first reason sticks).
    fn end_after_replies(&mut self, why: SessionEnd) {
        if !matches!(self.phase, Phase::Ending(_)) {
            self.phase = Phase::Ending(why);
        }
    }

    /// Whether requests may be taken from the client buffer now.
    fn may_parse(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open | Phase::Draining | Phase::InputClosed
        ) && self.parked.is_none()
            && self.queue.retries() == 0
            && !self.cl.resubscribing()
            && !self.barrier
            && self.cl.parked.is_none()
            && self.queue.len() < self.rt.config.limits.max_pending
    }

    async fn serve(
        &mut self,
        client: &mut Stream,
        shutdown: &CancellationToken,
    ) -> Result<Never, SessionEnd> {
        // One wait on the token for the whole session: a new `cancelled()` per wake-up
        // would join and leave the token's waiter list (a lock each) every time.
        let mut shutdown = ShutdownWait {
            cancelled: std::pin::pin!(shutdown.cancelled()),
            armed: false,
        };
        loop {
            // Before progress (which may wait, e.g. for a confirmed master): what the last
            // event produced goes out first. After it: what progress produced. Each only
            // when something waits, so a wake-up pays for one flush, not two.
            if self.output_waiting(client) {
                self.flush(client).map_err(SessionEnd::ClientIo)?;
            }
            self.progress(client).await?;
            if self.output_waiting(client) {
                self.flush(client).map_err(SessionEnd::ClientIo)?;
            }
            if self.retries_ready() {
                // A link lost while writing left requests it never wrote, to retry now:
                // no event would come for them.
                continue;
            }
            if let Some(end) = self.finished(client) {
                return Err(end);
            }
            let event = self.wait(client, &mut shutdown).await?;
            self.now = Instant::now();
            match event {
                Event::ClientReadable => self.read_client(client)?,
                Event::BackendReadable(link) => self.read_backend(link),
                Event::Shared(delivery) => self.on_deliveries(delivery),
                Event::SharedNode(id, delivery) => self.on_node_deliveries(id, delivery),
                Event::Writable => {}
                Event::Idle => {
                    if self.queue.is_empty() {
                        return Err(SessionEnd::Idle);
                    }
                }
                Event::FrameTimeout => {
                    metrics::protocol_error("frame_timeout");
                    return Err(SessionEnd::FrameTimeout);
                }
                Event::Shutdown => {
                    if matches!(self.phase, Phase::Open) {
                        self.phase = Phase::Draining;
                    }
                }
            }
        }
    }

    /// One progress step: retries and a parked request first (they come before anything
    /// parsed after them), then the requests already buffered, then what a phase asks.
    async fn progress(&mut self, client: &mut Stream) -> Result<(), SessionEnd> {
        if self.barrier && self.queue.is_empty() {
            self.barrier = false;
        }
        if self.cl.resubscribing() {
            // Before anything read after the loss: the subscriptions come first.
            Box::pin(self.cluster_resubscribe()).await;
        }
        if self.queue.retries() > 0 && self.retries_ready() {
            self.run_retries().await;
        }
        if self.queue.is_empty() {
            if let Some(p) = self.parked.take() {
                self.send_waiting(p).await;
            }
        }
        self.parse_buffered().await?;
        // Cluster mode: a split or fan-out request held until the answers before it were
        // in; what follows it is parsed once it is answered.
        while self.cl.parked.is_some() && self.queue.is_empty() {
            // Boxed (cluster mode only): the session's future stays small otherwise.
            Box::pin(self.run_gather()).await;
            self.parse_buffered().await?;
        }
        match self.phase {
            Phase::InputClosed if self.parked.is_none() && self.queue.retries() == 0 => {
                // Everything the client sent is with the backends. Answers still coming
                // are delivered; but a command that may wait indefinitely (BLPOP) must not
                // outlive its client: pass the half-close on, and Redis frees the client
                // as it would a half-closed direct one (nothing popped, nothing after it
                // run).
                let nodes = cluster::node_ids(&self.upstream.nodes);
                for id in [LinkId::Master, LinkId::Replica].into_iter().chain(nodes) {
                    if self.queue.blocking_on(id) {
                        if let Some(link) = self.upstream.get_mut(id) {
                            link.shutdown_when_flushed();
                        }
                    }
                }
            }
            Phase::Draining if self.quiet() => {
                // Between two requests: close unless more is arriving already.
                match client.read_batch(&mut self.client_buf, &mut self.client_batch) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.end_after_replies(SessionEnd::Shutdown)
                    }
                    Ok(0) => self.end_after_replies(SessionEnd::ClientClosed),
                    Ok(n) => {
                        self.read_at = self.now;
                        self.shared.hot.bytes_in.increment(n as u64);
                        self.parse_buffered().await?;
                    }
                    Err(e) => return Err(SessionEnd::ClientIo(e)),
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Retries are waiting and every link has answered what was sent before them, or
    /// (cluster mode) subscriptions of a lost node are to be made again.
    fn retries_ready(&self) -> bool {
        self.cl.resubscribing()
            || self.queue.retries() > 0
                && !self.queue.waiting_on(LinkId::Master)
                && !self.queue.waiting_on(LinkId::Shared)
                && !self.queue.waiting_on_nodes()
    }

    /// Nothing owed to the client and nothing of it buffered or in progress.
    fn quiet(&self) -> bool {
        self.queue.is_empty()
            && self.to_client.is_empty()
            && self.parked.is_none()
            && self.client_buf.is_empty()
    }

    /// The reason to end now, once everything owed is written.
    fn finished(&mut self, client: &mut Stream) -> Option<SessionEnd> {
        if !(self.to_client.is_empty() && self.queue.is_empty() && self.parked.is_none()) {
            return None;
        }
        if matches!(self.phase, Phase::Open) {
            return None;
        }
        // Written means on the socket: replies still in the batch of sends go now, and
        // what it did not take is waited for (`wants_flush`). An error here is the
        // client's: nothing more can reach it, and the session ends for the reason it
        // was already ending for, if it had one.
        let unreachable = client.settle().is_err();
        if !unreachable && client.wants_flush() {
            return None;
        }
        match &self.phase {
            Phase::Ending(_) => match std::mem::replace(&mut self.phase, Phase::InputClosed) {
                Phase::Ending(end) => Some(end),
                _ => None,
            },
            // Nothing more can arrive and nothing is owed (with nothing owed, parsing was
            // not held back, so what is left in the buffer is an incomplete frame, which
            // Redis discards too): done.
            Phase::InputClosed => Some(SessionEnd::ClientClosed),
            _ if unreachable => Some(SessionEnd::ClientClosed),
            _ => None,
        }
    }

    /// Wait for the next thing to do.
    async fn wait(
        &mut self,
        client: &Stream,
        shutdown: &mut ShutdownWait<'_, impl Future<Output = ()>>,
    ) -> Result<Event, SessionEnd> {
        let limits = &self.rt.config.limits;
        let idle = limits.idle_timeout;
        // Requests waiting for a slow backend are held to the same bound as replies
        // waiting for a slow client: the proxy stops reading a pipeline Redis is not
        // taking instead of buffering all of it.
        let read_client = self.reading()
            && self.may_parse()
            && self.to_client.bytes < limits.max_reply_buffer
            && self.upstream.queued_bytes() < limits.max_reply_buffer;
        if !read_client || !self.client_was_read {
            // The frame clock runs only while the client is read: back-pressure is not
            // its fault. Restarted at every wake-up while it is not read, and at the
            // wake-up where reading resumes (a stall between two wake-ups must not count).
            if let Some(since) = &mut self.partial_since {
                *since = self.now;
            }
        }
        self.client_was_read = read_client;
        let frame_deadline = match self.partial_since {
            Some(since) if read_client && !limits.frame_timeout.is_zero() => {
                Some(tokio::time::Instant::from_std(since + limits.frame_timeout))
            }
            _ => None,
        };
        let upstream = &mut self.upstream;
        let read_replies =
            self.to_client.bytes < limits.max_reply_buffer && upstream.own_links().next().is_some();
        let links_out = upstream.links_want_write();
        let shared_links = upstream.shared.is_some() || !upstream.shared_nodes.is_empty();
        let client_out = !self.to_client.is_empty() || client.wants_flush();
        let draining = !matches!(self.phase, Phase::Open);
        // Timers are built only when first polled: `idle_sleep` once per wait, when there
        // is an idle timeout.
        let mut idle_timer = std::pin::pin!(idle_sleep(idle));
        let mut frame_timer = std::pin::pin!(frame_sleep(frame_deadline));
        let sources = &mut self.sources;
        let client_armed = &mut self.client_armed;
        // Each source in turn, in this order (what `select!` with `biased` would do,
        // without building a future per source at every wake-up). Every source polled
        // `Pending` has registered the task to be woken: the client, the master link and
        // the shutdown token through their own wakers (`wake.rs`), so that one still
        // registered (armed) is skipped until its waker fires.
        std::future::poll_fn(|cx| {
            let fired = sources.begin(cx);
            if fired.has(Source::Client) {
                *client_armed = false;
            }
            if fired.has(Source::Master) {
                upstream.disarm_master();
            }
            if fired.has(Source::Shutdown) {
                shutdown.armed = false;
            }
            // Output handed to the batch of sends came back: the loop writes it.
            if fired.has(Source::Output) {
                return Poll::Ready(Ok(Event::Writable));
            }
            // tokio's per-task budget first, as `select!` does: a session that used its
            // turn yields (woken again after the I/O driver ran) instead of taking a
            // source that does not count against the budget (shared deliveries, a TLS
            // client's decrypted bytes) ahead of the backends it would skip. Checking
            // spends nothing: the guard gives the unit back when dropped.
            if tokio::task::coop::poll_proceed(cx).is_pending() {
                return Poll::Pending;
            }
            let mut waiting = false;
            // Backends first: a link Redis closed while idle is noticed (and dropped
            // without a word) before a request that arrived at the same time is sent on it.
            if read_replies {
                waiting = true;
                let mut master_cx = Context::from_waker(sources.waker(Source::Master));
                if let Poll::Ready(id) = upstream.poll_readable(cx, &mut master_cx) {
                    return Poll::Ready(Ok(Event::BackendReadable(id)));
                }
            }
            // Replies from a shared connection are in the proxy already: always taken.
            if shared_links {
                waiting = true;
                match upstream.poll_shared(cx) {
                    Poll::Ready((LinkId::Shared, d)) => return Poll::Ready(Ok(Event::Shared(d))),
                    Poll::Ready((id, d)) => return Poll::Ready(Ok(Event::SharedNode(id, d))),
                    Poll::Pending => {}
                }
            }
            if read_client {
                waiting = true;
                if !*client_armed {
                    let mut client_cx = Context::from_waker(sources.waker(Source::Client));
                    match client.poll_readable(&mut client_cx) {
                        Poll::Ready(Ok(())) => return Poll::Ready(Ok(Event::ClientReadable)),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionEnd::ClientIo(e))),
                        Poll::Pending => *client_armed = true,
                    }
                }
            }
            if client_out {
                waiting = true;
                if client.poll_writable(cx).is_ready() {
                    return Poll::Ready(Ok(Event::Writable));
                }
            }
            if links_out {
                waiting = true;
                if upstream.poll_writable(cx).is_ready() {
                    return Poll::Ready(Ok(Event::Writable));
                }
            }
            if !idle.is_zero() {
                waiting = true;
                if idle_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Event::Idle));
                }
            }
            if frame_deadline.is_some() {
                waiting = true;
                if frame_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Event::FrameTimeout));
                }
            }
            // Once draining, the token stays cancelled: polling it again would spin.
            if !draining {
                waiting = true;
                let mut shutdown_cx = Context::from_waker(sources.waker(Source::Shutdown));
                if shutdown.poll(&mut shutdown_cx).is_ready() {
                    return Poll::Ready(Ok(Event::Shutdown));
                }
            }
            if waiting {
                Poll::Pending
            } else {
                // Nothing could ever wake the session (no state leads here): end it
                // rather than leave it parked for good.
                Poll::Ready(Err(SessionEnd::Stalled))
            }
        })
        .await
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

    /// Whether `flush` has anything to do: metrics of this wake-up, requests for a
    /// backend, a half-close to pass on, replies or TLS records for the client. Must
    /// cover everything `flush` writes, or output would wait for an unrelated event.
    fn output_waiting(&self, client: &Stream) -> bool {
        let up = &self.upstream;
        self.tally.pending()
            || !self.to_client.is_empty()
            || client.wants_flush()
            || up.links_want_write()
            || up.shared_links().any(SharedLink::has_batch)
    }

    /// Write what every socket takes now. Errors on the backend side are handled as a
    /// lost backend; only client errors are returned.
    fn flush(&mut self, client: &mut Stream) -> io::Result<()> {
        if let Some(shared) = &mut self.upstream.shared {
            shared.flush();
        }
        for shared in self.upstream.shared_nodes.iter_mut().flatten() {
            shared.flush();
        }
        // Cluster node links only in cluster mode (no allocation otherwise).
        let nodes = if self.upstream.nodes.is_empty() {
            Vec::new()
        } else {
            cluster::node_ids(&self.upstream.nodes)
        };
        for id in [LinkId::Master, LinkId::Replica].into_iter().chain(nodes) {
            if let Some(link) = self.upstream.get_mut(id) {
                if let Err(e) = link.flush(Some(self.sources.waker(wake::Source::Output))) {
                    debug!(peer = %self.peer, error = %e, "backend write failed");
                    self.link_lost(id, LinkEnd::Io(e));
                }
            }
        }
        // After the backend writes: a forwarded count seen in the metrics means its
        // request went out on its own link (`tests/stall.rs` orders two clients by it).
        self.tally.record(&self.shared.hot, self.replies_at);
        if !self.to_client.is_empty() {
            let batch = self.sources.waker(wake::Source::Output);
            let n = self.to_client.try_write_batched(client, batch)?;
            self.shared.hot.bytes_out.increment(n as u64);
        }
        client.flush_pending()
    }

    fn read_client(&mut self, client: &mut Stream) -> Result<(), SessionEnd> {
        match client.read_batch(&mut self.client_buf, &mut self.client_batch) {
            // End of input: what was sent before it is still answered.
            Ok(0) => self.phase = Phase::InputClosed,
            Ok(n) => {
                self.read_at = self.now;
                self.shared.hot.bytes_in.increment(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // A TLS client that closed without close_notify (common; not an attack).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.phase = Phase::InputClosed,
            Err(e) => return Err(SessionEnd::ClientIo(e)),
        }
        Ok(())
    }

    /// Handle the requests already buffered, as far as the session may take them.
    async fn parse_buffered(&mut self) -> Result<(), SessionEnd> {
        if self.client_buf.is_empty() {
            return Ok(());
        }
        self.refresh_runtime();
        self.sync_passthrough_limits();
        while self.may_parse() {
            match self.parser.parse(&mut self.client_buf) {
                Ok(Some(req)) => {
                    self.partial_since = None;
                    self.on_request(req)?;
                    if self.deferred.is_some() {
                        self.run_deferred().await;
                    }
                }
                Ok(None) => {
                    release_if_big(&mut self.client_buf);
                    if self.client_buf.is_empty() {
                        self.partial_since = None;
                    } else {
                        self.partial_since.get_or_insert(self.now);
                    }
                    break;
                }
                Err(e) => {
                    metrics::protocol_error("client");
                    let deliver = self.mode.delivers();
                    self.push_local(deliver.then(|| e.to_reply()));
                    self.end_after_replies(SessionEnd::Protocol(e));
                    break;
                }
            }
        }
        Ok(())
    }

    /// Queue a proxy-produced answer in order (`None`: silenced by CLIENT REPLY).
    fn push_local(&mut self, reply: Option<Bytes>) {
        if reply.is_some() && self.may_push() {
            self.anchor_local_answer();
        }
        self.queue.push_local(&mut self.to_client, reply);
    }

    /// Whether the session's master link can carry frames that answer no request and
    /// that a local answer must not overtake: tracking invalidations and pub/sub
    /// messages. Not in cluster mode (they come from several nodes), inside MULTI (the
    /// anchor would be queued into the transaction), under MONITOR (Redis would feed the
    /// anchor back as a monitor line) or in pass-through (a user without `+ping` would
    /// get an `ACL LOG` entry per local answer).
    fn may_push(&self) -> bool {
        (self.state.tracking || self.state.subscribed())
            && !self.state.monitor
            && self.txn.is_none()
            && self.shared.cluster.is_none()
            && !self.rt.passthrough()
            && self.upstream.master.is_some()
    }

    /// Put a hidden `PING` on the master link ahead of a local answer, which then waits
    /// for its reply. Every push or message Redis sent before it would have run the
    /// answered command reaches the client first, as from Redis directly (an
    /// invalidation Redis queued together with another client's write, but wrote out a
    /// moment after that write's `+OK`, still comes before `CLIENT REPLY ON`'s `+OK`).
    /// `PING` is allowed in a RESP2 subscribed context, and its reply (`+PONG`, or
    /// `pong` in an array there) is no message. Not needed when the link's last request
    /// came from the same client read as this one: it was written after this command
    /// arrived, so its answer anchors just as well (a pipeline of refusals costs one
    /// `PING`).
    fn anchor_local_answer(&mut self) {
        let read_at = self.read_at;
        if self
            .queue
            .last_on(LinkId::Master)
            .is_some_and(|a| a.sent == read_at)
        {
            return;
        }
        let Some(link) = &mut self.upstream.master else {
            return;
        };
        link.send(&Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"));
        self.queue
            .push_upstream(Awaiting::hidden(LinkId::Master, read_at, queue::ANCHOR));
    }

    /// Answer locally (AUTH, CLIENT REPLY, QUIT), subject to CLIENT REPLY.
    fn answer(&mut self, reply: Bytes) {
        self.shared.hot.local.increment(1);
        let deliver = self.mode.next_command();
        self.push_local(deliver.then_some(reply));
    }

    /// Refuse a command, subject to CLIENT REPLY; inside MULTI it also dooms the
    /// transaction, as Redis does for commands refused while queuing.
    fn refuse(&mut self, reply: Bytes) {
        if let Some(txn) = &mut self.txn {
            txn.dirty = true;
        }
        let deliver = self.mode.next_command();
        self.push_local(deliver.then_some(reply));
    }

    fn on_request(&mut self, req: Request) -> Result<(), SessionEnd> {
        let name = req.arg(0).unwrap_or_default();
        if name.eq_ignore_ascii_case(b"post") || name.eq_ignore_ascii_case(b"host:") {
            metrics::protocol_error("cross_protocol");
            return Err(SessionEnd::CrossProtocol);
        }
        let policy = match &self.user {
            Some(u) => &u.policy,
            None => &self.rt.policy,
        };
        let (lookup, verdict) =
            policy::decide_with(policy, &req, || self.shared.topology.catalog());
        let spec = match lookup {
            Lookup::Known(spec) => spec,
            Lookup::UnknownCommand | Lookup::UnknownSubcommand(_) if self.shadow_unknown(&req) => {
                &command::UNKNOWN
            }
            Lookup::UnknownCommand => {
                self.shared.hot.unknown.increment(1);
                metrics::refused_command("unknown");
                warn!(peer = %self.peer, command = %String::from_utf8_lossy(texts::shown(name, 64)), "refused unknown command");
                self.refuse(texts::unknown_command(&req));
                return Ok(());
            }
            Lookup::UnknownSubcommand(container) => {
                self.shared.hot.unknown.increment(1);
                self.refuse(texts::unknown_subcommand(container.name, &req));
                return Ok(());
            }
        };
        let class = metrics::class_of(spec);
        // Redis checks the argument count before authentication and permissions. Plain
        // forwarded commands get Redis's own answer; ones the proxy handles, refuses or
        // would stop at NOAUTH get the same text here.
        if !spec.arity_allows(req.argc())
            && (spec.special != Special::None
                || !self.authenticated
                || matches!(verdict, Some(Verdict::Deny { .. })))
        {
            self.refuse(texts::wrong_arity(spec.name));
            return Ok(());
        }
        if !self.authenticated
            && !matches!(
                spec.special,
                Special::Auth | Special::Hello | Special::Quit | Special::Reset
            )
        {
            self.refuse(Bytes::from_static(texts::NOAUTH));
            return Ok(());
        }
        let verdict = self.shadow_verdict(verdict);
        if let Some(Verdict::Deny { command, reason }) = verdict {
            self.shared.hot.refused[class].increment(1);
            metrics::refused_command(command);
            let user = self.user.as_ref().map_or("default", |u| u.name.as_str());
            warn!(peer = %self.peer, user, command, reason = reason.text(), "refused command");
            self.refuse(texts::refused(command, reason.text()));
            return Ok(());
        }
        if self.txn.is_none() {
            // Inside MULTI a body may never run (DISCARD, EXECABORT).
            let limit = self.rt.config.limits.script_cache;
            self.shared.scripts.observe(spec, &req, limit);
        } else if spec.name == "script|flush" {
            // Forgetting is always safe: a queued flush may run.
            self.shared.scripts.forget_all();
        }
        if self.shared.cluster.is_some() && self.cluster_intercept(spec, &req) {
            return Ok(());
        }
        self.apply_plan(plan::plan(spec, &req), req, spec, class);
        Ok(())
    }

    /// Carry out the plan for an authorized request.
    fn apply_plan(&mut self, plan: Plan, req: Request, spec: &CommandSpec, class: usize) {
        self.cmd_shareable = pool::shareable_command(spec);
        self.own_link |= pool::keeps_own_link(spec);
        if !self.state.resp3
            && self.state.subscribed()
            && matches!(plan, Plan::ClientReply(_) | Plan::Auth | Plan::Hello)
        {
            // RESP2 pub/sub context: Redis refuses these before running them; the proxy
            // would have answered them itself (forwarded commands get Redis's own answer).
            self.refuse(texts::pubsub_context(spec.name));
            return;
        }
        let in_multi = self.txn.is_some();
        let is_exec = plan == Plan::Exec;
        let mut on_reply = OnReply::Forward;
        let mut forward = req;
        let mut frames = 1;
        // What the command does at EXEC, when Redis queues it.
        let mut effect = None;
        match plan {
            Plan::Quit => {
                self.answer(Bytes::from_static(texts::OK));
                // Redis runs nothing after QUIT; the connection closes once everything
                // before is answered.
                self.end_after_replies(SessionEnd::Quit);
                return;
            }
            Plan::Auth if self.rt.passthrough() => {
                // Pass-through: forwarded; Redis checks and answers, and the credentials
                // are kept for new links once it accepts them. Inside MULTI Redis only
                // queues it, and EXEC's answer would not say whether it worked.
                if in_multi {
                    self.refuse(texts::error(
                        "ERR portcullis does not forward AUTH inside MULTI in pass-through mode",
                    ));
                    return;
                }
                if let Some(creds) = Credentials::from_auth(&forward) {
                    on_reply = OnReply::Apply(Box::new(StateChange::Auth(creds)));
                    self.auth_sent();
                }
            }
            Plan::Auth => {
                let (reply, user) = match forward.argc() {
                    2 => self.auth_outcome(None, forward.arg(1).unwrap_or_default()),
                    3 => self.auth_outcome(forward.arg(1), forward.arg(2).unwrap_or_default()),
                    _ => (Bytes::from_static(texts::SYNTAX), None),
                };
                if in_multi {
                    // Redis queues AUTH and runs it at EXEC: a stand-in is queued, and
                    // EXEC's element for it is this answer; the sign-in happens then.
                    forward = Request::from_args(&[b"PING"]);
                    effect = Some(Effect::Answer {
                        answer: reply,
                        user: user.map(|u| u.name.clone()),
                    });
                } else {
                    if let Some(user) = user {
                        self.sign_in(user);
                    }
                    self.answer(reply);
                    return;
                }
            }
            Plan::Hello => match self.rewrite_hello(&forward) {
                Ok((req, change)) => {
                    forward = req;
                    effect = Some(Effect::State(change.clone()));
                    on_reply = OnReply::Apply(Box::new(change));
                }
                Err(reply) => {
                    self.answer(reply);
                    return;
                }
            },
            Plan::ClientReply(arg) => {
                if in_multi {
                    // Queued as `CLIENT REPLY ON` (the backend always answers); EXEC's
                    // answer is shaped as Redis's would be.
                    forward = Request::from_args(&[b"CLIENT".as_slice(), b"REPLY", b"ON"]);
                    effect = Some(Effect::Reply(arg));
                } else {
                    self.shared.hot.local.increment(1);
                    let delivered = self.mode.client_reply(arg);
                    self.push_local(delivered.then(|| Bytes::from_static(texts::OK)));
                    return;
                }
            }
            Plan::PubSub {
                kind,
                subscribe,
                channels,
            } => {
                if in_multi {
                    effect = Some(Effect::PubSub {
                        kind,
                        subscribe,
                        channels,
                    });
                } else {
                    let all = !subscribe && channels.is_empty();
                    frames = u32::try_from(channels.len().max(1)).unwrap_or(u32::MAX);
                    on_reply = OnReply::PubSub {
                        kind,
                        all,
                        hidden: false,
                    };
                }
            }
            Plan::Multi => {
                if !in_multi {
                    self.txn = Some(Transaction::default());
                }
                // Nested MULTI: Redis answers an error and queues nothing.
                return self.forward_plain(forward, class);
            }
            Plan::Watch => {
                if !in_multi {
                    self.watching = true;
                }
                // WATCH inside MULTI: Redis answers an error and queues nothing.
                return self.forward_plain(forward, class);
            }
            Plan::Unwatch => {
                if !in_multi {
                    self.watching = false;
                }
            }
            Plan::Exec | Plan::Discard => {
                if let Some(txn) = self.txn.take() {
                    self.watching = false;
                    if txn.cross_slot && is_exec {
                        // Cluster mode: queued over several slots. One node serving them
                        // all checks every queued command's keys at EXEC (before any
                        // queuing error) and discards: so does the proxy, on the node.
                        forward = Request::from_args(&[b"DISCARD"]);
                        on_reply = OnReply::Replace(texts::CROSSSLOT);
                    } else if txn.dirty {
                        // Redis never saw the refused command: discard what it queued
                        // and answer as Redis does for commands refused while queuing.
                        let reply = if is_exec { texts::EXECABORT } else { texts::OK };
                        forward = Request::from_args(&[b"DISCARD"]);
                        on_reply = OnReply::Replace(reply);
                    } else if is_exec && txn.needs_plan() {
                        let mode = self.mode;
                        let deliver = mode.delivers();
                        if txn.changes_reply_mode() {
                            // The mode after EXEC depends on its outcome.
                            self.barrier = true;
                            self.mode_pending = true;
                        } else {
                            self.mode.command_done();
                        }
                        if txn.changes_subscriptions() && !self.state.resp3 {
                            // So does the RESP2 pub/sub context.
                            self.barrier = true;
                        }
                        let exec = ExecPlan {
                            queued: txn.queued,
                            effects: txn.effects,
                            mode,
                            deliver,
                            extra: None,
                            array: None,
                            frames: Vec::new(),
                        };
                        self.tally.forwarded[class] += 1;
                        let out = Outgoing {
                            on_reply: OnReply::Exec(Box::new(exec)),
                            ..Outgoing::plain(forward, deliver)
                        };
                        self.send(out);
                        return;
                    }
                }
            }
            Plan::Reset => {
                // RESET authenticates as the default user: with users configured, that
                // means not authenticated at the proxy.
                if self.rt.users.enabled() {
                    self.authenticated = false;
                    self.user = None;
                    self.parser.set_limits(self.rt.request_limits(false));
                }
                self.txn = None;
                self.watching = false;
                // What RESET clears (subscriptions, tracking, MONITOR) decides how the
                // next commands are answered: wait for it.
                self.barrier = true;
                self.mode.reset();
                on_reply = OnReply::Apply(Box::new(StateChange::Reset));
            }
            Plan::Forward { change } => {
                if let Some(change) = change {
                    effect = Some(Effect::State(change.clone()));
                    on_reply = OnReply::Apply(Box::new(change));
                }
            }
        }
        if let Some(txn) = &mut self.txn {
            // Redis queues it (`+QUEUED`); its effect waits for EXEC.
            txn.queue(effect);
            on_reply = OnReply::Forward;
            frames = 1;
        }
        if matches!(on_reply, OnReply::Apply(_)) {
            // The replica link's replayed state no longer matches.
            self.upstream.replica_stale = true;
        }
        if let OnReply::PubSub { .. } = on_reply {
            self.tally.forwarded[class] += 1;
            if !self.state.resp3 {
                // Whether the connection is in RESP2 pub/sub context after it decides how
                // the next commands are answered: wait for its confirmations.
                self.barrier = true;
            }
            let deliver = self.mode.next_command();
            let out = Outgoing {
                frames,
                on_reply,
                ..Outgoing::plain(forward, deliver)
            };
            self.send(out);
            return;
        }
        if let Some(index) = self.running_script_backend(spec) {
            self.shared.hot.forwarded[class].increment(1);
            self.deferred = Some(Deferred::Script {
                index,
                req: forward,
            });
            return;
        }
        let plain = matches!(on_reply, OnReply::Forward) && self.txn.is_none();
        if plain
            && self.rt.config.routing.reads != ReadPolicy::Master
            && self.shared.cluster.is_none()
            && self.replica_read(spec)
        {
            let deliver = self.mode.next_command();
            self.deferred = Some(Deferred::Read {
                req: forward,
                deliver,
                class,
            });
            return;
        }
        self.tally.forwarded[class] += 1;
        let deliver = self.mode.next_command();
        let out = Outgoing {
            on_reply,
            // A plain write outside MULTI can be retried if the backend says READONLY; an
            // EVALSHA too if it says NOSCRIPT.
            retryable: plain && (spec.is_write() || matches!(spec.name, "evalsha" | "evalsha_ro")),
            blocking: spec.may_block(),
            // Not inside MULTI: there the PUBLISH would be queued into the transaction.
            bump_write_offset: pool::counts_own_writes(spec) && self.txn.is_none(),
            ..Outgoing::plain(forward, deliver)
        };
        self.send(out)
    }

    /// Forward a request answered by one frame, deciding its delivery now.
    fn forward_plain(&mut self, req: Request, class: usize) {
        self.tally.forwarded[class] += 1;
        let deliver = self.mode.next_command();
        self.send(Outgoing::plain(req, deliver));
    }

    /// Carry out what the request just handled left waiting (`deferred`).
    async fn run_deferred(&mut self) {
        match self.deferred.take() {
            None => {}
            Some(Deferred::Send(out)) => self.send_slow(out).await,
            Some(Deferred::Script { index, req }) => self.forward_to_script(index, req).await,
            Some(Deferred::Read {
                req,
                deliver,
                class,
            }) => self.forward_read(req, deliver, class).await,
        }
    }

    /// `SCRIPT KILL`, `FUNCTION KILL`, `FUNCTION STATS` while a backend other than the
    /// session's link is busy running a script: that backend, whatever its confirmation
    /// state (the command cannot change its role). `None`: route as usual.
    fn running_script_backend(&self, spec: &CommandSpec) -> Option<usize> {
        if !spec.acts_on_running_script() || !self.at_safe_point() {
            return None;
        }
        let busy = self.shared.topology.load().busy_backend()?;
        (self.upstream.master.as_ref().map(|l| l.index) != Some(busy)).then_some(busy)
    }

    /// Send a script-control command to the busy backend on a link of its own (the
    /// session's next command moves back to the confirmed master at this safe point).
    async fn forward_to_script(&mut self, index: usize, req: Request) {
        let deliver = self.mode.next_command();
        self.upstream.master = None;
        match self.open_link(index).await {
            Ok(link) => {
                self.upstream.master = Some(link);
                self.push_to(LinkId::Master, Outgoing::plain(req, deliver));
            }
            Err(failure) => self.push_local(deliver.then_some(failure.reply)),
        }
    }

    /// Whether a command may go to a replica: read-only, not blocking, not a script or
    /// pub/sub, and the session holds no state a replica link would not share.
    fn replica_read(&self, spec: &CommandSpec) -> bool {
        spec.is_readonly()
            && spec.special == Special::None
            && !spec.flags.intersects(Flags::BLOCKING.union(Flags::PUBSUB))
            && !spec.acl.intersects(AclCategories::SCRIPTING)
            && !self.watching
            && !self.state.pinned()
    }

    /// Send a read to the session's replica link (opening it when needed); without a
    /// healthy replica, `prefer-replica` falls back to the master.
    async fn forward_read(&mut self, req: Request, deliver: bool, class: usize) {
        let topo = self.shared.topology.load();
        let seed = self.peer.port() as usize;
        let choice = topo.replica_for_reads(seed);
        let on_replica = self.queue.waiting_on(LinkId::Replica);
        let usable = match (&self.upstream.replica, choice) {
            (Some(r), Some(c)) => r.index == c && !self.upstream.replica_stale,
            _ => false,
        };
        if !usable && !on_replica {
            self.upstream.replica = None;
            if let Some(index) = choice {
                match self.open_link(index).await {
                    Ok(link) => {
                        self.upstream.replica = Some(link);
                        self.upstream.replica_stale = false;
                    }
                    Err(failure) if failure.credentials_refused => {
                        self.close_for_credentials();
                        self.push_local(deliver.then_some(failure.reply));
                        return;
                    }
                    Err(_) => self.shared.topology.request_probe(index),
                }
            }
        }
        let ready = self
            .upstream
            .replica
            .as_ref()
            .is_some_and(|r| Some(r.index) == choice && !self.upstream.replica_stale);
        if ready {
            self.tally.forwarded[class] += 1;
            self.push_to(LinkId::Replica, Outgoing::plain(req, deliver));
            return;
        }
        if self.rt.config.routing.reads == ReadPolicy::Replica && !on_replica {
            self.push_local(deliver.then(|| texts::no_replica(&topo.explain())));
            return;
        }
        self.tally.forwarded[class] += 1;
        self.send_waiting(Outgoing::plain(req, deliver)).await;
    }

    /// AUTH at the proxy, signing in on success. With no users configured, `proxy_auth`.
    fn authenticate(&mut self, name: &[u8], password: &[u8]) -> Bytes {
        let (reply, user) = self.auth_outcome(Some(name), password);
        if let Some(user) = user {
            self.sign_in(user);
        }
        reply
    }

    /// What AUTH answers (`name`: `None` for one-argument AUTH), and the user it signs
    /// in as, without signing in yet.
    fn auth_outcome(&self, name: Option<&[u8]>, password: &[u8]) -> (Bytes, Option<Arc<User>>) {
        if !self.rt.users.enabled() {
            return (self.proxy_auth(name, password), None);
        }
        let name = name.unwrap_or(b"default");
        match self.rt.users.authenticate(name, password) {
            Some(user) => (Bytes::from_static(texts::OK), Some(user)),
            None => {
                metrics::auth_failure();
                warn!(peer = %self.peer, user = %String::from_utf8_lossy(texts::shown(name, 64)), "AUTH failed");
                (Bytes::from_static(texts::WRONGPASS), None)
            }
        }
    }

    /// The connection is now `user`'s (its policy applies from the next command).
    fn sign_in(&mut self, user: Arc<User>) {
        self.user = Some(user);
        if !self.authenticated {
            self.authenticated = true;
            self.parser.set_limits(self.rt.request_limits(true));
        }
    }

    /// Proxy mode without `[[users]]`: an app built for a password-protected Redis keeps
    /// sending that password. It is accepted when it is the password the proxy itself
    /// holds for a backend; answers are Redis's texts.
    fn proxy_auth(&self, name: Option<&[u8]>, password: &[u8]) -> Bytes {
        match self.rt.backend_passwords.answer(name, password) {
            ProxyAuthAnswer::Ok => Bytes::from_static(texts::OK),
            ProxyAuthAnswer::NoPasswordConfigured => Bytes::from_static(texts::AUTH_NO_PASSWORD),
            ProxyAuthAnswer::WrongPass => {
                metrics::auth_failure();
                let user = name.map_or("default".into(), |n| {
                    String::from_utf8_lossy(texts::shown(n, 64))
                });
                warn!(peer = %self.peer, user = %user, "AUTH failed (not the backend credentials the proxy holds)");
                Bytes::from_static(texts::WRONGPASS)
            }
        }
    }

    /// Credentials for a new backend link: the proxy's own, or in pass-through the
    /// client's (none before it authenticated, so Redis's own auth applies to it).
    fn link_auth(&self) -> LinkAuth {
        if !self.rt.passthrough() {
            return LinkAuth::Proxy;
        }
        match &self.state.creds {
            Some(creds) => LinkAuth::Client(creds.clone()),
            None => LinkAuth::Unauthenticated,
        }
    }

    /// Pass-through: Redis's pre-auth bounds (10 elements, 16 KiB bulks) while the client
    /// has not authenticated and the backends require it, as Redis applies them; the
    /// proxy must not buffer for an anonymous client what Redis would refuse.
    fn sync_passthrough_limits(&mut self) {
        if !self.rt.passthrough() {
            return;
        }
        let pre_auth =
            self.state.creds.is_none() && self.shared.topology.load().backends_require_auth();
        if self.parser.limits().unauthenticated != pre_auth {
            self.parser.set_limits(self.rt.request_limits(!pre_auth));
        }
    }

    /// Pass-through: an AUTH was forwarded. Under pre-auth bounds, parse nothing more
    /// until it is answered.
    fn auth_sent(&mut self) {
        if self.parser.limits().unauthenticated {
            self.barrier = true;
        }
    }

    /// HELLO: authenticate `AUTH user pass` at the proxy, forward the rest.
    fn rewrite_hello(&mut self, req: &Request) -> Result<(Request, StateChange), Bytes> {
        let mut args: Vec<&[u8]> = vec![b"HELLO"];
        // Pass-through: AUTH stays in the forwarded HELLO for Redis to check.
        let passthrough = self.rt.passthrough();
        let auth = passthrough.then(|| Credentials::from_hello(req)).flatten();
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
            if passthrough && opt.eq_ignore_ascii_case(b"auth") && req.argc() > i + 2 {
                args.extend([opt, req.arg(i + 1).unwrap_or_default()]);
                args.push(req.arg(i + 2).unwrap_or_default());
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"auth") && req.argc() > i + 2 {
                let reply = self.authenticate(
                    req.arg(i + 1).unwrap_or_default(),
                    req.arg(i + 2).unwrap_or_default(),
                );
                if reply.as_ref() != texts::OK {
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
            return Err(Bytes::from_static(texts::HELLO_NOAUTH));
        }
        if auth.is_some() {
            self.auth_sent();
        }
        Ok((
            Request::from_args(&args),
            StateChange::Hello { resp3, name, auth },
        ))
    }

    /// Whether the session can move to another backend without losing anything.
    fn at_safe_point(&self) -> bool {
        self.queue.is_empty() && self.txn.is_none() && !self.watching && !self.state.pinned()
    }

    /// Send a request to the confirmed master and queue its answer, when that needs no
    /// wait; otherwise it becomes `deferred` (connecting, or moving to a new master).
    fn send(&mut self, out: Outgoing) {
        if let Err(out) = self.send_now(out) {
            self.deferred = Some(Deferred::Send(out));
        }
    }

    /// `send`, waiting for what it needs.
    async fn send_waiting(&mut self, out: Outgoing) {
        if let Err(out) = self.send_now(out) {
            self.send_slow(out).await;
        }
    }

    /// What `send_now` returned: the paths that may wait.
    async fn send_slow(&mut self, out: Outgoing) {
        if self.shared.cluster.is_some() {
            // Boxed only off the common path: the future is big.
            Box::pin(self.cluster_send(out)).await;
        } else {
            self.send_dedicated(out).await;
        }
    }

    /// The paths of `send` that need no wait: the shared connection, parking, the
    /// session's link to the master it is already on. `Err`: the request is returned for
    /// `send_dedicated` (or, in cluster mode, `cluster_send`).
    fn send_now(&mut self, out: Outgoing) -> Result<(), Outgoing> {
        if self.shared.cluster.is_some() {
            return self.cluster_send_now(out);
        }
        match self.shared_route(&out) {
            pool::Route::Shared => {
                self.push_to(LinkId::Shared, out);
                return Ok(());
            }
            pool::Route::Wait => {
                // Switching paths: what is in flight on the other one is answered first.
                self.parked = Some(out);
                return Ok(());
            }
            pool::Route::Dedicated => {}
        }
        let current = self.upstream.master.as_ref().map(|l| l.index);
        let master = self.shared.topology.master_cached(
            &mut self.master_cache,
            tokio::time::Instant::from_std(self.now),
        );
        if current.is_some() && current == master {
            self.push_to(LinkId::Master, out);
            return Ok(());
        }
        Err(out)
    }

    /// The dedicated path of `send` when the session's link is not (or no longer) the
    /// confirmed master's: wait for the in-flight answers, or connect.
    async fn send_dedicated(&mut self, out: Outgoing) {
        let deliver = out.deliver;
        let master = self
            .shared
            .topology
            .master_at(tokio::time::Instant::from_std(self.now));
        let current = self.upstream.master.as_ref().map(|l| l.index);
        if current.is_none() || current != master {
            if current.is_some() && !self.at_safe_point() {
                if self.txn.is_some() || self.watching {
                    // Never half a transaction on each side of a failover.
                    let reply = self.shared.masterdown();
                    if let Some(txn) = &mut self.txn {
                        txn.dirty = true;
                    }
                    self.push_local(deliver.then_some(reply));
                    return;
                }
                if self.state.tracking || self.state.monitor {
                    // Its invalidation table (or MONITOR feed) is on the old master:
                    // close, as Redis would on losing the connection; the client
                    // reconnects and starts afresh.
                    self.end_after_replies(SessionEnd::BackendLost);
                    return;
                }
                if self.state.subscribed() {
                    // Pub/sub works on any node: stay where the subscriptions are.
                    self.push_to(LinkId::Master, out);
                    return;
                }
                // Finish what is in flight on the old link first.
                self.parked = Some(out);
                return;
            }
            self.upstream.master = None;
            let connected = self.connect_to_master().await;
            // Connecting may have waited: later requests of this wake-up check the master
            // against the clock as it is now.
            self.now = Instant::now();
            if let Err(reply) = connected {
                self.push_local(deliver.then_some(reply));
                if let OnReply::Exec(_) = out.on_reply {
                    // Not sent: nothing ran.
                    if std::mem::take(&mut self.mode_pending) {
                        self.mode.command_done();
                    }
                }
                return;
            }
        }
        self.push_to(LinkId::Master, out);
    }

    /// Queue a request on link `id` and what its answer is owed.
    fn push_to(&mut self, id: LinkId, out: Outgoing) {
        let Outgoing {
            frame,
            frames,
            deliver,
            on_reply,
            retryable,
            blocking,
            bump_write_offset,
        } = out;
        if id == LinkId::Shared {
            let Some(shared) = &mut self.upstream.shared else {
                return;
            };
            shared.send(&frame);
            self.wait_needs_bump = true;
        } else if let LinkId::SharedNode(_) = id {
            let Some(shared) = self.upstream.shared_node_mut(id) else {
                return;
            };
            shared.send(&frame);
            self.wait_needs_bump = true;
        } else {
            let Some(link) = self.upstream.get_mut(id) else {
                return;
            };
            // Taken only when sent: a WAIT that never reached a link leaves it owed.
            if bump_write_offset && std::mem::take(&mut self.wait_needs_bump) {
                // Cluster mode (a WAIT on the node a WATCH or tracking binds): PUBLISH
                // is not propagated there.
                let bump = match self.shared.cluster {
                    Some(_) => cluster::cluster_wait_offset_bump(),
                    None => pool::wait_offset_bump(),
                };
                link.send(&bump);
                self.queue
                    .push_upstream(Awaiting::hidden(id, self.read_at, "WAIT offset bump"));
            }
            let Some(link) = self.upstream.get_mut(id) else {
                return;
            };
            link.send(&frame);
        }
        // Kept for a READONLY retry up to the session's buffer bound; past it a READONLY
        // answer becomes MASTERDOWN (not applied either way), so a big-value pipeline
        // cannot pin its frames until their replies.
        let retry = (retryable
            && frames == 1
            && self.retained.load(Ordering::Relaxed) < self.rt.config.limits.max_reply_buffer)
            .then(|| Retained::new(frame, &self.retained));
        self.queue.push_upstream(Awaiting {
            link: id,
            remaining: frames,
            deliver,
            on_reply,
            retry,
            sent: self.read_at,
            blocking,
            acc: BytesMut::new(),
        });
    }

    /// Re-send the retries (writes refused with READONLY, requests never written, an
    /// EVALSHA answered NOSCRIPT with its script loaded first) to the confirmed master,
    /// in order; if no master appears within the failover wait, answer them `-MASTERDOWN`.
    async fn run_retries(&mut self) {
        if self.shared.cluster.is_some() {
            return Box::pin(self.cluster_retries()).await;
        }
        // The session's link stays when it is still the master's (a NOSCRIPT retry).
        let now = tokio::time::Instant::now();
        let current = self.upstream.master.as_ref().map(|l| l.index);
        let connected = if current.is_some() && current == self.shared.topology.master_at(now) {
            true
        } else {
            self.upstream.master = None;
            self.connect_to_master().await.is_ok()
        };
        let read_at = self.read_at;
        while let Some(pos) = self.queue.first_retry() {
            let Some(Entry::Retry {
                retained,
                deliver,
                script,
                ..
            }) = self.queue.entry_mut(pos)
            else {
                break;
            };
            let (frame, deliver, script) = (retained.frame.clone(), *deliver, script.take());
            let (entry, hidden) = match (&mut self.upstream.master, connected) {
                (Some(link), true) => {
                    metrics::readonly_retry();
                    let hidden = script.map(|body| {
                        link.send(&scripts::load_frame(&body));
                        Awaiting::hidden(LinkId::Master, read_at, "SCRIPT LOAD")
                    });
                    link.send(&frame);
                    // No second retry: a master that also says READONLY gets MASTERDOWN.
                    let entry = Entry::Upstream(Awaiting {
                        link: LinkId::Master,
                        remaining: 1,
                        deliver,
                        on_reply: OnReply::Forward,
                        retry: None,
                        sent: read_at,
                        blocking: false,
                        acc: BytesMut::new(),
                    });
                    (entry, hidden)
                }
                _ => (
                    Entry::Ready(deliver.then(|| self.shared.masterdown())),
                    None,
                ),
            };
            self.queue.replace_with(pos, hidden, entry);
        }
        self.queue.drain(&mut self.to_client);
    }

    /// Connect to the confirmed master, waiting up to the failover wait for one. A master
    /// that refuses the connection is reported to the topology (and re-probed at once),
    /// so the wait can end on its successor; one that only does not answer in time stays
    /// the master until `probe.down_after`, and the session keeps trying it meanwhile, as
    /// a client of Redis alone would wait.
    async fn connect_to_master(&mut self) -> Result<(), Bytes> {
        // Boxed, as `open_link`: the per-request path only holds a pointer to it.
        Box::pin(self.connect_to_master_now()).await
    }

    async fn connect_to_master_now(&mut self) -> Result<(), Bytes> {
        let deadline = tokio::time::Instant::now() + self.rt.config.routing.failover_wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(index) = self.shared.topology.wait_for_master(left).await else {
                return Err(self.shared.masterdown());
            };
            let attempt = tokio::time::Instant::now();
            match self.open_link(index).await {
                Ok(link) => {
                    self.upstream.master = Some(link);
                    return Ok(());
                }
                // Pass-through: Redis refused this client's own credentials (password
                // changed, user disabled): the backend is fine, this session cannot go on.
                Err(failure) if failure.credentials_refused => {
                    self.close_for_credentials();
                    return Err(failure.reply);
                }
                // Reported to the topology by `open_link`: refused is down at once, a
                // timeout only silence.
                Err(LinkFailure { reply, .. }) => {
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

    /// Open a backend connection with this session's state replayed. Boxed: connecting
    /// is rare, and its future (TCP, TLS, handshake) would otherwise be part of every
    /// request's path through `send`, moved with it on each call.
    async fn open_link(&self, index: usize) -> Result<Link, LinkFailure> {
        Box::pin(self.open_link_now(index)).await
    }

    async fn open_link_now(&self, index: usize) -> Result<Link, LinkFailure> {
        let Some((cfg, liveness)) = self
            .shared
            .topology
            .load()
            .backends
            .get(index)
            .map(|b| (b.config.clone(), b.liveness.clone()))
        else {
            return Err(LinkFailure::unreachable(Bytes::from_static(
                texts::NO_BACKEND,
            )));
        };
        let mut handshake = self.state.handshake();
        handshake.auth = self.link_auth();
        let opened = Link::open(
            index,
            &cfg,
            liveness,
            &handshake,
            self.rt.config.limits.connect_timeout,
            self.rt.reply_limits(),
            self.rt.backend_tls.as_deref(),
        )
        .await;
        opened.map_err(|e| {
            if matches!(handshake.auth, LinkAuth::Client(_)) && e.refused_auth() {
                warn!(peer = %self.peer, backend = cfg.label(), error = %e, "pass-through: the backend refused the client's credentials on a new link; closing the client");
                return LinkFailure {
                    reply: texts::credentials_refused(cfg.label(), &e),
                    credentials_refused: true,
                };
            }
            // Refused: down at once; timed out: silence, the prober decides.
            self.shared
                .topology
                .report_connect_error(index, e.evidence());
            metrics::backend_connect_error(cfg.label());
            warn!(backend = cfg.label(), error = %e, "backend connection failed");
            LinkFailure::unreachable(texts::unreachable(cfg.label(), &e))
        })
    }

    /// Pass-through: Redis refused this client's credentials on a new link. Answer what
    /// is owed, then close, as Redis closes a client whose user is gone; the client
    /// reconnects and authenticates again.
    fn close_for_credentials(&mut self) {
        self.end_after_replies(SessionEnd::CredentialsRefused);
    }

    /// Read what link `id` has and match every complete reply.
    fn read_backend(&mut self, id: LinkId) {
        let Some(link) = self.upstream.get_mut(id) else {
            return;
        };
        match link.read(self.now) {
            Ok(false) => return,
            Ok(true) => self.replies_at = self.now,
            Err(end) => return self.link_lost(id, end),
        }
        loop {
            let Some(link) = self.upstream.get_mut(id) else {
                return;
            };
            match link.next_reply() {
                Ok(Some(reply)) => {
                    if !self.on_reply(reply, id) {
                        let label = self.upstream.get(id).map(|l| l.label.clone());
                        warn!(peer = %self.peer, backend = ?label, "backend sent an unexpected reply; closing session");
                        self.upstream.close();
                        self.queue.clear();
                        self.end_after_replies(SessionEnd::BackendDesync);
                        return;
                    }
                }
                Ok(None) => return,
                Err(end) => return self.link_lost(id, end),
            }
        }
    }

    /// Frames that answer no request: RESP3 pushes, RESP2 pub/sub messages while
    /// subscribed, MONITOR lines.
    fn out_of_band(&self, reply: &Reply) -> bool {
        reply.is_push()
            || (!self.state.resp3 && self.state.subscribed() && state::is_message(reply))
            || (self.state.monitor && state::is_monitor_line(reply))
    }

    /// Match one backend reply; `false` when nothing was waiting for it.
    fn on_reply(&mut self, reply: Reply, id: LinkId) -> bool {
        // The common case first: an answer (not an error, not out of band) to the oldest
        // request, a plain forward. What the general path below would do for it, with
        // none of its checks.
        let plain = !reply.is_error()
            && (self.shared.cluster.is_none() || self.state.shard_channels.is_empty())
            && !self.out_of_band(&reply);
        if plain {
            if let Some(a) = self.queue.pop_plain_front(id) {
                if a.deliver {
                    self.to_client.push(reply.into_frame());
                }
                self.record_latency(a.sent);
                self.queue.drain(&mut self.to_client);
                return true;
            }
        }
        let index = self.queue.first_on(id);
        let waiting = index.and_then(|i| self.queue.awaiting(i));
        let confirmation = match waiting.map(|a| &a.on_reply) {
            Some(OnReply::PubSub { .. })
                if matches!(reply.kind(), ReplyKind::Array | ReplyKind::Push) =>
            {
                state::pubsub_confirmation(&reply)
            }
            _ => None,
        };
        if self.shared.cluster.is_some()
            && !self.state.shard_channels.is_empty()
            && !matches!(
                waiting.map(|a| &a.on_reply),
                Some(OnReply::PubSub {
                    kind: command::PubSubKind::Shard,
                    ..
                })
            )
            && self.cluster_slot_unsubscribed(&reply, id)
        {
            return true;
        }
        let waiting = index.and_then(|i| self.queue.awaiting(i));
        if confirmation.is_none() && self.out_of_band(&reply) {
            // Pushes and pub/sub messages are never silenced; MONITOR lines obey CLIENT
            // REPLY like any reply (Redis 7 sends none under OFF).
            if !(self.state.monitor && state::is_monitor_line(&reply)) || self.mode.delivers() {
                self.to_client.push(reply.into_frame());
            }
            return true;
        }
        let Some(index) = index else {
            return false;
        };
        if matches!(waiting.map(|a| &a.on_reply), Some(OnReply::Exec(_))) {
            self.on_exec_frame(index, reply);
            return true;
        }
        let is_error = reply.is_error() || reply.kind() == ReplyKind::Null;
        if reply.error_code() == Some(b"MASTERDOWN".as_slice()) {
            // Only a replica says MASTERDOWN: evidence this is no longer the master.
            if let (LinkId::Master, Some(link)) = (id, &self.upstream.master) {
                self.shared
                    .topology
                    .report_not_master(link.index, "-MASTERDOWN");
            }
        }
        if reply.error_code() == Some(b"NOSCRIPT".as_slice()) && self.queue.last_in_flight(index) {
            // The server lacks a script the proxy saw loaded or run (a promoted replica,
            // a node that joined later): load it there and run the EVALSHA again. Only
            // when nothing the client sent after it is in flight: a later request would
            // run before the retry (the server accepts it, unlike after READONLY), so
            // then the client gets NOSCRIPT, as from the server directly.
            let body = self
                .queue
                .awaiting(index)
                .and_then(|a| Some((a.sent, a.retry.as_ref()?)))
                .and_then(|(sent, r)| {
                    Some((sent, scripts::body_for(&self.shared.scripts, &r.frame)?))
                });
            if let Some((sent, body)) = body {
                let redirect = match self.shared.cluster {
                    Some(_) => self
                        .upstream
                        .node_of(id)
                        .map(|(node, _)| cluster::Redirect::noscript(sent, &node)),
                    None => None,
                };
                if self.queue.mark_script_retry(index, body, redirect) {
                    debug!(peer = %self.peer, "EVALSHA answered NOSCRIPT: loading the script and running it again");
                    return true;
                }
            }
        }
        let cluster_answer = if self.shared.cluster.is_some() && reply.is_error() {
            match self.cluster_on_error(index, id, &reply) {
                Some(None) => return true,
                other => other.flatten(),
            }
        } else {
            None
        };
        let mut out = if let Some(answer) = cluster_answer {
            answer
        } else if reply.error_code() == Some(b"READONLY".as_slice()) {
            // Redis did not apply it. Stop routing writes there, and retry or explain.
            if let (LinkId::Master, Some(link)) = (id, &self.upstream.master) {
                self.shared.topology.report_readonly(link.index);
            } else if let (LinkId::Shared, Some(link)) = (id, &self.upstream.shared) {
                self.shared.topology.report_readonly(link.index);
            }
            if self.queue.mark_retry(index) {
                return true;
            }
            self.shared.masterdown()
        } else {
            reply.into_frame()
        };
        let Some(a) = self.queue.awaiting_mut(index) else {
            return false;
        };
        let mut deliver = a.deliver;
        let done = match &mut a.on_reply {
            OnReply::PubSub { kind, all, hidden } => match confirmation {
                Some((name, channel)) => {
                    // Confirmations are pushed whatever CLIENT REPLY says (a hidden
                    // re-subscription's were delivered when the client subscribed).
                    deliver = !*hidden;
                    if *kind == command::PubSubKind::Shard && self.shared.cluster.is_some() {
                        if let (Some(c), Some((_, node))) = (&channel, self.upstream.node_of(id)) {
                            self.cl
                                .shard_confirmed(c, node, !name.ends_with(b"unsubscribe"));
                        }
                    }
                    let set = self.state.set(*kind);
                    if name.ends_with(b"unsubscribe") {
                        if let Some(c) = &channel {
                            set.remove(c);
                        }
                    } else if let Some(c) = channel {
                        set.insert(c);
                    }
                    a.remaining = a.remaining.saturating_sub(1);
                    if *all {
                        set.is_empty()
                    } else {
                        a.remaining == 0
                    }
                }
                // An error (or anything else) answers the whole command.
                None => {
                    if *hidden {
                        warn!(peer = %self.peer, reply = %String::from_utf8_lossy(&out), "cluster: a node refused to subscribe again; those subscriptions are gone");
                    }
                    true
                }
            },
            OnReply::Replace(local) => {
                out = Bytes::from_static(local);
                a.remaining = a.remaining.saturating_sub(1);
                a.remaining == 0
            }
            OnReply::Forward | OnReply::Apply(_) | OnReply::Exec(_) | OnReply::Hidden(_) => {
                a.remaining = a.remaining.saturating_sub(1);
                a.remaining == 0
            }
        };
        if !done {
            if deliver {
                if index == 0 && a.acc.is_empty() {
                    self.to_client.push(out);
                } else {
                    a.acc.extend_from_slice(&out);
                }
            }
            return true;
        }
        let answer = if a.acc.is_empty() {
            deliver.then_some(out)
        } else {
            let mut acc = std::mem::take(&mut a.acc);
            if deliver {
                acc.extend_from_slice(&out);
            }
            Some(acc.freeze())
        };
        if let Some(Entry::Upstream(a)) = self.queue.complete(index, answer) {
            self.answered(a, is_error);
        }
        true
    }

    /// An answer is complete: record it, apply its state change.
    fn answered(&mut self, a: Awaiting, is_error: bool) {
        match a.on_reply {
            OnReply::PubSub { .. } => {}
            OnReply::Hidden(what) => {
                // The anchor's error (-BUSY, -LOADING) keeps its place all the same.
                if is_error && what != queue::ANCHOR {
                    metrics::hidden_request_failed(what, &self.peer);
                }
            }
            OnReply::Apply(change) if !is_error => {
                self.record_latency(a.sent);
                self.state.apply(*change);
            }
            _ => self.record_latency(a.sent),
        }
        self.queue.drain(&mut self.to_client);
    }

    /// One sample per wake-up: the oldest request it answered.
    fn record_latency(&mut self, sent: Instant) {
        if self.tally.oldest_answered.map_or(true, |o| sent < o) {
            self.tally.oldest_answered = Some(sent);
        }
    }

    /// A frame of an EXEC whose transaction changes the session: the array, then (RESP2
    /// pub/sub) the confirmations beyond one per command.
    fn on_exec_frame(&mut self, index: usize, reply: Reply) {
        let limits = self.rt.reply_limits();
        let Some(a) = self.queue.awaiting_mut(index) else {
            return;
        };
        let OnReply::Exec(plan) = &mut a.on_reply else {
            return;
        };
        match plan.extra {
            None if reply.kind() != ReplyKind::Array => {
                // EXECABORT, a WATCH that failed (null), an error: nothing ran.
                let mut mode = plan.mode;
                mode.command_done();
                let answer = plan.deliver.then(|| reply.into_frame());
                if std::mem::take(&mut self.mode_pending) {
                    self.mode = mode;
                }
                if let Some(Entry::Upstream(a)) = self.queue.complete(index, answer) {
                    self.answered(a, true);
                }
                return;
            }
            None => {
                let n = reply.items().map_or(0, |items| items.len());
                let extra = plan.extra_after_array(&self.state, n);
                plan.extra = Some(extra);
                plan.array = Some(reply);
                a.remaining = extra;
            }
            Some(_) => {
                plan.frames.push(reply.into_frame());
                a.remaining = a.remaining.saturating_sub(1);
            }
        }
        if a.remaining > 0 {
            return;
        }
        let Some(Entry::Upstream(a)) = self.queue.complete(index, None) else {
            return;
        };
        let OnReply::Exec(mut plan) = a.on_reply else {
            return;
        };
        let Some(array) = plan.array.take() else {
            return;
        };
        let extras = std::mem::take(&mut plan.frames);
        let (header, mut elements) = state::split_array(&array, limits)
            .unwrap_or_else(|| (array.frame().clone(), Vec::new()));
        elements.extend(extras);
        let outcome = plan.finish(&mut self.state, &header, elements);
        if std::mem::take(&mut self.mode_pending) {
            self.mode = outcome.mode;
        }
        if let Some(user) = outcome.user.and_then(|name| self.rt.users.get(&name)) {
            self.sign_in(user);
        }
        self.upstream.replica_stale = true;
        self.queue.complete(index, outcome.out);
        self.record_latency(a.sent);
        self.queue.drain(&mut self.to_client);
    }

    /// A backend connection ended: answer what was in flight on it (in order), then keep
    /// the client if nothing stateful was lost. Writes refused with READONLY keep their
    /// retry.
    fn link_lost(&mut self, id: LinkId, end: LinkEnd) {
        let Some(mut link) = self.upstream.take(id) else {
            return;
        };
        match &end {
            LinkEnd::Protocol(e) => {
                warn!(peer = %self.peer, backend = %link.label, error = %e, "backend protocol error")
            }
            LinkEnd::Io(e) => {
                debug!(peer = %self.peer, backend = %link.label, error = %e, "backend connection failed")
            }
            LinkEnd::Closed => {}
        }
        if matches!(self.phase, Phase::InputClosed) && link.is_shutting() {
            // Redis answered what it had read and closed, as it does for a client that
            // half-closes: it ran nothing after what it left unanswered (a blocked
            // command), and neither answers nor runs more here.
            self.queue.abandon_from(id);
            self.queue.drain(&mut self.to_client);
            return;
        }
        let lost = texts::link_lost(&link.label);
        // What never reached the socket never ran: retried where a retry would go after
        // READONLY (cluster: the slot's confirmed master), within the failover wait.
        let unwritten = link.unwritten_requests();
        if unwritten > 0 {
            let cluster = self.shared.cluster.is_some();
            let retried = self.queue.unsent(id, Unsent::Last(unwritten), &lost, |a| {
                cluster.then(|| cluster::Redirect::unsent(a.sent, &link.label))
            });
            debug!(peer = %self.peer, backend = %link.label, unwritten, retried, "requests never written to a lost backend connection");
        }
        let in_flight = self.queue.fail_link(id, &lost);
        if in_flight > 0 {
            metrics::backend_lost(&link.label);
            warn!(peer = %self.peer, backend = %link.label, in_flight, "backend connection lost with requests in flight");
        }
        if std::mem::take(&mut self.mode_pending) {
            // The EXEC that would have changed CLIENT REPLY got an error instead.
            self.mode.command_done();
        }
        self.queue.drain(&mut self.to_client);
        if id == LinkId::Master && (self.txn.is_some() || self.watching || self.state.pinned()) {
            // Its state cannot be given to a new connection: close, as Redis would.
            self.end_after_replies(SessionEnd::BackendLost);
            return;
        }
        let LinkId::Node(_) = id else {
            return;
        };
        // Cluster mode: a transaction, WATCH, tracking or MONITOR on the lost node closes
        // the session as above; subscriptions it held are made again on a confirmed master
        // (`cluster_resubscribe`), hidden from the client.
        let bound_here = self.cl.bound == Some(link.index)
            && (self.txn.is_some() || self.watching || self.state.tracking || self.state.monitor);
        let resubscribe = self.cl.forget(link.index, &self.state);
        if bound_here {
            self.end_after_replies(SessionEnd::BackendLost);
        } else if resubscribe {
            debug!(peer = %self.peer, backend = %link.label, "cluster: subscriptions to make again");
        }
    }
}

impl Session {
    /// Which path a request takes in shared mode (always `Dedicated` otherwise): the
    /// shared connection of the confirmed master when neither the request nor the
    /// session carries connection state, else the session's dedicated link; `Wait` while
    /// the other path still owes answers (per-session order).
    fn shared_route(&mut self, out: &Outgoing) -> pool::Route {
        use pool::Route;
        let routing = &self.rt.config.routing;
        if routing.backend_connections != BackendConnections::Shared {
            return Route::Dedicated;
        }
        let on_shared = self.queue.waiting_on(LinkId::Shared);
        let not_shared = if on_shared {
            Route::Wait
        } else {
            Route::Dedicated
        };
        let shareable = self.cmd_shareable
            && !self.own_link
            && !out.blocking
            && out.frames == 1
            && matches!(out.on_reply, OnReply::Forward)
            && self.txn.is_none()
            && !self.watching
            && !self.rt.passthrough()
            && self.state.shareable();
        let limits = &self.rt.config.limits;
        if !shareable || self.to_client.bytes >= limits.max_reply_buffer / 2 {
            // A client behind on its replies goes on its own link too: Redis then holds
            // what it has not read, as it does for a direct client.
            return not_shared;
        }
        let now = tokio::time::Instant::from_std(self.now);
        let topology = &self.shared.topology;
        let Some(index) = topology.master_cached(&mut self.master_cache, now) else {
            // No confirmed master now: the dedicated path waits for one.
            return not_shared;
        };
        let current = self.upstream.shared.as_ref().filter(|s| s.index == index);
        match current {
            Some(s) if s.conn.usable() => {
                if !s.has_room(limits.max_reply_buffer, limits.max_pending) {
                    return Route::Wait;
                }
            }
            Some(_) => return not_shared,
            None if on_shared => return Route::Wait,
            None => {
                let size = routing.shared_connections;
                let key = self.peer.port() as usize;
                let Some(conn) = self.shared.pools.conn(&self.shared, index, size, key) else {
                    return Route::Dedicated;
                };
                if !conn.usable() {
                    return Route::Dedicated;
                }
                self.upstream.shared = Some(SharedLink::new(index, conn));
            }
        }
        let on_master = self.queue.waiting_on(LinkId::Master);
        if on_shared && on_master {
            return Route::Wait;
        }
        if on_master {
            // Stay on the dedicated link until it has answered everything (a pipeline
            // behind a blocking command goes on reaching Redis, as it always did).
            return Route::Dedicated;
        }
        // The state that needed a connection of its own has ended: release it. Checked
        // first: `take()` would move the whole link out (a `memcpy`) at every request.
        if self.upstream.master.is_some() {
            self.upstream.master = None;
            // Its write offset goes with it.
            self.wait_needs_bump = true;
        }
        Route::Shared
    }

    /// What the shared connection delivered, and whatever else is already there.
    fn on_deliveries(&mut self, first: Delivery) {
        let mut next = Some(first);
        while let Some(d) = next {
            self.replies_at = self.now;
            if let Some(shared) = &mut self.upstream.shared {
                shared.answered(d.answers(), d.bytes());
            }
            match d {
                Delivery::Reply(r) => self.shared_reply(r),
                Delivery::Run(run) => self.shared_run(run),
                Delivery::Fail { n, reply } => {
                    self.queue.fail_first(LinkId::Shared, n, &reply);
                    self.queue.drain(&mut self.to_client);
                }
                Delivery::Unsent { n, reply } => {
                    // Never written: writes are retried on the confirmed master, as
                    // after READONLY.
                    self.queue
                        .unsent(LinkId::Shared, Unsent::First(n), &reply, |_| None);
                    self.queue.drain(&mut self.to_client);
                }
            }
            next = self.upstream.shared.as_mut().and_then(SharedLink::try_recv);
        }
    }

    /// A run of replies from the shared connection. Plain answers (not errors, not out
    /// of band) to plain forwarded requests, the common case, are copied to the client
    /// as whole ranges of the run (an answer over `OutQueue::shares`'s bound goes as its
    /// own zero-copy slice); every other reply goes through `on_reply` as its own
    /// `Reply`, in order.
    fn shared_run(&mut self, run: pool::ReplyRun) {
        if self.upstream.shared.is_none() {
            return;
        }
        // What `on_reply` checks per reply that depends on the session, not the reply:
        // with none of it, only an error or a push is not plain.
        let simple_session = (self.shared.cluster.is_none()
            || self.state.shard_channels.is_empty())
            && (self.state.resp3 || !self.state.subscribed())
            && !self.state.monitor;
        let bytes = &run.bytes;
        // Start of the current reply; the range owed to the client and not copied yet.
        let mut start = 0;
        let mut pending = 0..0;
        for shape in &run.shapes {
            // Clamped: never a reversed or out-of-range slice.
            let end = shape.end.min(bytes.len());
            start = start.min(end);
            let plain = simple_session && !shape.is_error() && shape.kind() != ReplyKind::Push;
            match plain
                .then(|| self.queue.pop_plain_front(LinkId::Shared))
                .flatten()
            {
                Some(a) => {
                    if a.deliver {
                        let big = OutQueue::shares(end - start);
                        if pending.end != start || big {
                            self.to_client
                                .push_copied(bytes, std::mem::replace(&mut pending, start..start));
                        }
                        if big {
                            // Its own zero-copy chunk, as on a dedicated link; the run
                            // of small answers around it is copied.
                            self.to_client.push(bytes.slice(start..end));
                            pending = end..end;
                        } else {
                            pending.end = end;
                        }
                    }
                    self.record_latency(a.sent);
                    if self.queue.front_is_ready() {
                        // Local answers queued behind it go after it.
                        self.to_client
                            .push_copied(bytes, std::mem::replace(&mut pending, end..end));
                        self.queue.drain(&mut self.to_client);
                    }
                }
                None => {
                    self.to_client
                        .push_copied(bytes, std::mem::replace(&mut pending, end..end));
                    let reply = Reply::from_shape(bytes.slice(start..end), shape);
                    self.shared_reply(reply);
                }
            }
            start = end;
        }
        self.to_client.push_copied(bytes, pending);
    }

    fn shared_reply(&mut self, reply: Reply) {
        if self.upstream.shared.is_none() || self.on_reply(reply, LinkId::Shared) {
            return;
        }
        warn!(peer = %self.peer, "shared backend connection sent an unexpected reply; closing session");
        self.upstream.close();
        self.queue.clear();
        self.end_after_replies(SessionEnd::BackendDesync);
    }
}

/// Shadow mode (`protection.mode = "shadow"`): what enforcement would refuse is
/// forwarded, logged at WARN and counted with `mode="shadow"`.
impl Session {
    fn shadow_mode(&self) -> bool {
        self.rt.config.protection.mode == ProtectionMode::Shadow
    }

    /// A refusal becomes `Allow` in shadow mode, after its WARN line and count.
    fn shadow_verdict(&self, verdict: Option<Verdict>) -> Option<Verdict> {
        match verdict {
            Some(Verdict::Deny { command, reason }) if self.shadow_mode() => {
                metrics::shadow_refusal(command);
                let user = self.user.as_ref().map_or("default", |u| u.name.as_str());
                warn!(peer = %self.peer, user, command, reason = reason.text(), mode = "shadow",
                    "would refuse command (shadow mode: forwarded, protection NOT enforced)");
                Some(Verdict::Allow)
            }
            other => other,
        }
    }

    /// In shadow mode an unknown command or subcommand is forwarded (as a write, to the
    /// master) after its WARN line and count; true when it is.
    fn shadow_unknown(&self, req: &Request) -> bool {
        if !self.shadow_mode() {
            return false;
        }
        self.shared.hot.unknown.increment(1);
        metrics::shadow_refusal("unknown");
        let name = req.arg(0).unwrap_or_default();
        warn!(peer = %self.peer, command = %String::from_utf8_lossy(texts::shown(name, 64)), mode = "shadow",
            "would refuse unknown command (shadow mode: forwarded, protection NOT enforced)");
        true
    }
}

/// The server's shutdown signal as a session waits for it. The token's waiter is
/// registered with the shutdown source's waker and polled again only once that waker
/// fired (the token was cancelled): polling the registered waiter takes the token's lock
/// twice (its `is_cancelled` check, then the waiter's waker update), and even
/// `is_cancelled` alone takes it once.
struct ShutdownWait<'a, F> {
    cancelled: std::pin::Pin<&'a mut F>,
    /// `cancelled` waits with the shutdown source's waker, which has not fired since.
    armed: bool,
}

impl<F: Future<Output = ()>> ShutdownWait<'_, F> {
    /// Poll with the shutdown source's waker (`wake::Source::Shutdown`); an armed wait is
    /// not polled again (that would take the token's lock at every wake-up).
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.armed {
            return std::task::Poll::Pending;
        }
        let ready = self.cancelled.as_mut().poll(cx);
        self.armed = ready.is_pending();
        ready
    }
}

/// The idle timer, created when first polled (not for every wake-up of a session that
/// has none).
async fn idle_sleep(idle: std::time::Duration) {
    tokio::time::sleep(idle).await
}

async fn frame_sleep(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
