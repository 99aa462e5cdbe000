//! Shared backend connections (`routing.backend_connections = "shared"`): a few
//! connections per backend, each owned by one task, carrying the stateless commands of
//! every session that holds no connection state.
//!
//! A session hands its connection a `Batch` (the request frames it read in one wake-up,
//! how many, and its inbox); the task writes every batch that is ready in one write, so
//! one wake-up of Redis carries many sessions' requests, and remembers, in order, whose
//! replies come next. Reply frames are routed to the sessions' inboxes in that order.
//! A lost connection answers every session's in-flight requests with the same error a
//! lost dedicated link gives (`texts::link_lost`); the sessions live on. Requests it never
//! wrote (the connection was lost first, or could not be opened) are handed back
//! (`Delivery::Unsent`): the session retries them as it retries a write refused with
//! READONLY, and the connection writes nothing more of that session until it has taken
//! them back (`Mailbox::halted`), so its requests still run in order.
//!
//! A session always uses the same connection of a backend's pool (its replies then come
//! back in the order it sent them), and the proxy keeps per-session order across the
//! shared and its dedicated path by switching only when nothing is in flight on the other.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc::{self, error::TryRecvError, UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backend::{BackendLink, Handshake};
use crate::command::{AclCategories, CommandSpec, Special};
use crate::metrics;
use crate::net::Stream;
use crate::protocol::{texts, Reply, ReplyScanner, ReplyShape};

use super::out::OutQueue;
use super::Shared;

/// After a failed connect, the least time before the next attempt (sessions take their
/// dedicated path meanwhile, which waits for a master as usual).
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// Where a request goes in shared mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// The confirmed master's shared connection.
    Shared,
    /// The session's own link (today's path).
    Dedicated,
    /// After what the other path still owes (the request is parked).
    Wait,
}

/// Whether a command can run on a connection other sessions use: it neither reads nor
/// changes connection state (transactions, pub/sub, `CLIENT ...`, `SELECT`, `WAIT`, ...)
/// nor blocks the connection.
pub(super) fn shareable_command(spec: &CommandSpec) -> bool {
    matches!(spec.special, Special::None | Special::Ping)
        // Shadow mode forwards unknown commands: what they do is not known.
        && !std::ptr::eq(spec, &crate::command::UNKNOWN)
        && !spec.may_block()
        && !spec.acl.intersects(AclCategories::TRANSACTION)
        && (!spec.acl.intersects(AclCategories::CONNECTION) || matches!(spec.name, "ping" | "echo"))
}

/// Commands after which a session keeps its own link in shared mode: those whose answer
/// names the connection's id (`CLIENT ID`, `CLIENT INFO`, `HELLO`), so the id it saw
/// stays true, and those that count the connection's own writes (`counts_own_writes`).
pub(super) fn keeps_own_link(spec: &CommandSpec) -> bool {
    matches!(spec.name, "client|id" | "client|info" | "hello") || counts_own_writes(spec)
}

/// `WAIT` and `WAITAOF` wait for the writes of the connection they run on (Redis's
/// `c->woff`, the replication offset after its last propagated command: `call()` in
/// server.c).
pub(super) fn counts_own_writes(spec: &CommandSpec) -> bool {
    matches!(spec.name, "wait" | "waitaof")
}

/// A command that changes nothing yet is propagated to replicas (PUBLISH outside cluster
/// mode: `publishCommand` forces propagation), sent unseen before a `WAIT` on a link
/// that did not carry the session's writes: it moves that link's write offset to the
/// current one, which covers the writes the shared connection carried (all answered by
/// then). Its only trace is a message on this channel.
pub(super) fn wait_offset_bump() -> Bytes {
    crate::protocol::Request::from_args(&[
        b"PUBLISH".as_slice(),
        b"__portcullis__:wait-offset",
        b"",
    ])
    .into_frame()
}

/// What a shared connection sends a session, in the order of its requests.
#[derive(Debug)]
pub(super) enum Delivery {
    /// The next reply frame.
    Reply(Reply),
    /// Several consecutive reply frames, read together.
    Run(ReplyRun),
    /// The next `n` requests are answered with `reply` (the connection was lost with
    /// them written: they may have run).
    Fail { n: u32, reply: Bytes },
    /// The next `n` requests were never written (the connection was lost before, or could
    /// not be opened): the session retries them, or answers them with `reply`.
    Unsent { n: u32, reply: Bytes },
}

/// Consecutive replies for one session, in one buffer: split off the connection's read
/// buffer once for the whole run, not once per reply.
#[derive(Debug)]
pub(super) struct ReplyRun {
    /// The replies' bytes, back to back.
    pub(super) bytes: Bytes,
    /// Each reply's end in `bytes`, and its shape.
    pub(super) shapes: Vec<ReplyShape>,
}

impl ReplyRun {
    /// The replies one by one (each a slice of `bytes`).
    pub(super) fn into_replies(self) -> impl Iterator<Item = Reply> {
        let ReplyRun { bytes, shapes } = self;
        let mut start = 0;
        shapes.into_iter().map(move |shape| {
            // Clamped both ways: never a reversed or out-of-range slice (a panic).
            let end = shape.end.min(bytes.len());
            let frame = bytes.slice(start.min(end)..end);
            start = end;
            Reply::from_shape(frame, &shape)
        })
    }
}

/// Request frames up to this size are gathered into one buffer; bigger ones travel as
/// their own chunk, never copied.
const GATHER_MAX: usize = 2048;

/// Most reply slots reserved at once for one session's run of frames (a run of more
/// grows as usual).
const MAX_GROUP_RESERVE: usize = 1024;

/// Requests a session may have in flight on a shared connection before its first reply
/// tells how big its replies are (`SharedLink::has_room`).
const FIRST_WINDOW: usize = 32;

/// A session's address at its shared connection.
#[derive(Debug)]
struct Mailbox {
    /// Deliveries not taken by the session yet (a plain queue and a waker: far smaller
    /// per session than a channel, which allocates a block of slots up front).
    inbox: Mutex<VecDeque<Delivery>>,
    /// The session's task. An `AtomicWaker`, not a `Notify`: registering is an atomic
    /// swap that keeps the same task's waker, where each `Notify` wait links and unlinks a
    /// waiter under a lock (measured: 3 % of the proxy's CPU at pipeline 1).
    ready: AtomicWaker,
    /// The session ended: deliveries are dropped.
    closed: AtomicBool,
    /// Request bytes handed to the connection and not written to the backend yet: the
    /// session stops reading its client past `limits.max_reply_buffer`, as it does for
    /// its own link's unwritten bytes.
    unwritten: AtomicUsize,
    /// Reply bytes in the inbox, not taken by the session yet.
    undelivered: AtomicUsize,
    /// Deliveries in the inbox (changed under its lock): an empty inbox is seen without
    /// taking the lock, at every wait of the session.
    queued: AtomicUsize,
    /// Requests of the session were handed back unwritten (`Delivery::Unsent`): its later
    /// batches are handed back too, never written before those are retried. Cleared by
    /// the session once nothing of it is left with the connection.
    halted: AtomicBool,
}

impl Mailbox {
    fn send(&self, d: Delivery, bytes: usize) {
        // A session that ended takes nothing more: its replies are discarded.
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut inbox) = self.inbox.lock() else {
            return;
        };
        self.undelivered.fetch_add(bytes, Ordering::Relaxed);
        inbox.push_back(d);
        // Before the wake below: a session that registered its waker and then saw 0
        // is woken after this.
        self.queued.fetch_add(1, Ordering::Release);
        drop(inbox);
        self.ready.wake();
    }

    /// The next delivery, when one is there.
    fn take(&self) -> Option<Delivery> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut inbox = self.inbox.lock().ok()?;
        let d = inbox.pop_front();
        if d.is_some() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        if inbox.is_empty() && inbox.capacity() > 8 {
            // Give back what a burst grew.
            *inbox = VecDeque::new();
        }
        d
    }
}

/// Requests one session read in one wake-up.
#[derive(Debug)]
struct Batch {
    /// Chunks before `last`: big frames and what was gathered before each (usually none,
    /// so no allocation per batch).
    parts: Vec<Bytes>,
    /// The frames gathered after the last big one (all of them, usually).
    last: Bytes,
    len: usize,
    count: u32,
    mailbox: Arc<Mailbox>,
}

/// `PoolConn::state`: opening for the first time.
const NEW: u8 = 0;
/// `PoolConn::state`: open and serving.
const UP: u8 = 1;
/// `PoolConn::state`: lost, or a connect failed.
const DOWN: u8 = 2;

/// The handle of one shared connection.
#[derive(Debug)]
pub(super) struct PoolConn {
    tx: UnboundedSender<Batch>,
    /// `NEW`, `UP` or `DOWN`. Sessions send while it is up, or opening for the first
    /// time (their batches wait for it). After a loss or a failed connect they take their
    /// dedicated path until it is up again: that path connects, and waits for a master,
    /// as it always did, so a dead master is not reported as unreachable in between.
    state: AtomicU8,
    /// Asks the task to connect.
    kick: Notify,
    /// Backend label, for error texts and logs.
    pub(super) label: String,
}

impl PoolConn {
    /// Whether sessions may send to it now; when not, asks it to (re)connect.
    pub(super) fn usable(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            UP => true,
            NEW => true,
            _ => {
                self.kick.notify_one();
                false
            }
        }
    }

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
    }
}

/// One backend's shared connections.
type BackendPool = Arc<[Arc<PoolConn>]>;

/// Every backend's shared connections, opened when first needed.
#[derive(Debug, Default)]
pub struct Pools {
    by_backend: Mutex<Vec<Option<BackendPool>>>,
    stop: CancellationToken,
}

impl Pools {
    /// Stop every shared connection (the proxy is done).
    pub fn close(&self) {
        self.stop.cancel();
    }

    /// Shared connections open or opening (all backends).
    pub fn connections(&self) -> usize {
        self.by_backend
            .lock()
            .map(|v| v.iter().flatten().map(|p| p.len()).sum())
            .unwrap_or(0)
    }

    /// The shared connection of backend `index` that session `key` uses; started (with
    /// `size` connections for that backend) on first use.
    pub(super) fn conn(
        &self,
        shared: &Arc<Shared>,
        index: usize,
        size: usize,
        key: usize,
    ) -> Option<Arc<PoolConn>> {
        let pool = {
            let mut by_backend = self.by_backend.lock().ok()?;
            if by_backend.len() <= index {
                by_backend.resize(index + 1, None);
            }
            match &by_backend[index] {
                Some(p) => p.clone(),
                None => {
                    let label = shared
                        .topology
                        .load()
                        .backends
                        .get(index)?
                        .config
                        .label()
                        .to_string();
                    let conns: BackendPool = (0..size.max(1))
                        .map(|_| spawn_conn(shared.clone(), index, label.clone(), &self.stop))
                        .collect();
                    by_backend[index] = Some(conns.clone());
                    conns
                }
            }
        };
        pool.get(key % pool.len()).cloned()
    }
}

fn spawn_conn(
    shared: Arc<Shared>,
    index: usize,
    label: String,
    stop: &CancellationToken,
) -> Arc<PoolConn> {
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Arc::new(PoolConn {
        tx,
        state: AtomicU8::new(NEW),
        kick: Notify::new(),
        label,
    });
    // Connect at once: the first sessions' requests wait for it.
    conn.kick.notify_one();
    tokio::spawn(run_conn(shared, index, conn.clone(), rx, stop.clone()));
    conn
}

/// A session's side of its shared connection: the requests of this wake-up, and the
/// inbox its replies arrive in.
#[derive(Debug)]
pub(super) struct SharedLink {
    /// Index of the backend in the topology.
    pub(super) index: usize,
    pub(super) conn: Arc<PoolConn>,
    /// Small frames of this wake-up, gathered.
    small: BytesMut,
    /// What this wake-up sends, in order (with `small` after it).
    parts: Vec<Bytes>,
    len: usize,
    count: u32,
    mailbox: Arc<Mailbox>,
    /// Requests sent and not answered yet.
    in_flight: usize,
    /// Running mean of this session's reply sizes (0: none seen yet).
    mean_reply: usize,
}

impl SharedLink {
    pub(super) fn new(index: usize, conn: Arc<PoolConn>) -> SharedLink {
        SharedLink {
            index,
            conn,
            small: BytesMut::new(),
            parts: Vec::new(),
            len: 0,
            count: 0,
            mailbox: Arc::new(Mailbox {
                inbox: Mutex::new(VecDeque::new()),
                ready: AtomicWaker::new(),
                closed: AtomicBool::new(false),
                unwritten: AtomicUsize::new(0),
                undelivered: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
                halted: AtomicBool::new(false),
            }),
            in_flight: 0,
            mean_reply: 0,
        }
    }

    /// Whether one more request may go out now: a session's replies in flight on a shared
    /// connection are read into the proxy whatever its client does, so their expected
    /// size is bounded by `budget` (`limits.max_reply_buffer`). Before any reply is seen
    /// the window is `FIRST_WINDOW` requests.
    pub(super) fn has_room(&self, budget: usize, max_pending: usize) -> bool {
        let window = match self.mean_reply {
            0 => FIRST_WINDOW,
            mean => (budget / mean).clamp(FIRST_WINDOW, max_pending.max(FIRST_WINDOW)),
        };
        self.in_flight < window
    }

    /// `n` requests were answered with `bytes` of replies.
    pub(super) fn answered(&mut self, n: usize, bytes: usize) {
        self.in_flight = self.in_flight.saturating_sub(n);
        if self.in_flight == 0 && self.count == 0 {
            // Nothing of this session is with the connection: it may write again.
            self.mailbox.halted.store(false, Ordering::Release);
        }
        if n > 0 && bytes > 0 {
            let mean = bytes / n;
            self.mean_reply = if self.mean_reply == 0 {
                mean.max(1)
            } else {
                ((self.mean_reply * 3 + mean) / 4).max(1)
            };
        }
    }

    /// Queue a request frame (answered by one reply frame).
    pub(super) fn send(&mut self, frame: &Bytes) {
        if frame.len() <= GATHER_MAX {
            self.small.extend_from_slice(frame);
        } else {
            if !self.small.is_empty() {
                self.parts.push(self.small.split().freeze());
            }
            self.parts.push(frame.clone());
        }
        self.len += frame.len();
        self.count += 1;
        self.in_flight += 1;
    }

    /// Request bytes not written to the backend yet, and reply bytes not taken yet.
    pub(super) fn queued_bytes(&self) -> usize {
        self.len
            + self.mailbox.unwritten.load(Ordering::Relaxed)
            + self.mailbox.undelivered.load(Ordering::Relaxed)
    }

    /// Whether requests are queued for the next batch (`flush` hands them on).
    pub(super) fn has_batch(&self) -> bool {
        self.count > 0
    }

    /// Hand what was queued to the connection. A connection task that is gone hands it
    /// back at once (`Delivery::Unsent`: never written, so the session may retry it).
    pub(super) fn flush(&mut self) {
        if self.count == 0 {
            return;
        }
        let len = std::mem::take(&mut self.len);
        self.mailbox.unwritten.fetch_add(len, Ordering::Relaxed);
        let batch = Batch {
            parts: std::mem::take(&mut self.parts),
            last: self.small.split().freeze(),
            len,
            count: std::mem::take(&mut self.count),
            mailbox: self.mailbox.clone(),
        };
        if let Err(mpsc::error::SendError(b)) = self.conn.tx.send(batch) {
            // The connection task is gone: nothing of the batch was written.
            b.mailbox.unwritten.fetch_sub(b.len, Ordering::Relaxed);
            hand_back(&b.mailbox, b.count, &texts::link_lost(&self.conn.label));
        }
    }

    /// The next delivery, or `Pending` with the task registered to be woken by the next
    /// one (cluster mode polls several links in one wait).
    pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Delivery> {
        // Registered before the check: a delivery pushed after it wakes the task.
        self.mailbox.ready.register(cx.waker());
        match self.try_recv() {
            Some(d) => Poll::Ready(d),
            None => Poll::Pending,
        }
    }

    /// The next delivery, when one is there.
    pub(super) fn try_recv(&mut self) -> Option<Delivery> {
        let d = self.mailbox.take();
        self.taken(d.as_ref());
        d
    }

    fn taken(&self, d: Option<&Delivery>) {
        let bytes = d.map_or(0, Delivery::bytes);
        if bytes > 0 {
            self.mailbox.undelivered.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

impl Drop for SharedLink {
    fn drop(&mut self) {
        self.mailbox.closed.store(true, Ordering::Release);
        if let Ok(mut inbox) = self.mailbox.inbox.lock() {
            inbox.clear();
            self.mailbox.queued.store(0, Ordering::Relaxed);
        }
    }
}

impl Delivery {
    /// Requests it answers.
    pub(super) fn answers(&self) -> usize {
        match self {
            Delivery::Reply(_) => 1,
            Delivery::Run(run) => run.shapes.len(),
            Delivery::Fail { n, .. } | Delivery::Unsent { n, .. } => *n as usize,
        }
    }

    /// Reply bytes it carries.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Delivery::Reply(r) => r.frame().len(),
            Delivery::Run(run) => run.bytes.len(),
            Delivery::Fail { .. } | Delivery::Unsent { .. } => 0,
        }
    }
}

/// Whose replies come next on a connection.
struct Owed {
    mailbox: Arc<Mailbox>,
    remaining: u32,
}

/// Why a connection's service ended.
enum Stop {
    /// The proxy is done.
    Closed,
    /// The connection broke: what was owed is answered with an error, then it reconnects.
    Lost(String),
}

async fn run_conn(
    shared: Arc<Shared>,
    index: usize,
    conn: Arc<PoolConn>,
    mut rx: UnboundedReceiver<Batch>,
    stop: CancellationToken,
) {
    // Batches sent while the connection was up, not written when it was lost.
    let mut waiting: Option<Batch> = None;
    loop {
        if waiting.is_none() {
            tokio::select! {
                _ = conn.kick.notified() => {}
                b = rx.recv() => match b {
                    Some(b) => waiting = Some(b),
                    None => return,
                },
                _ = stop.cancelled() => return,
            }
        }
        let rt = shared.runtime.load_full();
        let Some(cfg) = shared
            .topology
            .load()
            .backends
            .get(index)
            .map(|b| b.config.clone())
        else {
            hand_back_all(
                waiting.take(),
                &mut rx,
                &Bytes::from_static(texts::NO_BACKEND),
            );
            return;
        };
        let opened = BackendLink::open(
            &cfg,
            &Handshake::default(),
            rt.config.limits.connect_timeout,
            rt.reply_limits(),
            rt.backend_tls.as_deref(),
        )
        .await;
        let link = match opened {
            Ok(link) => link,
            Err(e) => {
                metrics::backend_connect_error(cfg.label());
                warn!(backend = cfg.label(), error = %e, "shared backend connection failed");
                conn.set(DOWN);
                // Refused: down at once; timed out: silence, the prober decides.
                shared.topology.report_connect_error(index, e.evidence());
                // Batches waiting here were never written: handed back, for the
                // sessions to retry on the confirmed master (the slot's, in cluster
                // mode). A request they cannot retry gets, with no confirmed master left,
                // the answer the dedicated path gives then (MASTERDOWN); otherwise, and
                // always in cluster mode (where the single-master decision does not
                // apply: its text would name a split brain), the connect error.
                let reply =
                    if shared.cluster.is_none() && shared.topology.load().master_now().is_none() {
                        shared.masterdown()
                    } else {
                        texts::unreachable(cfg.label(), &e)
                    };
                hand_back_all(waiting.take(), &mut rx, &reply);
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        };
        debug!(backend = cfg.label(), "shared backend connection open");
        let mut io = ConnIo {
            stream: link.stream,
            buf: link.leftover,
            batch: 0,
            scanner: ReplyScanner::new(rt.reply_limits()),
            out: OutQueue::default(),
            owed: VecDeque::new(),
            writes: VecDeque::new(),
            halted_reply: texts::link_lost(&conn.label),
        };
        if let Some(b) = waiting.take() {
            io.take(b);
        }
        conn.set(UP);
        let stopped = io.serve(&mut rx, &stop).await;
        // From now on sessions take their dedicated path until it is up again.
        conn.set(DOWN);
        match stopped {
            Stop::Closed => return,
            Stop::Lost(why) => {
                debug!(backend = %conn.label, error = %why, "shared backend connection lost");
                let reply = texts::link_lost(&conn.label);
                // The batches not one byte of which was written are the last ones owed
                // (only the first unwritten batch can be partly written).
                let unsent = io.writes.iter().filter(|w| w.left == w.len).count();
                let written = io.owed.len().saturating_sub(unsent);
                let mut in_flight = 0;
                for (i, owed) in io.owed.drain(..).enumerate() {
                    if i < written {
                        in_flight += owed.remaining;
                        owed.mailbox.send(
                            Delivery::Fail {
                                n: owed.remaining,
                                reply: reply.clone(),
                            },
                            0,
                        );
                    } else {
                        hand_back(&owed.mailbox, owed.remaining, &reply);
                    }
                }
                // What was not written never will be (on this connection).
                for w in io.writes.drain(..) {
                    w.mailbox.unwritten.fetch_sub(w.left, Ordering::Relaxed);
                }
                if in_flight > 0 {
                    metrics::backend_lost(&conn.label);
                    warn!(backend = %conn.label, in_flight, "shared backend connection lost with requests in flight");
                }
                // Reconnect at once; batches not written yet go to the new connection.
                waiting = match rx.try_recv() {
                    Ok(b) => Some(b),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                };
                conn.kick.notify_one();
            }
        }
    }
}

/// Hand `n` requests of `mailbox`'s session back unwritten (`Delivery::Unsent`, `reply`
/// for those it cannot retry); nothing more of that session is written until it has
/// taken them back.
fn hand_back(mailbox: &Mailbox, n: u32, reply: &Bytes) {
    mailbox.halted.store(true, Ordering::Release);
    mailbox.send(
        Delivery::Unsent {
            n,
            reply: reply.clone(),
        },
        0,
    );
}

/// Hand `first` and every batch already queued back unwritten.
fn hand_back_all(first: Option<Batch>, rx: &mut UnboundedReceiver<Batch>, reply: &Bytes) {
    let mut next = first.or_else(|| rx.try_recv().ok());
    while let Some(b) = next {
        b.mailbox.unwritten.fetch_sub(b.len, Ordering::Relaxed);
        hand_back(&b.mailbox, b.count, reply);
        next = rx.try_recv().ok();
    }
}

/// A batch's bytes not written yet (to credit `Mailbox::unwritten`).
struct Unwritten {
    mailbox: Arc<Mailbox>,
    /// Bytes left to write.
    left: usize,
    /// The batch's size: `left == len` means nothing of it was written.
    len: usize,
}

/// One open shared connection.
struct ConnIo {
    stream: Stream,
    buf: BytesMut,
    batch: usize,
    scanner: ReplyScanner,
    out: OutQueue,
    owed: VecDeque<Owed>,
    /// Whose bytes `out` holds, in order.
    writes: VecDeque<Unwritten>,
    /// The answer for requests of a halted session that it cannot retry.
    halted_reply: Bytes,
}

impl ConnIo {
    fn take(&mut self, b: Batch) {
        if b.mailbox.halted.load(Ordering::Acquire) {
            // Earlier requests of this session were handed back: these follow them.
            b.mailbox.unwritten.fetch_sub(b.len, Ordering::Relaxed);
            hand_back(&b.mailbox, b.count, &self.halted_reply);
            return;
        }
        for part in b.parts {
            self.out.push_chunk(part);
        }
        if !b.last.is_empty() {
            self.out.push_chunk(b.last);
        }
        self.writes.push_back(Unwritten {
            mailbox: b.mailbox.clone(),
            left: b.len,
            len: b.len,
        });
        self.owed.push_back(Owed {
            mailbox: b.mailbox,
            remaining: b.count,
        });
    }

    /// `n` bytes of `out` were written.
    fn written(&mut self, mut n: usize) {
        while n > 0 {
            let Some(w) = self.writes.front_mut() else {
                return;
            };
            let k = n.min(w.left);
            w.mailbox.unwritten.fetch_sub(k, Ordering::Relaxed);
            w.left -= k;
            n -= k;
            if w.left == 0 {
                self.writes.pop_front();
            }
        }
    }

    async fn serve(&mut self, rx: &mut UnboundedReceiver<Batch>, stop: &CancellationToken) -> Stop {
        // A batch just arrived: the scheduler runs the woken connection task right after
        // the session that sent it (tokio's LIFO slot), before other sessions whose
        // clients are readable in the same tick. Yielding once lets them queue their
        // requests too, so one write (one wake-up of Redis) carries all of them.
        let mut gather = false;
        loop {
            if std::mem::take(&mut gather) {
                tokio::task::yield_now().await;
            }
            // Everything ready goes out in one write.
            loop {
                match rx.try_recv() {
                    Ok(b) => self.take(b),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Stop::Closed,
                }
            }
            if !self.out.is_empty() {
                match self.out.try_write(&mut self.stream) {
                    Ok(n) => self.written(n),
                    Err(e) => return Stop::Lost(e.to_string()),
                }
            }
            if let Err(e) = self.stream.flush_pending() {
                return Stop::Lost(e.to_string());
            }
            let wants_write = !self.out.is_empty() || self.stream.wants_flush();
            tokio::select! {
                biased;
                r = self.stream.readable() => {
                    if let Err(e) = r {
                        return Stop::Lost(e.to_string());
                    }
                    if let Err(why) = self.read() {
                        return Stop::Lost(why);
                    }
                }
                b = rx.recv() => match b {
                    Some(b) => {
                        self.take(b);
                        gather = true;
                    }
                    None => return Stop::Closed,
                },
                _ = self.stream.writable(), if wants_write => {}
                _ = stop.cancelled() => return Stop::Closed,
            }
        }
    }

    /// Read what the socket has and route every complete reply.
    fn read(&mut self) -> Result<(), String> {
        match self.stream.read_batch(&mut self.buf, &mut self.batch) {
            Ok(0) => return Err("closed by the backend".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        // Consecutive frames for one session travel together, as one run of bytes.
        let mut shapes: Vec<ReplyShape> = Vec::new();
        loop {
            let shape = match self.scanner.next_in_place(&mut self.buf) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => {
                    self.deliver(&mut shapes);
                    return Err(e.to_string());
                }
            };
            let Some(front) = self.owed.front_mut() else {
                self.deliver(&mut shapes);
                return Err("the backend sent a reply nobody asked for".into());
            };
            if shapes.is_empty() && front.remaining > 1 {
                // Sized once for the session's run of frames (moved out on delivery).
                shapes.reserve_exact((front.remaining as usize).min(MAX_GROUP_RESERVE));
            }
            shapes.push(shape);
            front.remaining = front.remaining.saturating_sub(1);
            if front.remaining == 0 {
                self.deliver(&mut shapes);
                self.owed.pop_front();
            }
        }
        self.deliver(&mut shapes);
        super::release_if_big(&mut self.buf);
        Ok(())
    }

    /// Send the replies scanned so far (`shapes`: for the front of `owed`) to its
    /// session, split off the read buffer as one run.
    fn deliver(&mut self, shapes: &mut Vec<ReplyShape>) {
        let bytes = self.scanner.split_scanned(&mut self.buf);
        let Some(front) = self.owed.front() else {
            shapes.clear();
            return;
        };
        let d = match shapes.len() {
            0 => return,
            1 => match shapes.pop() {
                Some(shape) => Delivery::Reply(Reply::from_shape(bytes, &shape)),
                None => return,
            },
            _ => Delivery::Run(ReplyRun {
                bytes,
                shapes: std::mem::take(shapes),
            }),
        };
        let bytes = d.bytes();
        front.mailbox.send(d, bytes);
    }
}
