//! Every reply text the proxy writes itself, in one place: Redis's own texts (byte for
//! byte, with the Redis source each comes from) and the proxy's refusals. Pure: no I/O.

use bytes::{Bytes, BytesMut};

use super::Request;

/// `+OK`.
pub const OK: &[u8] = b"+OK\r\n";
/// Redis's EXEC answer after a command was refused while queuing (`multi.c`).
pub const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";
/// Redis's AUTH failure (`acl.c` `addAuthErrReply`).
pub const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
/// Redis's one-argument AUTH on a server without a password (`acl.c` `authCommand`).
pub const AUTH_NO_PASSWORD: &[u8] = b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n";
/// Redis's generic syntax error (`server.c` shared.syntaxerr).
pub const SYNTAX: &[u8] = b"-ERR syntax error\r\n";
/// Redis's answer before authentication (`server.c` shared.noautherr).
pub const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
/// Redis's HELLO before authentication (`networking.c` `helloCommand`).
pub const HELLO_NOAUTH: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";

/// `-<text>\r\n` for a text the proxy formats.
pub fn error(text: &str) -> Bytes {
    error_line(text.as_bytes())
}

/// `-<text>\r\n`, with CR/LF inside the text turned into spaces (as Redis's
/// `addReplyErrorLength` does): they would end the line early.
pub fn error_line(text: &[u8]) -> Bytes {
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
pub fn shown(arg: &[u8], max: usize) -> &[u8] {
    let end = arg
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(arg.len())
        .min(max);
    &arg[..end]
}

/// Redis's text for an unknown command (`server.c` processCommand), byte for byte.
pub fn unknown_command(req: &Request) -> Bytes {
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
pub fn unknown_subcommand(container: &str, req: &Request) -> Bytes {
    match req.arg(1) {
        Some(sub) => {
            let mut text = b"ERR unknown subcommand '".to_vec();
            text.extend_from_slice(shown(sub, 128));
            text.extend_from_slice(b"'. Try ");
            text.extend_from_slice(container.to_ascii_uppercase().as_bytes());
            text.extend_from_slice(b" HELP.");
            error_line(&text)
        }
        None => error(&format!(
            "ERR wrong number of arguments for '{container}' command"
        )),
    }
}

/// Redis's text for a wrong argument count (`server.c` processCommand).
pub fn wrong_arity(command: &str) -> Bytes {
    error(&format!(
        "ERR wrong number of arguments for '{command}' command"
    ))
}

/// Redis's answer to a command other than (P|S)SUBSCRIBE, (P|S)UNSUBSCRIBE, PING, QUIT
/// and RESET on a RESP2 connection with subscriptions (`server.c` processCommand);
/// `command` is the full name (`client|reply`).
pub fn pubsub_context(command: &str) -> Bytes {
    error(&format!(
        "ERR Can't execute '{command}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
    ))
}

/// The protection policy's refusal: Redis's NOPERM wording, with the proxy's reason.
pub fn refused(command: &str, reason: &str) -> Bytes {
    error(&format!(
        "NOPERM this user has no permissions to run the '{command}' command: refused by portcullis because {reason}"
    ))
}

/// No confirmed master to send a command to; `explain` names every backend and its role.
pub fn masterdown(explain: &str) -> Bytes {
    error(&format!(
        "MASTERDOWN portcullis has no confirmed master to send this to: {explain}"
    ))
}

/// No healthy replica under `routing.reads = replica`.
pub fn no_replica(explain: &str) -> Bytes {
    error(&format!(
        "MASTERDOWN portcullis has no healthy replica for reads (routing.reads = replica): {explain}"
    ))
}

/// A backend connection could not be opened.
pub fn unreachable(backend: &str, why: &dyn std::fmt::Display) -> Bytes {
    error(&format!(
        "ERR portcullis cannot reach backend {backend}: {why}"
    ))
}

/// Pass-through: Redis refused the client's own credentials on a new connection.
pub fn credentials_refused(backend: &str, why: &dyn std::fmt::Display) -> Bytes {
    error(&format!(
        "ERR portcullis could not authenticate this connection again on backend {backend} (the connection is closed; reconnect and AUTH): {why}"
    ))
}

/// No backend is configured at that index (a reload removed it).
pub const NO_BACKEND: &[u8] = b"-ERR portcullis has no backend configured\r\n";

/// The backend connection ended before a request was answered.
pub fn link_lost(backend: &str) -> Bytes {
    error(&format!(
        "ERR portcullis lost the connection to backend {backend}; the command may or may not have been applied"
    ))
}

/// Redis's answer to a request whose keys hash to different slots (`cluster.c`
/// `clusterRedirectClient`, `CLUSTER_REDIR_CROSS_SLOT`).
pub const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

/// Redis's answer to a command queued inside MULTI (`multi.c` `queueMultiCommand`).
pub const QUEUED: &[u8] = b"+QUEUED\r\n";

/// Redis's answer to WATCH inside MULTI (`multi.c` `watchCommand`).
pub const WATCH_IN_MULTI: &[u8] = b"-ERR WATCH inside MULTI is not allowed\r\n";

/// Redis's answer to a `no_multi` command inside MULTI (`server.c` `processCommand`).
pub const NOT_IN_MULTI: &[u8] = b"-ERR Command not allowed inside a transaction\r\n";

/// Redis's answer when the cluster cannot serve a slot (`cluster.c`
/// `clusterRedirectClient`, `CLUSTER_REDIR_DOWN_UNBOUND`), with the slot named.
pub fn cluster_slot_unserved(slot: u16, why: &str) -> Bytes {
    error(&format!(
        "CLUSTERDOWN Hash slot {slot} not served: portcullis has no confirmed master for it ({why})"
    ))
}

/// No shard has a confirmed master for a keyless command.
pub const CLUSTER_NO_MASTER: &[u8] =
    b"-CLUSTERDOWN portcullis has no confirmed master on any shard of the cluster\r\n";

/// A cluster redirect (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, READONLY) kept coming past
/// `routing.failover_wait`: the proxy stops retrying; nothing cluster-internal is shown.
pub fn cluster_gave_up(slot: Option<u16>, node: &str, last: &str) -> Bytes {
    let slot = slot.map_or_else(|| "no slot".to_string(), |s| format!("slot {s}"));
    error(&format!(
        "TRYAGAIN portcullis could not complete the command on the cluster within routing.failover_wait ({slot}, node {node}, last answer: {last})"
    ))
}

/// A node moved the slot of a command that cannot be retried (inside MULTI, or while the
/// session is bound to one node by WATCH, pub/sub or a blocking command).
pub fn cluster_moved_while_bound(slot: Option<u16>, node: &str) -> Bytes {
    let slot = slot.map_or_else(|| "no slot".to_string(), |s| format!("slot {s}"));
    error(&format!(
        "TRYAGAIN portcullis: {slot} is no longer served by node {node}, to which this connection is bound (transaction, WATCH or subscription); retry"
    ))
}

/// A `CLUSTER` subcommand the proxy does not answer as a single node.
pub fn cluster_subcommand_refused(sub: &str) -> Bytes {
    error(&format!(
        "ERR portcullis answers the CLUSTER namespace as a single node; CLUSTER {sub} is not available through it"
    ))
}

/// `ASKING`, `READONLY`, `READWRITE` from a client in cluster mode: the proxy handles
/// redirects and routing itself.
pub fn cluster_client_redirect_refused(command: &str) -> Bytes {
    error(&format!(
        "ERR portcullis handles cluster redirects and replica routing itself; {command} is not available through it"
    ))
}

/// Redis's answer to a nested MULTI (`multi.c` `multiCommand`).
pub const MULTI_NESTED: &[u8] = b"-ERR MULTI calls can not be nested\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_never_break_the_frame() {
        assert_eq!(&error("ERR a\r\nb")[..], b"-ERR a  b\r\n");
    }

    #[test]
    fn unknown_subcommand_keeps_raw_bytes() {
        let req = Request::from_args(&[b"CLIENT".as_slice(), b"\xe9t\xe9"]);
        assert_eq!(
            &unknown_subcommand("client", &req)[..],
            b"-ERR unknown subcommand '\xe9t\xe9'. Try CLIENT HELP.\r\n"
        );
    }

    #[test]
    fn unknown_command_cuts_like_redis() {
        let long = vec![b'a'; 200];
        let req = Request::from_args(&[b"NOSUCH".as_slice(), &long, b"x"]);
        let reply = unknown_command(&req);
        // 128 bytes of the first argument between quotes, and nothing after.
        let expected = format!(
            "-ERR unknown command 'NOSUCH', with args beginning with: '{}' \r\n",
            "a".repeat(128)
        );
        assert_eq!(&reply[..], expected.as_bytes());
    }
}
