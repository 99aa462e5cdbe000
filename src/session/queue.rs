//! What the client is owed, in the order it asked: the reply queue, and Redis's
//! `CLIENT REPLY` rules applied by the proxy itself.
//!
//! The proxy owns `CLIENT REPLY`: backends always answer every request, and the queue
//! drops the answers Redis would not have sent. So a proxy-produced answer (a refusal, an
//! unknown command, AUTH) consumes a `SKIP` exactly as Redis's own answer would, and the
//! mode survives a move to another backend connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::out::OutQueue;
use super::state::OnReply;
use super::upstream::LinkId;

/// An argument of `CLIENT REPLY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplyArg {
    On,
    Off,
    Skip,
}

impl ReplyArg {
    /// `ON`, `OFF` or `SKIP`, any letter case.
    pub(super) fn parse(arg: &[u8]) -> Option<ReplyArg> {
        if arg.eq_ignore_ascii_case(b"on") {
            Some(ReplyArg::On)
        } else if arg.eq_ignore_ascii_case(b"off") {
            Some(ReplyArg::Off)
        } else if arg.eq_ignore_ascii_case(b"skip") {
            Some(ReplyArg::Skip)
        } else {
            None
        }
    }
}

/// Redis's reply-silencing flags (`CLIENT_REPLY_OFF`, `CLIENT_REPLY_SKIP`,
/// `CLIENT_REPLY_SKIP_NEXT` in `server.h`), updated at the points Redis updates them:
/// `CLIENT REPLY` sets them, `resetClient` after every top-level command turns a pending
/// skip into a skip of the next command. Pub/sub confirmations and messages and RESP3
/// pushes are never silenced (`CLIENT_PUSHING`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ReplyMode {
    off: bool,
    skip: bool,
    skip_next: bool,
}

impl ReplyMode {
    /// Whether a reply produced now reaches the client.
    pub(super) fn delivers(&self) -> bool {
        !self.off && !self.skip
    }

    /// Plain `ON`: every reply is delivered and no skip is pending.
    #[cfg(test)]
    pub(super) fn is_on(&self) -> bool {
        *self == ReplyMode::default()
    }

    /// Execute `CLIENT REPLY <arg>`; returns whether its own reply (`+OK` for `ON`,
    /// nothing for `OFF` and `SKIP`) is produced.
    pub(super) fn apply(&mut self, arg: ReplyArg) -> bool {
        match arg {
            ReplyArg::On => {
                self.off = false;
                self.skip = false;
                true
            }
            ReplyArg::Off => {
                self.off = true;
                false
            }
            ReplyArg::Skip => {
                if !self.off {
                    self.skip_next = true;
                }
                false
            }
        }
    }

    /// `RESET` (`clearClientConnectionState`): clears OFF and a pending skip, but not a
    /// skip already in force, so RESET's own `+RESET` is still skipped after SKIP.
    pub(super) fn reset(&mut self) {
        self.off = false;
        self.skip_next = false;
    }

    /// A top-level command finished (`resetClient`).
    pub(super) fn command_done(&mut self) {
        self.skip = std::mem::take(&mut self.skip_next);
    }

    /// Whether the next reply is delivered, for a command that is not `CLIENT REPLY`;
    /// advances past that command.
    pub(super) fn next_command(&mut self) -> bool {
        let delivers = self.delivers();
        self.command_done();
        delivers
    }

    /// `CLIENT REPLY <arg>` as a top-level command: whether its `+OK` is delivered.
    pub(super) fn client_reply(&mut self, arg: ReplyArg) -> bool {
        let delivered = self.apply(arg);
        self.command_done();
        delivered
    }
}

/// A forwarded write's frame, kept until its reply in case it must be retried after
/// `-READONLY`. Counted in the session's `retained` total while it lives (dropping it, on
/// any path, takes it off), so a pipeline of big writes to a fast backend cannot pile up
/// answered-but-unread frames beyond the session's buffer bound.
#[derive(Debug)]
pub(super) struct Retained {
    pub(super) frame: Bytes,
    total: Arc<AtomicUsize>,
}

impl Retained {
    pub(super) fn new(frame: Bytes, total: &Arc<AtomicUsize>) -> Retained {
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

/// A forwarded request waiting for its frames from one backend connection.
#[derive(Debug)]
pub(super) struct Awaiting {
    pub(super) link: LinkId,
    /// Frames still expected.
    pub(super) remaining: u32,
    /// Whether the answer reaches the client (`CLIENT REPLY`, decided when it was read).
    pub(super) deliver: bool,
    pub(super) on_reply: OnReply,
    /// A plain write's frame, for a retry after `-READONLY`.
    pub(super) retry: Option<Retained>,
    /// When the request's bytes were read (for the latency histogram).
    pub(super) sent: Instant,
    /// The command can wait indefinitely (`CommandSpec::may_block`).
    pub(super) blocking: bool,
    /// Frames of a multi-frame answer that arrived while earlier entries were still owed.
    pub(super) acc: BytesMut,
}

// One entry is moved per request into and out of the queue: up to 128 bytes the compiler
// moves it inline, past that with a `memcpy` call (seen at ~3 % of the instructions per
// request when it was 136 bytes).
const _: () = assert!(std::mem::size_of::<Awaiting>() <= 128);

impl Awaiting {
    /// A request the proxy adds on its own (`what`: `ASKING` before an ASK retry, the
    /// offset bump before `WAIT`, a script load): one frame, answered by Redis, never
    /// delivered.
    pub(super) fn hidden(link: LinkId, sent: Instant, what: &'static str) -> Awaiting {
        Awaiting {
            link,
            remaining: 1,
            deliver: false,
            on_reply: OnReply::Hidden(what),
            retry: None,
            sent,
            blocking: false,
            acc: BytesMut::new(),
        }
    }
}

/// The hidden `PING` a local answer waits behind in a session that receives pushes
/// (`Session::anchor_local_answer`): its reply, even an error, is nobody's.
pub(super) const ANCHOR: &str = "PING anchor";

/// One entry of the in-order reply queue.
#[derive(Debug)]
pub(super) enum Entry {
    /// A forwarded request's answer, still coming.
    Upstream(Awaiting),
    /// A write the backend refused with `-READONLY`: not applied, to be retried on the
    /// confirmed master once this link has answered everything before it.
    Retry {
        retained: Retained,
        deliver: bool,
        /// Cluster mode: the redirect a node answered (where the retry goes).
        redirect: Option<Box<super::cluster::Redirect>>,
        /// An `EVALSHA` answered `-NOSCRIPT`: this body is loaded (hidden) before it.
        script: Option<Bytes>,
    },
    /// An answer ready to be written once everything before it is (`None`: answered, but
    /// not delivered under `CLIENT REPLY`).
    Ready(Option<Bytes>),
}

/// Which of the requests waiting on a link were never written to its backend.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unsent {
    /// The first `n` (a shared connection answers a session's requests in order).
    First(u32),
    /// The last `n` (a session's own link: what it had not written yet).
    Last(usize),
}

/// The in-order queue of what each request is owed.
#[derive(Debug, Default)]
pub(super) struct ReplyQueue {
    entries: VecDeque<Entry>,
    /// `Entry::Retry` entries in the queue.
    retries: usize,
    /// `Entry::Upstream` entries per link (`slot`; every cluster node link counts in the
    /// last one): `waiting_on` without a scan.
    on: [usize; 4],
    /// Cluster mode: `Entry::Upstream` entries per node link (`node_slot`), so asking
    /// about one node costs no scan either (empty outside cluster mode).
    nodes: Vec<u32>,
}

/// Index of a cluster node link in `ReplyQueue::nodes`.
fn node_slot(link: LinkId) -> Option<usize> {
    match link {
        LinkId::Node(p) => Some(2 * usize::from(p)),
        LinkId::SharedNode(p) => Some(2 * usize::from(p) + 1),
        _ => None,
    }
}

/// Index of `link` in `ReplyQueue::on`.
fn slot(link: LinkId) -> usize {
    match link {
        LinkId::Master => 0,
        LinkId::Replica => 1,
        LinkId::Shared => 2,
        LinkId::Node(_) | LinkId::SharedNode(_) => 3,
    }
}

impl ReplyQueue {
    /// One more entry waits on `link`.
    fn count_up(&mut self, link: LinkId) {
        self.on[slot(link)] += 1;
        if let Some(i) = node_slot(link) {
            if self.nodes.len() <= i {
                self.nodes.resize(i + 1, 0);
            }
            self.nodes[i] += 1;
        }
    }

    /// One entry less waits on `link`.
    fn count_down(&mut self, link: LinkId) {
        self.on[slot(link)] = self.on[slot(link)].saturating_sub(1);
        if let Some(n) = node_slot(link).and_then(|i| self.nodes.get_mut(i)) {
            *n = n.saturating_sub(1);
        }
    }

    /// Nothing is owed.
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries owed.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// READONLY retries waiting.
    pub(super) fn retries(&self) -> usize {
        self.retries
    }

    /// An answer the proxy produced: written at once when nothing is owed before it.
    pub(super) fn push_local(&mut self, out: &mut OutQueue, reply: Option<Bytes>) {
        if self.entries.is_empty() {
            if let Some(reply) = reply {
                out.push(reply);
            }
        } else if reply.is_some() {
            self.entries.push_back(Entry::Ready(reply));
        }
    }

    /// A forwarded request's answer, to come from `awaiting.link`.
    pub(super) fn push_upstream(&mut self, awaiting: Awaiting) {
        self.count_up(awaiting.link);
        self.entries.push_back(Entry::Upstream(awaiting));
    }

    /// Count the entries per link again (after entries were replaced in place).
    pub(super) fn recount(&mut self) {
        self.on = [0; 4];
        self.nodes.iter_mut().for_each(|n| *n = 0);
        let links: Vec<LinkId> = self
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Upstream(a) => Some(a.link),
                _ => None,
            })
            .collect();
        for link in links {
            self.count_up(link);
        }
        self.retries = self
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Retry { .. }))
            .count();
    }

    /// Index of the first entry waiting on `link`: the one its next frame answers.
    pub(super) fn first_on(&self, link: LinkId) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| matches!(e, Entry::Upstream(a) if a.link == link))
    }

    /// Whether nothing the client sent after the entry at `index` waits on a backend or
    /// a retry (a hidden request the proxy added changes nothing it would read).
    pub(super) fn last_in_flight(&self, index: usize) -> bool {
        self.entries.iter().skip(index + 1).all(|e| match e {
            Entry::Ready(_) => true,
            Entry::Upstream(a) => matches!(a.on_reply, OnReply::Hidden(_)),
            Entry::Retry { .. } => false,
        })
    }

    /// The newest entry still waiting on `link`.
    pub(super) fn last_on(&self, link: LinkId) -> Option<&Awaiting> {
        self.entries.iter().rev().find_map(|e| match e {
            Entry::Upstream(a) if a.link == link => Some(a),
            _ => None,
        })
    }

    /// Whether a command that can wait indefinitely is in flight on `link`.
    pub(super) fn blocking_on(&self, link: LinkId) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e, Entry::Upstream(a) if a.link == link && a.blocking))
    }

    /// Whether any answer is still coming from `link`.
    pub(super) fn waiting_on(&self, link: LinkId) -> bool {
        match link {
            LinkId::Node(_) | LinkId::SharedNode(_) => node_slot(link)
                .and_then(|i| self.nodes.get(i))
                .is_some_and(|&n| n > 0),
            _ => self.on[slot(link)] > 0,
        }
    }

    /// Whether any answer is still coming from a cluster node link.
    pub(super) fn waiting_on_nodes(&self) -> bool {
        self.on[3] > 0
    }

    /// Index of the first READONLY/cluster retry waiting.
    pub(super) fn first_retry(&self) -> Option<usize> {
        if self.retries == 0 {
            return None;
        }
        self.entries
            .iter()
            .position(|e| matches!(e, Entry::Retry { .. }))
    }

    /// The entry at `index`.
    pub(super) fn entry_mut(&mut self, index: usize) -> Option<&mut Entry> {
        self.entries.get_mut(index)
    }

    /// Put `entry` at `index`, and `before` (a request whose answer nobody gets, such as
    /// `ASKING`) just ahead of it; the counts follow.
    pub(super) fn replace_with(&mut self, index: usize, before: Option<Awaiting>, entry: Entry) {
        if index >= self.entries.len() {
            return;
        }
        self.entries[index] = entry;
        if let Some(b) = before {
            self.entries.insert(index, Entry::Upstream(b));
        }
        self.recount();
    }

    /// The entry at `index`, when it waits on a backend.
    pub(super) fn awaiting(&self, index: usize) -> Option<&Awaiting> {
        match self.entries.get(index) {
            Some(Entry::Upstream(a)) => Some(a),
            _ => None,
        }
    }

    /// The entry at `index`, when it waits on a backend.
    pub(super) fn awaiting_mut(&mut self, index: usize) -> Option<&mut Awaiting> {
        match self.entries.get_mut(index) {
            Some(Entry::Upstream(a)) => Some(a),
            _ => None,
        }
    }

    /// The front entry, taken out, when it is a plain forwarded request on `link` that
    /// one frame answers (`OnReply::Forward`, nothing accumulated): the common case of
    /// `Session::on_reply`, which then writes the answer and drains what follows it.
    pub(super) fn pop_plain_front(&mut self, link: LinkId) -> Option<Awaiting> {
        match self.entries.front() {
            Some(Entry::Upstream(a))
                if a.link == link
                    && a.remaining == 1
                    && a.acc.is_empty()
                    && matches!(a.on_reply, OnReply::Forward) => {}
            _ => return None,
        }
        let Some(Entry::Upstream(a)) = self.entries.pop_front() else {
            return None;
        };
        self.count_down(link);
        Some(a)
    }

    /// Replace the entry at `index` (an answer arrived); returns the old entry.
    pub(super) fn complete(&mut self, index: usize, answer: Option<Bytes>) -> Option<Entry> {
        let entry = self.entries.get_mut(index)?;
        let old = std::mem::replace(entry, Entry::Ready(answer));
        if let Entry::Upstream(a) = &old {
            let link = a.link;
            self.count_down(link);
        }
        Some(old)
    }

    /// Turn the awaiting entry at `index` into a READONLY retry of its frame.
    pub(super) fn mark_retry(&mut self, index: usize) -> bool {
        self.mark_redirect(index, None)
    }

    /// Turn the awaiting entry at `index` into a retry of its frame, after `redirect`.
    pub(super) fn mark_redirect(
        &mut self,
        index: usize,
        redirect: Option<Box<super::cluster::Redirect>>,
    ) -> bool {
        self.mark(index, redirect, None)
    }

    /// Turn the awaiting `EVALSHA` at `index`, answered `-NOSCRIPT`, into a retry with
    /// `body` loaded first (cluster mode: `redirect` names the node).
    pub(super) fn mark_script_retry(
        &mut self,
        index: usize,
        body: Bytes,
        redirect: Option<Box<super::cluster::Redirect>>,
    ) -> bool {
        self.mark(index, redirect, Some(body))
    }

    fn mark(
        &mut self,
        index: usize,
        redirect: Option<Box<super::cluster::Redirect>>,
        script: Option<Bytes>,
    ) -> bool {
        let Some(Entry::Upstream(a)) = self.entries.get_mut(index) else {
            return false;
        };
        let Some(retained) = a.retry.take() else {
            return false;
        };
        let (deliver, link) = (a.deliver, a.link);
        self.count_down(link);
        self.entries[index] = Entry::Retry {
            retained,
            deliver,
            redirect,
            script,
        };
        self.retries += 1;
        true
    }

    /// Answer every entry still waiting on `link` with `answer` (its link was lost);
    /// returns how many of them were the client's (not hidden requests of the proxy).
    pub(super) fn fail_link(&mut self, link: LinkId, answer: &Bytes) -> usize {
        let mut n = 0u32;
        let mut hidden = 0;
        for entry in self.entries.iter_mut() {
            if let Entry::Upstream(a) = entry {
                if a.link == link {
                    if matches!(a.on_reply, OnReply::Hidden(_)) {
                        hidden += 1;
                    }
                    let deliver = a.deliver;
                    let mut out = std::mem::take(&mut a.acc);
                    if deliver {
                        out.extend_from_slice(answer);
                    }
                    *entry = Entry::Ready((!out.is_empty()).then(|| out.freeze()));
                    n += 1;
                }
            }
        }
        for _ in 0..n {
            self.count_down(link);
        }
        n as usize - hidden
    }

    /// Requests on `link` that were never written to its backend (the connection was
    /// lost or could not be opened): each whose frame is kept becomes a retry (`redirect`
    /// says where to), the others are answered with `answer`. Returns the retries.
    pub(super) fn unsent(
        &mut self,
        link: LinkId,
        which: Unsent,
        answer: &Bytes,
        mut redirect: impl FnMut(&Awaiting) -> Option<Box<super::cluster::Redirect>>,
    ) -> usize {
        let on_link: Vec<usize> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Entry::Upstream(a) if a.link == link))
            .map(|(i, _)| i)
            .collect();
        let picked = match which {
            Unsent::First(n) => &on_link[..on_link.len().min(n as usize)],
            Unsent::Last(n) => &on_link[on_link.len().saturating_sub(n)..],
        };
        let mut retries = 0;
        for &i in picked {
            let Some(Entry::Upstream(a)) = self.entries.get_mut(i) else {
                continue;
            };
            let deliver = a.deliver;
            // A request with part of its answer in already was written.
            let entry = match a.retry.take() {
                Some(retained) if a.acc.is_empty() => {
                    retries += 1;
                    Entry::Retry {
                        retained,
                        deliver,
                        redirect: redirect(a),
                        script: None,
                    }
                }
                _ => {
                    let mut out = std::mem::take(&mut a.acc);
                    if deliver {
                        out.extend_from_slice(answer);
                    }
                    Entry::Ready((!out.is_empty()).then(|| out.freeze()))
                }
            };
            self.entries[i] = entry;
        }
        self.recount();
        retries
    }

    /// Answer the first `n` entries still waiting on `link` with `answer` (a shared
    /// connection lost the requests it had of this session, the oldest first).
    pub(super) fn fail_first(&mut self, link: LinkId, n: u32, answer: &Bytes) {
        let mut left = n;
        for entry in self.entries.iter_mut() {
            if left == 0 {
                break;
            }
            if let Entry::Upstream(a) = entry {
                if a.link == link {
                    let deliver = a.deliver;
                    let mut out = std::mem::take(&mut a.acc);
                    if deliver {
                        out.extend_from_slice(answer);
                    }
                    *entry = Entry::Ready((!out.is_empty()).then(|| out.freeze()));
                    left -= 1;
                }
            }
        }
        for _ in 0..n - left {
            self.count_down(link);
        }
    }

    /// Drop every entry from the first one still waiting on `link`: a client that closed
    /// its sending side is gone once Redis closed that connection (Redis frees such a
    /// client without answering, or running, what it had not reached).
    pub(super) fn abandon_from(&mut self, link: LinkId) {
        if let Some(i) = self.first_on(link) {
            self.entries.truncate(i);
        }
        self.recount();
    }

    /// Forget everything (a desynchronized backend ends the session).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.retries = 0;
        self.on = [0; 4];
        self.nodes.clear();
    }

    /// The oldest entry is a local answer, ready to go (`drain` would write it).
    pub(super) fn front_is_ready(&self) -> bool {
        matches!(self.entries.front(), Some(Entry::Ready(_)))
    }

    /// Write the answers that reached the head, in order.
    pub(super) fn drain(&mut self, out: &mut OutQueue) {
        while let Some(Entry::Ready(_)) = self.entries.front() {
            if let Some(Entry::Ready(Some(b))) = self.entries.pop_front() {
                out.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain forwarded request on the master link.
    fn awaiting(deliver: bool) -> Awaiting {
        Awaiting {
            link: LinkId::Master,
            remaining: 1,
            deliver,
            on_reply: OnReply::Forward,
            retry: None,
            sent: Instant::now(),
            blocking: false,
            acc: BytesMut::new(),
        }
    }

    #[test]
    fn waiting_on_counts_each_cluster_node_link() {
        let on = |link| Awaiting {
            link,
            ..awaiting(true)
        };
        let mut q = ReplyQueue::default();
        q.push_upstream(on(LinkId::Node(2)));
        q.push_upstream(on(LinkId::SharedNode(2)));
        q.push_upstream(on(LinkId::SharedNode(0)));
        assert!(q.waiting_on(LinkId::Node(2)));
        assert!(!q.waiting_on(LinkId::Node(0)));
        assert!(!q.waiting_on(LinkId::Node(7)));
        assert!(q.waiting_on(LinkId::SharedNode(0)));
        assert!(!q.waiting_on(LinkId::Master));
        q.complete(0, None);
        assert!(!q.waiting_on(LinkId::Node(2)));
        assert!(q.waiting_on(LinkId::SharedNode(2)));
        q.fail_first(LinkId::SharedNode(2), 5, &Bytes::from_static(b"-ERR x\r\n"));
        assert!(!q.waiting_on(LinkId::SharedNode(2)));
        assert_eq!(q.fail_link(LinkId::SharedNode(0), &Bytes::new()), 1);
        assert!(!q.waiting_on_nodes());
        q.push_upstream(on(LinkId::Node(1)));
        q.abandon_from(LinkId::Node(1));
        assert!(!q.waiting_on(LinkId::Node(1)));
    }

    fn out_bytes(out: &mut OutQueue) -> Vec<u8> {
        std::mem::take(out).contents()
    }

    /// One step of a session's bookkeeping for a locally answered command.
    fn local(mode: &mut ReplyMode, q: &mut ReplyQueue, out: &mut OutQueue, reply: &'static [u8]) {
        let deliver = mode.next_command();
        q.push_local(out, deliver.then(|| Bytes::from_static(reply)));
    }

    #[test]
    fn skip_is_consumed_by_the_next_command_whoever_answers_it() {
        // CLIENT REPLY SKIP, then a proxy-answered command (unknown command, refusal,
        // AUTH, ...), then SET: Redis skips the local answer and delivers SET's.
        for local_answer in [
            b"-ERR unknown command 'NOSUCH.CMD', with args beginning with: 'x' \r\n".as_slice(),
            b"-NOPERM refused\r\n",
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
            b"-MASTERDOWN none\r\n",
            b"+OK\r\n",
        ] {
            let mut mode = ReplyMode::default();
            let mut q = ReplyQueue::default();
            let mut out = OutQueue::default();
            assert!(!mode.client_reply(ReplyArg::Skip));
            let deliver = mode.next_command();
            assert!(!deliver);
            q.push_local(
                &mut out,
                deliver.then(|| Bytes::copy_from_slice(local_answer)),
            );
            local(&mut mode, &mut q, &mut out, b"+OK\r\n");
            local(&mut mode, &mut q, &mut out, b"+PONG\r\n");
            assert_eq!(out_bytes(&mut out), b"+OK\r\n+PONG\r\n");
        }
    }

    #[test]
    fn off_silences_local_answers_until_on() {
        let mut mode = ReplyMode::default();
        let mut q = ReplyQueue::default();
        let mut out = OutQueue::default();
        assert!(!mode.client_reply(ReplyArg::Off));
        local(&mut mode, &mut q, &mut out, b"-NOPERM refused\r\n");
        // SKIP under OFF is ignored, as in Redis.
        assert!(!mode.client_reply(ReplyArg::Skip));
        local(&mut mode, &mut q, &mut out, b"-ERR unknown\r\n");
        assert!(mode.client_reply(ReplyArg::On));
        q.push_local(&mut out, Some(Bytes::from_static(b"+OK\r\n")));
        local(&mut mode, &mut q, &mut out, b"+PONG\r\n");
        assert_eq!(out_bytes(&mut out), b"+OK\r\n+PONG\r\n");
        assert!(mode.is_on());
    }

    #[test]
    fn on_after_skip_answers_ok() {
        let mut mode = ReplyMode::default();
        assert!(!mode.client_reply(ReplyArg::Skip));
        // The skipped command is CLIENT REPLY ON itself: it clears the skip and its +OK
        // is delivered (clientCommand clears the flags before replying).
        assert!(mode.client_reply(ReplyArg::On));
        assert!(mode.next_command());
    }

    #[test]
    fn reset_clears_off_but_not_a_skip_in_force() {
        let mut mode = ReplyMode::default();
        mode.client_reply(ReplyArg::Skip);
        mode.reset();
        assert!(!mode.next_command(), "+RESET is skipped");
        assert!(mode.next_command());
        mode.client_reply(ReplyArg::Off);
        mode.reset();
        assert!(mode.next_command(), "+RESET is delivered after OFF");
    }

    #[test]
    fn skip_twice_skips_one_command() {
        let mut mode = ReplyMode::default();
        mode.client_reply(ReplyArg::Skip);
        mode.client_reply(ReplyArg::Skip);
        assert!(!mode.next_command());
        assert!(mode.next_command());
    }

    #[test]
    fn local_answers_wait_behind_forwarded_ones() {
        let mut mode = ReplyMode::default();
        let mut q = ReplyQueue::default();
        let mut out = OutQueue::default();
        let deliver = mode.next_command();
        q.push_upstream(awaiting(deliver));
        local(&mut mode, &mut q, &mut out, b"-NOPERM refused\r\n");
        assert!(out.is_empty());
        let i = q.first_on(LinkId::Master).unwrap();
        q.complete(i, Some(Bytes::from_static(b"$1\r\n1\r\n")));
        q.drain(&mut out);
        assert!(q.is_empty());
        assert_eq!(out_bytes(&mut out), b"$1\r\n1\r\n-NOPERM refused\r\n");
    }

    #[test]
    fn a_local_answer_behind_the_anchor_waits_for_its_reply_and_hidden_entries_are_nobodys() {
        let mut q = ReplyQueue::default();
        let mut out = OutQueue::default();
        let sent = Instant::now();
        let mut evalsha = awaiting(true);
        evalsha.sent = sent;
        q.push_upstream(evalsha);
        q.push_upstream(Awaiting::hidden(LinkId::Master, sent, ANCHOR));
        q.push_local(&mut out, Some(Bytes::from_static(b"+OK\r\n")));
        // The anchor is the newest request on the link; the local answer waits behind it.
        assert!(q
            .last_on(LinkId::Master)
            .is_some_and(|a| matches!(a.on_reply, OnReply::Hidden(ANCHOR))));
        assert!(q.last_on(LinkId::Replica).is_none());
        assert!(out.is_empty());
        // Nothing the client sent after the first entry is in flight: a NOSCRIPT answer
        // to it may still be retried.
        assert!(q.last_in_flight(0));
        q.push_upstream(awaiting(true));
        assert!(!q.last_in_flight(0));
        // The link is lost: the anchor is not counted as the client's request.
        assert_eq!(
            q.fail_link(LinkId::Master, &Bytes::from_static(b"-ERR lost\r\n")),
            2
        );
        q.drain(&mut out);
        assert!(q.is_empty());
        assert_eq!(out_bytes(&mut out), b"-ERR lost\r\n+OK\r\n-ERR lost\r\n");
    }

    #[test]
    fn a_lost_link_answers_its_entries_in_order_and_respects_skip() {
        let mut q = ReplyQueue::default();
        let mut out = OutQueue::default();
        for deliver in [true, false, true] {
            q.push_upstream(awaiting(deliver));
        }
        assert_eq!(
            q.fail_link(LinkId::Master, &Bytes::from_static(b"-ERR lost\r\n")),
            3
        );
        q.drain(&mut out);
        assert!(q.is_empty());
        assert_eq!(out_bytes(&mut out), b"-ERR lost\r\n-ERR lost\r\n");
    }

    #[test]
    fn unsent_requests_with_a_kept_frame_become_retries_in_place() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut q = ReplyQueue::default();
        let mut out = OutQueue::default();
        for (link, keep) in [
            (LinkId::Master, true),
            (LinkId::Replica, true),
            (LinkId::Master, false),
            (LinkId::Master, true),
        ] {
            let mut a = awaiting(true);
            a.link = link;
            a.retry = keep.then(|| Retained::new(Bytes::from_static(b"*1\r\n$1\r\nx\r\n"), &total));
            q.push_upstream(a);
        }
        let lost = Bytes::from_static(b"-ERR lost\r\n");
        // The last two on the master link were never written: the one with its frame
        // kept is retried, the other answered.
        assert_eq!(
            q.unsent(LinkId::Master, Unsent::Last(2), &lost, |_| None),
            1
        );
        assert_eq!(q.retries(), 1);
        assert!(matches!(q.entry_mut(2), Some(Entry::Ready(Some(_)))));
        assert!(matches!(q.entry_mut(3), Some(Entry::Retry { .. })));
        // The first one was written: it gets the link error.
        assert_eq!(q.fail_link(LinkId::Master, &lost), 1);
        assert!(q.waiting_on(LinkId::Replica));
        assert!(!q.waiting_on(LinkId::Master));
        // From the front: the replica's one.
        assert_eq!(
            q.unsent(LinkId::Replica, Unsent::First(1), &lost, |_| None),
            1
        );
        assert_eq!(q.retries(), 2);
        q.drain(&mut out);
        assert_eq!(out_bytes(&mut out), b"-ERR lost\r\n");
    }

    #[test]
    fn half_closed_clients_get_what_was_answered_before_the_first_unanswered() {
        let mut q = ReplyQueue::default();
        let mut out = OutQueue::default();
        q.push_upstream(awaiting(true));
        q.push_local(&mut out, Some(Bytes::from_static(b"-NOPERM x\r\n")));
        q.abandon_from(LinkId::Master);
        assert!(q.is_empty());
        q.drain(&mut out);
        assert!(out.is_empty());
    }
}

#[cfg(test)]
mod size_guard {
    /// Every forwarded request moves a `Request` through the session and puts an
    /// `Awaiting` in the queue: at 304 and 216 bytes they made the restructured session
    /// slower than the old one (memmove was 12 % of the proxy's CPU at pipeline 16).
    /// Rare payloads are boxed and spans packed to keep them small; this keeps it so.
    #[test]
    fn per_request_values_stay_small() {
        assert!(std::mem::size_of::<super::Entry>() <= 144);
        assert!(std::mem::size_of::<crate::session::state::OnReply>() <= 40);
        assert!(std::mem::size_of::<crate::protocol::Request>() <= 112);
    }
}
