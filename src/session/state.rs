//! State a client connection carries: what Redis keeps per connection (db, protocol,
//! name, library info, eviction and touch flags, tracking, subscriptions, MONITOR), the
//! open transaction, and how a forwarded command's answer changes them. Pure: no I/O.

use std::collections::HashSet;

use bytes::{Bytes, BytesMut};

use crate::auth::Credentials;
use crate::backend::{Handshake, LinkAuth};
use crate::command::PubSubKind;
use crate::protocol::{Item, Reply, ReplyLimits, ReplyScanner};

use super::queue::{ReplyArg, ReplyMode};

/// Session state that changes when Redis confirms a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StateChange {
    Select(u64),
    ClientName(Option<Bytes>),
    Hello {
        resp3: Option<bool>,
        name: Option<Bytes>,
        /// Pass-through: `HELLO ... AUTH user pass` credentials, kept once Redis accepts.
        auth: Option<Credentials>,
    },
    /// Pass-through: `AUTH` credentials Redis accepted, replayed on new links.
    Auth(Credentials),
    /// `CLIENT SETINFO <attr> <value>` (attribute lower-cased).
    SetInfo {
        attr: Bytes,
        value: Bytes,
    },
    NoEvict(bool),
    NoTouch(bool),
    /// `READONLY` (true) / `READWRITE` (false): the cluster read mode.
    ReadOnly(bool),
    /// `CLIENT TRACKING ON|OFF ...`.
    Tracking(bool),
    Monitor,
    Reset,
}

/// What the proxy must do with the answer of one forwarded request.
#[derive(Debug)]
pub(super) enum OnReply {
    /// Forward as is.
    Forward,
    /// Forward; when not an error, apply the state change (boxed: rare, and the queue
    /// entry of every plain request is sized by the largest variant).
    Apply(Box<StateChange>),
    /// Swallow the backend's answer and send this instead (EXECABORT after a refusal). A
    /// static text: the queue entry stays under 128 bytes, moved without a `memcpy` call.
    Replace(&'static [u8]),
    /// Pub/sub confirmations: one per named channel, or until the set empties (`all`).
    /// `hidden`: a re-subscription the proxy made after losing the node that held the
    /// subscriptions (cluster mode): the client got these confirmations once already.
    PubSub {
        kind: PubSubKind,
        all: bool,
        hidden: bool,
    },
    /// EXEC of a transaction whose commands change the session (boxed, as `Apply`).
    Exec(Box<ExecPlan>),
    /// A request the proxy added on its own (`ASKING`, the WAIT offset bump, a script
    /// load), named for logs: never delivered; an error answer is logged and counted
    /// (`metrics::hidden_request_failed`), since nobody else would see it.
    Hidden(&'static str),
}

/// Per-connection state that outlives backend connections.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    pub(super) db: u64,
    pub(super) resp3: bool,
    pub(super) client_name: Option<Bytes>,
    /// `CLIENT SETINFO` attributes, in the order set.
    pub(super) setinfo: Vec<(Bytes, Bytes)>,
    pub(super) no_evict: bool,
    pub(super) no_touch: bool,
    pub(super) readonly: bool,
    pub(super) tracking: bool,
    pub(super) monitor: bool,
    pub(super) channels: HashSet<Bytes>,
    pub(super) patterns: HashSet<Bytes>,
    pub(super) shard_channels: HashSet<Bytes>,
    /// Pass-through: the credentials Redis accepted from this client (`None`: not
    /// authenticated, or RESET since), replayed instead of the proxy's on new links.
    pub(super) creds: Option<Credentials>,
}

impl ConnState {
    /// Subscribed to anything (RESP2: the connection is in pub/sub mode).
    pub(super) fn subscribed(&self) -> bool {
        !(self.channels.is_empty() && self.patterns.is_empty() && self.shard_channels.is_empty())
    }

    /// The subscription set of one kind.
    pub(super) fn set(&mut self, kind: PubSubKind) -> &mut HashSet<Bytes> {
        match kind {
            PubSubKind::Channel => &mut self.channels,
            PubSubKind::Pattern => &mut self.patterns,
            PubSubKind::Shard => &mut self.shard_channels,
        }
    }

    /// State that lives only on the current backend connection and cannot be given to a
    /// new one: a session holding it closes when that connection is lost (as Redis closes
    /// it), instead of silently changing. Tracking's invalidation table, subscriptions and
    /// MONITOR are Redis's own per-connection tables. (Cluster mode subscribes again on
    /// a confirmed master instead: `Session::cluster_resubscribe`.)
    pub(super) fn pinned(&self) -> bool {
        self.tracking || self.monitor || self.subscribed()
    }

    /// Nothing a shared backend connection would not have (`routing.backend_connections
    /// = "shared"`): db 0, RESP2, no name or library info, no flags, nothing pinned.
    pub(super) fn shareable(&self) -> bool {
        self.db == 0
            && !self.resp3
            && self.client_name.is_none()
            && self.setinfo.is_empty()
            && !self.no_evict
            && !self.no_touch
            && !self.readonly
            && self.creds.is_none()
            && !self.pinned()
    }

    /// What a fresh backend connection must be given to continue this session (with the
    /// proxy's credentials; the session picks whose).
    pub(super) fn handshake(&self) -> Handshake {
        Handshake {
            auth: LinkAuth::Proxy,
            db: self.db,
            resp3: self.resp3,
            client_name: self.client_name.clone(),
            setinfo: self.setinfo.clone(),
            no_evict: self.no_evict,
            no_touch: self.no_touch,
            readonly: self.readonly,
        }
    }

    /// Apply a change Redis confirmed.
    pub(super) fn apply(&mut self, change: StateChange) {
        match change {
            StateChange::Select(db) => self.db = db,
            StateChange::ClientName(name) => self.client_name = name,
            StateChange::Hello { resp3, name, auth } => {
                if let Some(r) = resp3 {
                    self.resp3 = r;
                }
                if name.is_some() {
                    self.client_name = name;
                }
                if auth.is_some() {
                    self.creds = auth;
                }
            }
            StateChange::Auth(creds) => self.creds = Some(creds),
            StateChange::SetInfo { attr, value } => {
                self.setinfo.retain(|(a, _)| *a != attr);
                if !value.is_empty() {
                    self.setinfo.push((attr, value));
                }
            }
            StateChange::NoEvict(on) => self.no_evict = on,
            StateChange::NoTouch(on) => self.no_touch = on,
            StateChange::ReadOnly(on) => self.readonly = on,
            StateChange::Tracking(on) => self.tracking = on,
            StateChange::Monitor => self.monitor = true,
            StateChange::Reset => {
                // RESET returns to RESP2, db 0, no name, no tracking, no subscriptions.
                *self = ConnState::default();
            }
        }
    }
}

/// What one queued command of a transaction does when EXEC runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Effect {
    State(StateChange),
    /// `CLIENT REPLY` (sent to Redis as `CLIENT REPLY ON`; the proxy applies the mode).
    Reply(ReplyArg),
    /// A command the proxy answers itself (AUTH): a stand-in is queued, and this is its
    /// element; `user` signs in when EXEC runs.
    Answer {
        answer: Bytes,
        user: Option<String>,
    },
    /// SUBSCRIBE family: `channels` empty means "all of this kind" (unsubscribe).
    PubSub {
        kind: PubSubKind,
        subscribe: bool,
        channels: Vec<Bytes>,
    },
}

/// An open MULTI.
#[derive(Debug, Default)]
pub(super) struct Transaction {
    /// A command was refused while queuing: EXEC must answer EXECABORT.
    pub(super) dirty: bool,
    /// Cluster mode: a command for another slot than the transaction's was answered
    /// `+QUEUED` by the proxy; EXEC answers `-CROSSSLOT` and discards, as one cluster node
    /// serving every slot does (Redis `src/cluster.c` `getNodeByQuery` over `mstate`).
    pub(super) cross_slot: bool,
    /// Commands Redis queued: one element each in EXEC's array.
    pub(super) queued: usize,
    /// What EXEC will do to the session, by element index, in order.
    pub(super) effects: Vec<(usize, Effect)>,
}

impl Transaction {
    /// A command Redis queues (answered `+QUEUED`), with what it will do at EXEC.
    pub(super) fn queue(&mut self, effect: Option<Effect>) {
        if let Some(e) = effect {
            self.effects.push((self.queued, e));
        }
        self.queued += 1;
    }

    /// Whether EXEC's outcome changes `CLIENT REPLY`: requests after it must wait for
    /// it, since whether their answers are delivered depends on it.
    pub(super) fn changes_reply_mode(&self) -> bool {
        self.effects
            .iter()
            .any(|(_, e)| matches!(e, Effect::Reply(_)))
    }

    /// Whether EXEC subscribes or unsubscribes.
    pub(super) fn changes_subscriptions(&self) -> bool {
        self.effects
            .iter()
            .any(|(_, e)| matches!(e, Effect::PubSub { .. }))
    }

    /// Whether EXEC's answer must be taken apart (reply modes or pub/sub inside).
    pub(super) fn needs_plan(&self) -> bool {
        !self.effects.is_empty()
    }
}

/// EXEC's answer handling, fixed when EXEC is read.
#[derive(Debug)]
pub(super) struct ExecPlan {
    pub(super) queued: usize,
    pub(super) effects: Vec<(usize, Effect)>,
    /// `CLIENT REPLY` flags when EXEC was read (before its own command end).
    pub(super) mode: ReplyMode,
    /// Whether EXEC's array header reaches the client.
    pub(super) deliver: bool,
    /// Frames after the array that belong to it (pub/sub confirmations beyond the one per
    /// command that the array counts, RESP2), known once the array arrived.
    pub(super) extra: Option<u32>,
    /// The array, held until the extra frames arrived.
    pub(super) array: Option<Reply>,
    /// The extra frames received so far.
    pub(super) frames: Vec<Bytes>,
}

/// What an EXEC answer did, once complete.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ExecOutcome {
    /// What the client receives (`None`: nothing).
    pub(super) out: Option<Bytes>,
    /// `CLIENT REPLY` flags after EXEC (its command end included).
    pub(super) mode: ReplyMode,
    /// A queued AUTH signed in as this user.
    pub(super) user: Option<String>,
}

impl ExecPlan {
    /// Frames each queued command produces (RESP2: one per channel confirmation).
    fn frames_of(&self, state: &ConnState) -> Vec<u32> {
        let mut sets = [
            state.channels.len(),
            state.patterns.len(),
            state.shard_channels.len(),
        ];
        let mut frames = vec![1u32; self.queued];
        for (i, effect) in &self.effects {
            let Effect::PubSub {
                kind,
                subscribe,
                channels,
            } = effect
            else {
                continue;
            };
            let n = &mut sets[*kind as usize];
            let count = if state.resp3 {
                // Confirmations are pushes: only the first is inside the array.
                1
            } else if channels.is_empty() {
                // UNSUBSCRIBE with no channel: one confirmation per subscription, at
                // least one. The set count is an upper bound when names repeat.
                let c = (*n).max(1);
                *n = 0;
                c
            } else {
                if *subscribe {
                    *n += channels.len();
                } else {
                    *n = n.saturating_sub(channels.len());
                }
                channels.len()
            };
            if let Some(f) = frames.get_mut(*i) {
                *f = u32::try_from(count).unwrap_or(u32::MAX);
            }
        }
        frames
    }

    /// The array arrived: how many more frames belong to EXEC (RESP2 pub/sub).
    pub(super) fn extra_after_array(&self, state: &ConnState, array_len: usize) -> u32 {
        if state.resp3 {
            // Confirmations are pushes: the first is inside the array, the rest are
            // forwarded out of band as they come.
            return 0;
        }
        let total: u64 = self.frames_of(state).iter().map(|&f| u64::from(f)).sum();
        u32::try_from(total.saturating_sub(array_len as u64)).unwrap_or(u32::MAX)
    }

    /// Apply a successful EXEC to the session and build what the client sees.
    /// `frames`: the array's elements followed by the extra frames, in order.
    pub(super) fn finish(
        self,
        state: &mut ConnState,
        header: &[u8],
        elements: Vec<Bytes>,
    ) -> ExecOutcome {
        let per_command = self.frames_of(state);
        let mut mode = self.mode;
        let mut user = None;
        let mut out = BytesMut::new();
        if self.deliver {
            out.extend_from_slice(header);
        }
        let mut effects = self.effects.into_iter().peekable();
        let mut elements = elements.into_iter();
        for (i, &count) in per_command.iter().enumerate() {
            let mut effect = None;
            if effects.peek().is_some_and(|(at, _)| *at == i) {
                effect = effects.next().map(|(_, e)| e);
            }
            let mut failed = false;
            for _ in 0..count {
                let Some(frame) = elements.next() else {
                    break;
                };
                failed |= matches!(frame.first(), Some(b'-' | b'!'));
                let delivered = match &effect {
                    Some(Effect::Reply(arg)) => mode.apply(*arg),
                    Some(Effect::PubSub { .. }) => true,
                    _ => mode.delivers(),
                };
                if delivered {
                    match &effect {
                        Some(Effect::Answer { answer, .. }) => out.extend_from_slice(answer),
                        _ => out.extend_from_slice(&frame),
                    }
                }
            }
            match effect {
                // Redis answered the command with an error inside EXEC: nothing changed.
                Some(Effect::State(_)) if failed => {}
                Some(Effect::Answer {
                    user: Some(name), ..
                }) => user = Some(name),
                Some(Effect::State(change)) => state.apply(change),
                Some(Effect::PubSub {
                    kind,
                    subscribe,
                    channels,
                }) => {
                    let set = state.set(kind);
                    if channels.is_empty() {
                        set.clear();
                    } else {
                        for c in channels {
                            if subscribe {
                                set.insert(c);
                            } else {
                                set.remove(&c);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        // Anything beyond what the plan expected goes through unchanged.
        for frame in elements {
            out.extend_from_slice(&frame);
        }
        mode.command_done();
        ExecOutcome {
            out: (!out.is_empty()).then(|| out.freeze()),
            mode,
            user,
        }
    }
}

/// Split an array reply into its header line and its elements' exact bytes.
pub(super) fn split_array(reply: &Reply, limits: ReplyLimits) -> Option<(Bytes, Vec<Bytes>)> {
    let frame = reply.frame();
    let header_end = memchr::memmem::find(frame, b"\r\n")? + 2;
    let count = reply.items()?.len();
    let mut body = BytesMut::from(&frame[header_end..]);
    let mut scanner = ReplyScanner::new(limits);
    let mut elements = Vec::with_capacity(count);
    while elements.len() < count {
        elements.push(scanner.next(&mut body).ok()??.into_frame());
    }
    Some((frame.slice(..header_end), elements))
}

/// `(confirmation name, channel)` of a pub/sub confirmation array or push.
pub(super) fn pubsub_confirmation(reply: &Reply) -> Option<(&'static [u8], Option<Bytes>)> {
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
pub(super) fn is_message(reply: &Reply) -> bool {
    if reply.kind() != crate::protocol::ReplyKind::Array {
        return false;
    }
    match reply.items().as_deref() {
        Some([Item::Str(name), ..]) => {
            [b"message".as_slice(), b"pmessage", b"smessage"].contains(name)
        }
        _ => false,
    }
}

/// A MONITOR line (`+<unix time>.<micros> [db addr] "cmd" ...`): status replies to
/// commands never start with a digit, monitor lines always do.
pub(super) fn is_monitor_line(reply: &Reply) -> bool {
    reply.kind() == crate::protocol::ReplyKind::Simple
        && reply
            .text()
            .and_then(|t| t.first())
            .is_some_and(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ReplyScanner;

    fn reply(bytes: &[u8]) -> Reply {
        Reply::parse_one(bytes)
    }

    fn exec(
        state: &mut ConnState,
        effects: Vec<(usize, Effect)>,
        queued: usize,
        mode: ReplyMode,
        wire: &[u8],
    ) -> ExecOutcome {
        let deliver = mode.delivers();
        let plan = ExecPlan {
            queued,
            effects,
            mode,
            deliver,
            extra: None,
            array: None,
            frames: Vec::new(),
        };
        let mut buf = BytesMut::from(wire);
        let mut sc = ReplyScanner::new(ReplyLimits::default());
        let array = sc.next(&mut buf).unwrap().unwrap();
        let (header, mut elements) = split_array(&array, ReplyLimits::default()).unwrap();
        let extra = plan.extra_after_array(state, elements.len());
        for _ in 0..extra {
            elements.push(sc.next(&mut buf).unwrap().unwrap().into_frame());
        }
        assert!(buf.is_empty(), "all frames consumed");
        plan.finish(state, &header, elements)
    }

    #[test]
    fn transaction_counts_queued_commands_and_effects() {
        let mut t = Transaction::default();
        t.queue(None);
        t.queue(Some(Effect::State(StateChange::Select(2))));
        t.queue(Some(Effect::Reply(ReplyArg::Off)));
        assert_eq!(t.queued, 3);
        assert!(t.changes_reply_mode());
        assert_eq!(t.effects[0].0, 1);
        assert_eq!(t.effects[1].0, 2);
    }

    #[test]
    fn exec_with_client_reply_off_keeps_the_header_and_silences_the_rest() {
        // MULTI / CLIENT REPLY OFF / SET x 1 / EXEC: Redis 7 writes `*2` and nothing more.
        let mut state = ConnState::default();
        let out = exec(
            &mut state,
            vec![(0, Effect::Reply(ReplyArg::Off))],
            2,
            ReplyMode::default(),
            b"*2\r\n+OK\r\n+OK\r\n",
        );
        assert_eq!(out.out.as_deref(), Some(&b"*2\r\n"[..]));
        assert!(!out.mode.delivers());
    }

    #[test]
    fn exec_with_client_reply_skip_skips_the_command_after_exec() {
        // MULTI / CLIENT REPLY SKIP / SET x 1 / GET x / EXEC: `*3 +OK $1 1`, then the
        // next command's answer is skipped.
        let mut state = ConnState::default();
        let mut out = exec(
            &mut state,
            vec![(0, Effect::Reply(ReplyArg::Skip))],
            3,
            ReplyMode::default(),
            b"*3\r\n+OK\r\n+OK\r\n$1\r\n1\r\n",
        );
        assert_eq!(out.out.as_deref(), Some(&b"*3\r\n+OK\r\n$1\r\n1\r\n"[..]));
        assert!(!out.mode.next_command());
        assert!(out.mode.next_command());
    }

    #[test]
    fn exec_with_subscribe_forwards_every_confirmation_and_subscribes() {
        // MULTI / SUBSCRIBE a b / EXEC: `*1` then two confirmations (Redis 7 RESP2).
        let mut state = ConnState::default();
        let wire = b"*1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n";
        let out = exec(
            &mut state,
            vec![(
                0,
                Effect::PubSub {
                    kind: PubSubKind::Channel,
                    subscribe: true,
                    channels: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
                },
            )],
            1,
            ReplyMode::default(),
            wire,
        );
        assert_eq!(out.out.as_deref(), Some(&wire[..]));
        assert!(state.subscribed());
        assert_eq!(state.channels.len(), 2);
    }

    #[test]
    fn exec_state_changes_apply_in_order() {
        let mut state = ConnState::default();
        exec(
            &mut state,
            vec![
                (0, Effect::State(StateChange::Select(3))),
                (
                    1,
                    Effect::State(StateChange::ClientName(Some(Bytes::from_static(b"n")))),
                ),
            ],
            2,
            ReplyMode::default(),
            b"*2\r\n+OK\r\n+OK\r\n",
        );
        assert_eq!(state.db, 3);
        assert_eq!(state.client_name.as_deref(), Some(&b"n"[..]));
    }

    #[test]
    fn exec_state_changes_that_failed_are_not_applied() {
        // MULTI / SELECT 99 / EXEC: `*1 -ERR DB index is out of range`.
        let mut state = ConnState::default();
        exec(
            &mut state,
            vec![(0, Effect::State(StateChange::Select(99)))],
            1,
            ReplyMode::default(),
            b"*1\r\n-ERR DB index is out of range\r\n",
        );
        assert_eq!(state.db, 0);
    }

    #[test]
    fn pinned_state_is_what_a_new_link_cannot_carry() {
        let mut s = ConnState::default();
        s.apply(StateChange::Select(1));
        s.apply(StateChange::NoEvict(true));
        s.apply(StateChange::SetInfo {
            attr: Bytes::from_static(b"lib-name"),
            value: Bytes::from_static(b"x"),
        });
        assert!(!s.pinned());
        let h = s.handshake();
        assert_eq!((h.db, h.no_evict, h.setinfo.len()), (1, true, 1));
        s.apply(StateChange::Tracking(true));
        assert!(s.pinned());
        s.apply(StateChange::Reset);
        assert!(!s.pinned());
        assert_eq!(s.db, 0);
    }

    #[test]
    fn monitor_lines_are_told_from_replies() {
        assert!(is_monitor_line(&reply(
            b"+1796074692.869888 [0 127.0.0.1:60326] \"PING\"\r\n"
        )));
        assert!(!is_monitor_line(&reply(b"+PONG\r\n")));
        assert!(!is_monitor_line(&reply(b"-ERR x\r\n")));
    }
}
