//! The session's backend side: its dedicated connections (one to the confirmed master,
//! one to a replica for reads), each a stream with its read buffer, reply scanner and
//! output queue. The session hands it request frames (`send`) and takes reply frames
//! back; where they go is decided by the session. A shared or per-shard upstream keeps
//! this surface.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};

use crate::backend::{BackendLink, Handshake, Liveness};
use crate::net::Stream;
use crate::protocol::{Reply, ReplyError, ReplyLimits, ReplyScanner};
use crate::tls::BackendTls;

use super::out::OutQueue;
use super::pool::{Delivery, SharedLink};

/// Which of the session's backend connections a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkId {
    /// The confirmed master: writes, transactions, scripts, pub/sub, blocking commands.
    Master,
    /// A replica, for reads when `routing.reads` allows it.
    Replica,
    /// The master through a shared connection (`routing.backend_connections = "shared"`):
    /// replies arrive in the session's inbox.
    Shared,
    /// Cluster mode: the session's link at this position of `Upstream::nodes` (a byte,
    /// so per-request values stay small).
    Node(u8),
    /// Cluster mode: the shared connection at this position of `Upstream::shared_nodes`.
    SharedNode(u8),
}

/// One open backend connection of a session.
#[derive(Debug)]
pub(super) struct Link {
    /// Index of the backend in the topology.
    pub(super) index: usize,
    stream: Stream,
    buf: BytesMut,
    /// Bytes of the previous read batch (sizes the next read).
    batch: usize,
    scanner: ReplyScanner,
    out: OutQueue,
    /// Sizes of the frames queued by `send` and not wholly written yet, in order (their
    /// sum is `sends_bytes`): when the link is lost, the requests never written did not
    /// run and can be retried (`unwritten_requests`).
    sends: VecDeque<usize>,
    sends_bytes: usize,
    /// The client closed its sending side: once `out` is written, so does this link.
    shut_write: ShutWrite,
    /// Label for logs and metrics.
    pub(super) label: String,
    /// Where replies read here count as the backend's proof of life (`probe.down_after`).
    liveness: Arc<Liveness>,
    /// The master link's read readiness is registered with the master source's waker and
    /// has not fired since (`wake.rs`; unused on other links).
    armed: bool,
}

/// Half-close progress of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShutWrite {
    No,
    Wanted,
    Done,
}

/// Why a link read ended.
#[derive(Debug)]
pub(super) enum LinkEnd {
    /// The backend closed the connection.
    Closed,
    Io(io::Error),
    Protocol(ReplyError),
}

impl Link {
    /// Open a connection to backend `index` at `cfg`, with `state` replayed; replies read
    /// on it are recorded in `liveness`.
    pub(super) async fn open(
        index: usize,
        cfg: &crate::config::BackendConfig,
        liveness: Arc<Liveness>,
        state: &Handshake,
        timeout: std::time::Duration,
        limits: ReplyLimits,
        tls: Option<&BackendTls>,
    ) -> Result<Link, crate::backend::BackendError> {
        let link = BackendLink::open(cfg, state, timeout, limits, tls).await?;
        Ok(Link {
            index,
            stream: link.stream,
            buf: link.leftover,
            batch: 0,
            scanner: ReplyScanner::new(limits),
            out: OutQueue::default(),
            sends: VecDeque::new(),
            sends_bytes: 0,
            shut_write: ShutWrite::No,
            label: cfg.label().to_string(),
            liveness,
            armed: false,
        })
    }

    /// Queue a request frame.
    pub(super) fn send(&mut self, frame: &Bytes) {
        self.out.push_ref(frame);
        if !frame.is_empty() {
            self.sends.push_back(frame.len());
            self.sends_bytes += frame.len();
        }
    }

    /// Frames queued by `send` that did not reach the socket whole: the last ones sent.
    /// A backend never ran them (Redis runs only complete commands); bytes handed to a
    /// TLS session count as written, bytes in the batch of sends do not until sent.
    pub(super) fn unwritten_requests(&mut self) -> usize {
        self.forget_written();
        let unwritten = self.unwritten_bytes();
        let (mut n, mut bytes) = (0, 0);
        for size in self.sends.iter().rev() {
            if bytes >= unwritten {
                break;
            }
            bytes += size;
            n += 1;
        }
        n
    }

    /// Request bytes not on the socket yet: queued here, or in the batch of sends
    /// (`uring`) and not sent.
    fn unwritten_bytes(&self) -> usize {
        self.out.bytes + self.stream.held_bytes()
    }

    /// Drop the sizes of frames written whole.
    fn forget_written(&mut self) {
        let unwritten = self.unwritten_bytes();
        while let Some(&front) = self.sends.front() {
            if self.sends_bytes - front < unwritten {
                break;
            }
            self.sends.pop_front();
            self.sends_bytes -= front;
        }
        // Give back only what a burst far past a pipeline grew: a pipeline of a few hundred
        // requests must not reallocate the queue at every batch.
        if self.sends.is_empty() && self.sends.capacity() > 4096 {
            self.sends = VecDeque::new();
        }
    }

    /// Request bytes not yet written.
    pub(super) fn queued_bytes(&self) -> usize {
        self.unwritten_bytes()
    }

    /// Bytes or TLS records waiting for the socket.
    pub(super) fn has_output(&self) -> bool {
        !self.out.is_empty() || self.stream.wants_flush()
    }

    /// Whether a half-close is wanted and not yet done (the loop waits for writability).
    pub(super) fn wants_shutdown(&self) -> bool {
        self.shut_write == ShutWrite::Wanted
    }

    /// Whether `flush` has something to do on this link: output or a half-close.
    pub(super) fn wants_write(&self) -> bool {
        self.has_output() || self.wants_shutdown()
    }

    /// Write what the socket takes now (with `batch`, small output goes to this thread's
    /// batch of sends and counts as written, as bytes handed to a TLS session do; what
    /// the socket does not take comes back and wakes `batch`); then, when asked for and
    /// everything is written, close the sending side.
    pub(super) fn flush(&mut self, batch: Option<&std::task::Waker>) -> io::Result<()> {
        if !self.out.is_empty() {
            let written = match batch {
                Some(waker) => self.out.try_write_batched(&mut self.stream, waker),
                None => self.out.try_write(&mut self.stream),
            };
            self.forget_written();
            written?;
        }
        if self.shut_write == ShutWrite::Wanted && self.out.is_empty() {
            // The half-close must follow the bytes: those still in the batch go now.
            self.stream.settle()?;
        } else {
            self.stream.flush_pending()?;
        }
        if self.shut_write == ShutWrite::Wanted && !self.has_output() {
            self.stream.shutdown_write()?;
            self.shut_write = ShutWrite::Done;
        }
        Ok(())
    }

    /// Close the sending side once everything queued is written: Redis then answers
    /// what it read and closes, exactly as for a client that half-closed to it directly.
    pub(super) fn shutdown_when_flushed(&mut self) {
        if self.shut_write == ShutWrite::No {
            self.shut_write = ShutWrite::Wanted;
        }
    }

    /// Whether the sending side is closed or about to be.
    pub(super) fn is_shutting(&self) -> bool {
        self.shut_write != ShutWrite::No
    }

    /// Wait until the socket is readable (or has an error).
    pub(super) async fn readable(&mut self) {
        // This registers the task's own waker in the stream's slot, replacing the master
        // source's (`wake.rs`): the session's wait must poll this link again.
        self.armed = false;
        // The poll form keeps the stream's one reader waker slot (see `Session::wait`).
        let _ = std::future::poll_fn(|cx| self.stream.poll_readable(cx)).await;
    }

    /// Wait until the socket is writable.
    pub(super) async fn writable(&self) {
        let _ = std::future::poll_fn(|cx| self.stream.poll_writable(cx)).await;
    }

    /// Read what the socket has (bytes read at `now` are the backend's proof of life).
    /// `Ok(false)`: nothing now.
    pub(super) fn read(&mut self, now: std::time::Instant) -> Result<bool, LinkEnd> {
        match self.stream.read_batch(&mut self.buf, &mut self.batch) {
            Ok(0) => Err(LinkEnd::Closed),
            Ok(_) => {
                self.liveness.record(tokio::time::Instant::from_std(now));
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(LinkEnd::Io(e)),
        }
    }

    /// The next complete reply already read, if any.
    pub(super) fn next_reply(&mut self) -> Result<Option<Reply>, LinkEnd> {
        match self.scanner.next(&mut self.buf) {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => {
                super::release_if_big(&mut self.buf);
                Ok(None)
            }
            Err(e) => Err(LinkEnd::Protocol(e)),
        }
    }
}

/// A session's backend connections.
#[derive(Debug, Default)]
pub(super) struct Upstream {
    pub(super) master: Option<Link>,
    pub(super) replica: Option<Link>,
    /// The replica link predates a state change (SELECT, HELLO, ...): reopen it when idle.
    pub(super) replica_stale: bool,
    /// The master's shared connection, while the session uses it.
    pub(super) shared: Option<SharedLink>,
    /// Cluster mode: one link per node the session needed, at stable positions
    /// (`LinkId::Node`); `None` where a link ended.
    pub(super) nodes: Vec<Option<Link>>,
    /// Cluster mode, `backend_connections = "shared"`: the node's shared connection per
    /// node the session sent stateless requests to (`LinkId::SharedNode`).
    pub(super) shared_nodes: Vec<Option<SharedLink>>,
}

impl Upstream {
    /// The link `id`, when open.
    pub(super) fn get(&self, id: LinkId) -> Option<&Link> {
        match id {
            LinkId::Master => self.master.as_ref(),
            LinkId::Replica => self.replica.as_ref(),
            LinkId::Shared => None,
            LinkId::Node(p) => self.nodes.get(usize::from(p))?.as_ref(),
            LinkId::SharedNode(_) => None,
        }
    }

    /// The link `id`, when open.
    pub(super) fn get_mut(&mut self, id: LinkId) -> Option<&mut Link> {
        match id {
            LinkId::Master => self.master.as_mut(),
            LinkId::Replica => self.replica.as_mut(),
            LinkId::Shared => None,
            LinkId::Node(p) => self.nodes.get_mut(usize::from(p))?.as_mut(),
            LinkId::SharedNode(_) => None,
        }
    }

    /// Take link `id` out (it ended).
    pub(super) fn take(&mut self, id: LinkId) -> Option<Link> {
        match id {
            LinkId::Master => self.master.take(),
            LinkId::Replica => self.replica.take(),
            LinkId::Shared => None,
            LinkId::Node(p) => self.nodes.get_mut(usize::from(p))?.take(),
            LinkId::SharedNode(_) => None,
        }
    }

    /// Request bytes waiting for the backends.
    pub(super) fn queued_bytes(&self) -> usize {
        self.own_links().map(Link::queued_bytes).sum::<usize>()
            + self
                .shared_links()
                .map(SharedLink::queued_bytes)
                .sum::<usize>()
    }

    /// The shared connection `id` (`LinkId::SharedNode`).
    pub(super) fn shared_node_mut(&mut self, id: LinkId) -> Option<&mut SharedLink> {
        match id {
            LinkId::SharedNode(p) => self.shared_nodes.get_mut(usize::from(p))?.as_mut(),
            _ => None,
        }
    }

    /// The shared connection of the node with backend index `index`, when in use.
    pub(super) fn shared_node(&self, index: usize) -> Option<LinkId> {
        let p = self
            .shared_nodes
            .iter()
            .position(|l| l.as_ref().is_some_and(|l| l.index == index))?;
        u8::try_from(p).ok().map(LinkId::SharedNode)
    }

    /// Keep a node's shared connection at a free position (at most 256 per session).
    pub(super) fn add_shared_node(&mut self, link: SharedLink) -> Option<LinkId> {
        let p = match self.shared_nodes.iter().position(Option::is_none) {
            Some(p) => p,
            None if self.shared_nodes.len() <= usize::from(u8::MAX) => {
                self.shared_nodes.push(None);
                self.shared_nodes.len() - 1
            }
            None => return None,
        };
        self.shared_nodes[p] = Some(link);
        u8::try_from(p).ok().map(LinkId::SharedNode)
    }

    /// Label and backend index of a node link, dedicated or shared.
    pub(super) fn node_of(&self, id: LinkId) -> Option<(String, usize)> {
        match id {
            LinkId::SharedNode(p) => self
                .shared_nodes
                .get(usize::from(p))?
                .as_ref()
                .map(|l| (l.conn.label.clone(), l.index)),
            _ => self.get(id).map(|l| (l.label.clone(), l.index)),
        }
    }

    /// The link to the node with backend index `index`, when open.
    pub(super) fn node_link(&self, index: usize) -> Option<LinkId> {
        let p = self
            .nodes
            .iter()
            .position(|l| l.as_ref().is_some_and(|l| l.index == index))?;
        u8::try_from(p).ok().map(LinkId::Node)
    }

    /// Keep a new node link at a free position (at most 256 per session).
    pub(super) fn add_node(&mut self, link: Link) -> Option<LinkId> {
        let p = match self.nodes.iter().position(Option::is_none) {
            Some(p) => p,
            None if self.nodes.len() <= usize::from(u8::MAX) => {
                self.nodes.push(None);
                self.nodes.len() - 1
            }
            None => return None,
        };
        self.nodes[p] = Some(link);
        u8::try_from(p).ok().map(LinkId::Node)
    }

    /// Close every link.
    pub(super) fn close(&mut self) {
        self.master = None;
        self.replica = None;
        self.shared = None;
        self.nodes.clear();
        self.shared_nodes.clear();
    }
}

/// Poll the session's own links for its wait (`Session::wait`), each in the poll form:
/// a poll keeps the stream's one waker slot, where `readable()` joins and leaves a waiter
/// list under a lock at every wake-up. `Pending` registers the task with every link
/// polled.
impl Upstream {
    /// The session's own links (master, replica, cluster nodes), open ones only.
    pub(super) fn own_links(&self) -> impl Iterator<Item = &Link> {
        [&self.master, &self.replica]
            .into_iter()
            .flatten()
            .chain(self.nodes.iter().flatten())
    }

    /// The session's shared connections (one, or in cluster mode one per node).
    pub(super) fn shared_links(&self) -> impl Iterator<Item = &SharedLink> {
        self.shared.iter().chain(self.shared_nodes.iter().flatten())
    }

    /// The master source's waker fired: poll the master link at the next wait.
    pub(super) fn disarm_master(&mut self) {
        if let Some(master) = &mut self.master {
            master.armed = false;
        }
    }

    /// Whether one of the session's own links has output or a half-close to do.
    pub(super) fn links_want_write(&self) -> bool {
        self.own_links().any(Link::wants_write)
    }

    /// Whether the master (`LinkId::Master`), the replica or a cluster node link is
    /// readable (or has an error), in that order. The master is polled with `master_cx`
    /// (the master source's waker), and not at all while armed (see `wake.rs`).
    pub(super) fn poll_readable(
        &mut self,
        cx: &mut Context<'_>,
        master_cx: &mut Context<'_>,
    ) -> Poll<LinkId> {
        if let Some(master) = self.master.as_mut().filter(|l| !l.armed) {
            if master.stream.poll_readable(master_cx).is_ready() {
                return Poll::Ready(LinkId::Master);
            }
            master.armed = true;
        }
        // The others with the task's own waker, every time (a link polled so is not
        // armed, should it ever become the master link).
        let others = self.replica.iter_mut().map(|l| (LinkId::Replica, l));
        let nodes = self.nodes.iter_mut().enumerate().filter_map(|(p, l)| {
            l.as_mut()
                .map(|l| (LinkId::Node(u8::try_from(p).unwrap_or(u8::MAX)), l))
        });
        for (id, link) in others.chain(nodes) {
            link.armed = false;
            if link.stream.poll_readable(cx).is_ready() {
                return Poll::Ready(id);
            }
        }
        Poll::Pending
    }

    /// Whether a link with output (or a half-close to do) is writable.
    pub(super) fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        for l in self.own_links() {
            if l.wants_write() && l.stream.poll_writable(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    /// The next delivery from the session's shared connection, or (cluster mode) from one
    /// of its shared node connections: `LinkId::Shared` or `LinkId::SharedNode`.
    pub(super) fn poll_shared(&mut self, cx: &mut Context<'_>) -> Poll<(LinkId, Delivery)> {
        if let Some(Poll::Ready(d)) = self.shared.as_mut().map(|l| l.poll_recv(cx)) {
            return Poll::Ready((LinkId::Shared, d));
        }
        for (p, l) in self.shared_nodes.iter_mut().enumerate() {
            if let Some(Poll::Ready(d)) = l.as_mut().map(|l| l.poll_recv(cx)) {
                let id = LinkId::SharedNode(u8::try_from(p).unwrap_or(u8::MAX));
                return Poll::Ready((id, d));
            }
        }
        Poll::Pending
    }
}
