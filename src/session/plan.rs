//! What a classified request asks of the session, decided from the command table's
//! special tag and the request's arguments alone. Pure: the session applies the plan.

use bytes::Bytes;

use crate::command::{CommandSpec, PubSubKind, Special};
use crate::protocol::Request;

use super::queue::ReplyArg;
use super::state::StateChange;

/// What the session does with one request (after authorization).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Forward; `change` takes effect when Redis confirms it (at EXEC inside MULTI).
    Forward {
        change: Option<StateChange>,
    },
    /// SUBSCRIBE family: one confirmation per channel, or per current subscription when
    /// an unsubscribe names none (`channels` empty).
    PubSub {
        kind: PubSubKind,
        subscribe: bool,
        channels: Vec<Bytes>,
    },
    /// `CLIENT REPLY ON|OFF|SKIP`: applied by the proxy (never forwarded as such).
    ClientReply(ReplyArg),
    /// `AUTH`: answered by the proxy.
    Auth,
    /// `HELLO`: its `AUTH` is answered by the proxy, the rest forwarded.
    Hello,
    /// `QUIT`: `+OK`, then close once everything before is answered.
    Quit,
    /// `RESET`: forwarded; the proxy resets what it tracks.
    Reset,
    Multi,
    Exec,
    Discard,
    /// `WATCH` (outside MULTI: the session is now pinned until EXEC/DISCARD/UNWATCH).
    Watch,
    Unwatch,
}

fn eq(arg: Option<&[u8]>, word: &[u8]) -> bool {
    arg.is_some_and(|a| a.eq_ignore_ascii_case(word))
}

/// `on` / `off` as a flag; anything else is left to Redis to refuse.
fn on_off(arg: Option<&[u8]>) -> Option<bool> {
    if eq(arg, b"on") {
        Some(true)
    } else if eq(arg, b"off") {
        Some(false)
    } else {
        None
    }
}

/// A state change only for well-formed requests: a malformed one is answered by Redis
/// with an error, and errors change nothing.
fn change(special: Special, req: &Request) -> Option<StateChange> {
    let argc = req.argc();
    match special {
        Special::Select if argc == 2 => {
            let db = std::str::from_utf8(req.arg(1)?).ok()?.parse().ok()?;
            Some(StateChange::Select(db))
        }
        Special::ClientSetName if argc == 3 => {
            let name = req.arg(2)?;
            Some(StateChange::ClientName(
                (!name.is_empty()).then(|| Bytes::copy_from_slice(name)),
            ))
        }
        Special::ClientSetInfo if argc == 4 => Some(StateChange::SetInfo {
            attr: Bytes::from(req.arg(2)?.to_ascii_lowercase()),
            value: Bytes::copy_from_slice(req.arg(3)?),
        }),
        Special::ClientNoEvict if argc == 3 => on_off(req.arg(2)).map(StateChange::NoEvict),
        Special::ClientNoTouch if argc == 3 => on_off(req.arg(2)).map(StateChange::NoTouch),
        Special::ClientTracking if argc >= 3 => on_off(req.arg(2)).map(StateChange::Tracking),
        Special::ReadOnly if argc == 1 => Some(StateChange::ReadOnly(true)),
        Special::ReadWrite if argc == 1 => Some(StateChange::ReadOnly(false)),
        Special::Monitor if argc == 1 => Some(StateChange::Monitor),
        _ => None,
    }
}

/// The plan for one request whose command spec is `spec`.
pub(super) fn plan(spec: &CommandSpec, req: &Request) -> Plan {
    match spec.special {
        Special::Subscribe(kind) | Special::Unsubscribe(kind) => Plan::PubSub {
            kind,
            subscribe: matches!(spec.special, Special::Subscribe(_)),
            channels: req.args().skip(1).map(Bytes::copy_from_slice).collect(),
        },
        Special::ClientReply => match (req.argc(), req.arg(2).and_then(ReplyArg::parse)) {
            (3, Some(arg)) => Plan::ClientReply(arg),
            // Let Redis produce its own error.
            _ => Plan::Forward { change: None },
        },
        Special::Auth => Plan::Auth,
        Special::Hello => Plan::Hello,
        Special::Quit => Plan::Quit,
        Special::Reset => Plan::Reset,
        Special::Multi => Plan::Multi,
        Special::Exec => Plan::Exec,
        Special::Discard => Plan::Discard,
        Special::Watch => Plan::Watch,
        Special::Unwatch => Plan::Unwatch,
        other => Plan::Forward {
            change: change(other, req),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{lookup, Lookup};

    fn plan_of(args: &[&str]) -> Plan {
        let req = Request::from_args(args);
        let Lookup::Known(spec) = lookup(req.arg(0).unwrap_or_default(), req.arg(1)) else {
            panic!("{args:?} is not a known command");
        };
        plan(spec, &req)
    }

    fn forward(change: Option<StateChange>) -> Plan {
        Plan::Forward { change }
    }

    #[test]
    fn state_changing_commands() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let cases = [
            (vec!["SELECT", "3"], forward(Some(StateChange::Select(3)))),
            (vec!["select", "x"], forward(None)),
            (vec!["SELECT", "1", "2"], forward(None)),
            (
                vec!["CLIENT", "SETNAME", "app"],
                forward(Some(StateChange::ClientName(Some(b("app"))))),
            ),
            (
                vec!["client", "setname", ""],
                forward(Some(StateChange::ClientName(None))),
            ),
            (
                vec!["CLIENT", "NO-EVICT", "on"],
                forward(Some(StateChange::NoEvict(true))),
            ),
            (vec!["CLIENT", "NO-EVICT", "maybe"], forward(None)),
            (
                vec!["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "a"],
                forward(Some(StateChange::Tracking(true))),
            ),
            (
                vec!["CLIENT", "TRACKING", "off"],
                forward(Some(StateChange::Tracking(false))),
            ),
            (vec!["READONLY"], forward(Some(StateChange::ReadOnly(true)))),
            (
                vec!["READWRITE"],
                forward(Some(StateChange::ReadOnly(false))),
            ),
            (vec!["MONITOR"], forward(Some(StateChange::Monitor))),
            (vec!["GET", "k"], forward(None)),
            (vec!["PING"], forward(None)),
        ];
        for (args, expected) in cases {
            assert_eq!(plan_of(&args), expected, "{args:?}");
        }
    }

    #[test]
    fn connection_commands() {
        assert_eq!(
            plan_of(&["CLIENT", "REPLY", "skip"]),
            Plan::ClientReply(ReplyArg::Skip)
        );
        assert_eq!(plan_of(&["CLIENT", "REPLY", "bogus"]), forward(None));
        assert_eq!(plan_of(&["AUTH", "pw"]), Plan::Auth);
        assert_eq!(plan_of(&["HELLO", "3"]), Plan::Hello);
        assert_eq!(plan_of(&["QUIT"]), Plan::Quit);
        assert_eq!(plan_of(&["RESET"]), Plan::Reset);
        assert_eq!(plan_of(&["MULTI"]), Plan::Multi);
        assert_eq!(plan_of(&["EXEC"]), Plan::Exec);
        assert_eq!(plan_of(&["DISCARD"]), Plan::Discard);
        assert_eq!(plan_of(&["WATCH", "k"]), Plan::Watch);
        assert_eq!(plan_of(&["UNWATCH"]), Plan::Unwatch);
    }

    #[test]
    fn pubsub_commands() {
        assert_eq!(
            plan_of(&["SUBSCRIBE", "a", "b"]),
            Plan::PubSub {
                kind: PubSubKind::Channel,
                subscribe: true,
                channels: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            }
        );
        assert_eq!(
            plan_of(&["PUNSUBSCRIBE"]),
            Plan::PubSub {
                kind: PubSubKind::Pattern,
                subscribe: false,
                channels: vec![],
            }
        );
    }
}
