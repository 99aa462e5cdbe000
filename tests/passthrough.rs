//! `[auth] mode = "passthrough"`: the client's AUTH / HELLO AUTH goes to Redis, whose ACL
//! decides and answers; the session replays the accepted credentials on every new link.
//! Each conversation runs through the proxy and directly against the same Redis, and the
//! replies must be the same bytes.

mod support;

use portcullis::auth::AuthMode;
use portcullis::config::{BackendConfig, Config};
use support::{resp, Conn, Proxy, RedisServer, WAIT};

/// The default user's password: the proxy's own credential (probes).
const ADMIN_PW: &str = "admin-pw";

/// redis-server flags: `requirepass` and an ACL user `app` limited to `app:*` keys.
const ACL_FLAGS: &[&str] = &[
    "--requirepass",
    ADMIN_PW,
    "--user",
    "app",
    "on",
    ">app-pw",
    "~app:*",
    "+@all",
];

/// Redis with `requirepass` and an ACL user `app` limited to `app:*` keys.
fn redis_with_acl() -> RedisServer {
    RedisServer::start(ACL_FLAGS)
}

fn passthrough(redis: &RedisServer, password: Option<&str>) -> Config {
    let mut config = Config {
        backends: vec![BackendConfig {
            password: password.map(str::to_string),
            ..BackendConfig::from_address(redis.addr())
        }],
        ..Config::default()
    };
    config.auth.mode = AuthMode::Passthrough;
    config
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Wait until the proxy knows the backend requires a password: an unauthenticated client
/// is then held to Redis's pre-auth bounds by the proxy itself, which closes the
/// connection after the error (a forwarded frame would leave it open).
async fn until_backend_requires_auth(proxy: &Proxy) {
    let eleven: Vec<&[u8]> = vec![b"ECHO"; 11];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut c = Conn::open(&proxy.addr.to_string()).await;
        c.send(&[resp(&eleven), resp(&[b"PING"])].concat()).await;
        let first = c.reply().await;
        assert_eq!(
            first.as_deref().map(text),
            Some("-ERR Protocol error: unauthenticated multibulk length\r\n".to_string())
        );
        if c.reply().await.is_none() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the prober never found that the backend requires a password"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Run `script` on a fresh connection to the proxy and to Redis; replies must match.
async fn same_replies(proxy: &Proxy, redis: &RedisServer, script: &[&[&str]]) {
    let mut via = Conn::open(&proxy.addr.to_string()).await;
    let mut direct = Conn::open(&redis.addr()).await;
    for cmd in script {
        let got = via.call(cmd).await;
        let want = direct.call(cmd).await;
        assert_eq!(text(&got), text(&want), "{cmd:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_is_answered_by_redis_byte_for_byte() {
    let redis = redis_with_acl();
    let proxy = Proxy::start_with(passthrough(&redis, Some(ADMIN_PW))).await;
    until_backend_requires_auth(&proxy).await;
    let lua_other = "return redis.call('SET', 'other:k', 'v')";
    let script: &[&[&str]] = &[
        &["PING"],
        &["GET", "app:k"],
        &["AUTH", "wrong"],
        &["AUTH", "nobody", "x"],
        &["AUTH", "app"],
        &["HELLO", "3"],
        &["HELLO", "3", "AUTH", "app"],
        &["AUTH", "app", "app-pw"],
        &["ACL", "WHOAMI"],
        &["SET", "app:k", "v"],
        &["SET", "other:k", "v"],
        &["GET", "app:k"],
        // Redis's ACL applies inside scripts.
        &["EVAL", lua_other, "0"],
        &["AUTH", "app", "wrong"],
        &["ACL", "WHOAMI"],
        &["RESET"],
        &["PING"],
        &["ACL", "WHOAMI"],
        &["HELLO", "2", "AUTH", "app", "app-pw"],
        &["ACL", "WHOAMI"],
        &["HELLO", "3", "AUTH", "app", "wrong"],
        &["HELLO", "3", "AUTH", "app", "app-pw", "SETNAME", "svc"],
        &["CLIENT", "GETNAME"],
        &["HGETALL", "app:nohash"],
        &["AUTH", ADMIN_PW],
        &["ACL", "WHOAMI"],
        &["SET", "other:k", "v"],
        &["AUTH", "default", "wrong"],
        &["ACL", "WHOAMI"],
    ];
    same_replies(&proxy, &redis, script).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_auth_and_pre_auth_bounds_match_redis() {
    let redis = redis_with_acl();
    let proxy = Proxy::start_with(passthrough(&redis, Some(ADMIN_PW))).await;
    until_backend_requires_auth(&proxy).await;
    let big = vec![b'x'; 20_000];
    // AUTH then a bulk over the pre-auth bound, in one write: Redis runs AUTH before it
    // parses the next command, so the big SET is accepted.
    let ok = [
        resp(&[b"AUTH", b"app", b"app-pw"]),
        resp(&[b"SET", b"app:big", &big]),
        resp(&[b"STRLEN", b"app:big"]),
    ]
    .concat();
    // A wrong password leaves the client unauthenticated: the same bulk is refused with
    // Redis's pre-auth error and the connection closes.
    let refused = [
        resp(&[b"AUTH", b"app", b"nope"]),
        resp(&[b"SET", b"app:big", &big]),
        resp(&[b"PING"]),
    ]
    .concat();
    for (input, closes) in [(&ok, false), (&refused, true)] {
        let mut out = Vec::new();
        for addr in [proxy.addr.to_string(), redis.addr()] {
            let mut c = Conn::open(&addr).await;
            c.send(input).await;
            let mut replies = Vec::new();
            for _ in 0..3 {
                match c.reply().await {
                    Some(r) => replies.push(text(&r)),
                    None => break,
                }
            }
            if closes {
                assert!(c.reply().await.is_none(), "{addr}: closed after the error");
            }
            out.push(replies);
        }
        assert_eq!(out[0], out[1], "through the proxy vs direct");
    }
}

/// The session's backend link id (CLIENT ID is answered by Redis).
async fn link_id(c: &mut Conn) -> String {
    let id = text(&c.call(&["CLIENT", "ID"]).await);
    assert!(id.starts_with(':'), "{id}");
    id.trim_start_matches(':').trim().to_string()
}

/// Kill one Redis connection by id from an admin connection.
async fn kill_link(redis: &RedisServer, id: &str) {
    let mut admin = Conn::open(&redis.addr()).await;
    assert_eq!(text(&admin.call(&["AUTH", ADMIN_PW]).await), "+OK\r\n");
    assert_eq!(
        text(&admin.call(&["CLIENT", "KILL", "ID", id]).await),
        ":1\r\n"
    );
}

/// `cmd` until it is answered by a live link: the first try after a link loss may get the
/// proxy's "lost the connection" error, when the loss was not yet seen.
async fn after_link_loss(c: &mut Conn, cmd: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = text(&c.call(cmd).await);
        let transient = [
            "portcullis lost the connection",
            "cannot reach backend",
            "MASTERDOWN",
        ];
        if !transient.iter().any(|t| r.contains(t)) {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_replayed_on_a_new_link() {
    let redis = redis_with_acl();
    let proxy = Proxy::start_with(passthrough(&redis, Some(ADMIN_PW))).await;
    let mut c = Conn::open(&proxy.addr.to_string()).await;
    let hello = text(
        &c.call(&["HELLO", "3", "AUTH", "app", "app-pw", "SETNAME", "svc"])
            .await,
    );
    assert!(hello.starts_with("%7\r\n"), "{hello}");
    assert_eq!(text(&c.call(&["SELECT", "2"]).await), "+OK\r\n");
    assert_eq!(text(&c.call(&["SET", "app:k", "db2"]).await), "+OK\r\n");

    // The link is killed from outside: the next command runs on a new link, as the same
    // ACL user, with the protocol, name and db replayed.
    let first = link_id(&mut c).await;
    kill_link(&redis, &first).await;
    assert_eq!(
        after_link_loss(&mut c, &["ACL", "WHOAMI"]).await,
        "$3\r\napp\r\n"
    );
    assert_ne!(link_id(&mut c).await, first);
    assert_eq!(text(&c.call(&["CLIENT", "GETNAME"]).await), "$3\r\nsvc\r\n");
    assert_eq!(text(&c.call(&["GET", "app:k"]).await), "$3\r\ndb2\r\n");
    let denied = text(&c.call(&["SET", "other:k", "v"]).await);
    assert!(denied.starts_with("-NOPERM"), "Redis's own ACL: {denied}");
    assert!(!denied.contains("portcullis"), "{denied}");

    // After RESET the session is unauthenticated again, on new links too (a replay of
    // the old credentials would let the GET through).
    let second = link_id(&mut c).await;
    assert_eq!(text(&c.call(&["RESET"]).await), "+RESET\r\n");
    kill_link(&redis, &second).await;
    assert_eq!(
        after_link_loss(&mut c, &["GET", "app:k"]).await,
        "-NOAUTH Authentication required.\r\n"
    );

    // A Redis restart: the same credentials are replayed on the restarted server.
    let mut c = Conn::open(&proxy.addr.to_string()).await;
    assert_eq!(text(&c.call(&["AUTH", "app", "app-pw"]).await), "+OK\r\n");
    assert_eq!(text(&c.call(&["SET", "app:r", "1"]).await), "+OK\r\n");
    let port = redis.port;
    let mut redis = redis;
    redis.kill();
    let _restarted = RedisServer::start_on(port, ACL_FLAGS);
    assert_eq!(
        after_link_loss(&mut c, &["ACL", "WHOAMI"]).await,
        "$3\r\napp\r\n"
    );
    assert_eq!(text(&c.call(&["SET", "app:r", "2"]).await), "+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_on_a_new_link_close_that_client_only() {
    let redis = redis_with_acl();
    let proxy = Proxy::start_with(passthrough(&redis, Some(ADMIN_PW))).await;
    let mut c = Conn::open(&proxy.addr.to_string()).await;
    assert_eq!(text(&c.call(&["AUTH", "app", "app-pw"]).await), "+OK\r\n");
    let id = link_id(&mut c).await;
    // The password changes; Redis keeps the authenticated connection, but the proxy
    // cannot authenticate a new one with the old password.
    let mut admin = Conn::open(&redis.addr()).await;
    admin.call(&["AUTH", ADMIN_PW]).await;
    assert_eq!(
        text(
            &admin
                .call(&["ACL", "SETUSER", "app", "resetpass", ">new-pw"])
                .await
        ),
        "+OK\r\n"
    );
    kill_link(&redis, &id).await;
    let r = after_link_loss(&mut c, &["GET", "app:k"]).await;
    assert!(
        r.starts_with("-ERR portcullis could not authenticate this connection again")
            && r.contains("WRONGPASS")
            && !r.contains("app-pw"),
        "{r}"
    );
    assert!(c.reply().await.is_none(), "the client is closed");
    // The backend is not blamed: another client authenticates and writes at once.
    let mut other = Conn::open(&proxy.addr.to_string()).await;
    assert_eq!(
        text(&other.call(&["AUTH", "app", "new-pw"]).await),
        "+OK\r\n"
    );
    assert_eq!(text(&other.call(&["SET", "app:k", "v"]).await), "+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_to_a_redis_without_password_is_redis_as_is() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(passthrough(&redis, None)).await;
    let script: &[&[&str]] = &[
        &["SET", "k", "v"],
        &["AUTH", "x"],
        &["AUTH", "default", "x"],
        &["AUTH", "nobody", "x"],
        &["HELLO", "3", "AUTH", "default", "x"],
        &["ACL", "WHOAMI"],
        &["GET", "k"],
    ];
    same_replies(&proxy, &redis, script).await;
    // Protection still applies in pass-through.
    let mut c = Conn::open(&proxy.addr.to_string()).await;
    let r = text(&c.call(&["CONFIG", "SET", "dir", "/tmp"]).await);
    assert!(r.starts_with("-NOPERM") && r.contains("portcullis"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_clients_authenticate_through_the_proxy() {
    use redis::AsyncCommands;
    let redis = redis_with_acl();
    let proxy = Proxy::start_with(passthrough(&redis, Some(ADMIN_PW))).await;
    let mut app = support::client(&format!("app:app-pw@{}", proxy.addr)).await;
    let _: () = app.set("app:x", 1).await.unwrap();
    let who: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut app)
        .await
        .unwrap();
    assert_eq!(who, "app");
    let r: redis::RedisResult<()> = app.set("other:x", 1).await;
    assert_eq!(r.unwrap_err().code(), Some("NOPERM"));
    let bad = redis::Client::open(format!("redis://app:wrong@{}/", proxy.addr)).unwrap();
    let err = bad.get_multiplexed_async_connection().await.err();
    assert!(
        err.as_ref()
            .is_some_and(|e| e.kind() == redis::ErrorKind::AuthenticationFailed),
        "{err:?}"
    );
}

/// An admin connection (the default user) straight to a server.
async fn admin(r: &RedisServer) -> Conn {
    let mut c = Conn::open(&r.addr()).await;
    assert_eq!(text(&c.call(&["AUTH", ADMIN_PW]).await), "+OK\r\n");
    c
}

/// Poll `check` on `r` (as admin) until it holds.
async fn until_on(r: &RedisServer, what: &str, cmd: &[&str], check: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut c = admin(r).await;
    loop {
        let got = text(&c.call(cmd).await);
        if check(&got) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {got}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_follow_the_session_to_replicas_and_a_new_master() {
    let acl = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec![
            "--requirepass",
            ADMIN_PW,
            "--masterauth",
            ADMIN_PW,
            "--user",
            "app",
            "on",
            ">app-pw",
            "~app:*",
            "+@all",
        ];
        args.extend_from_slice(extra);
        args
    };
    let old = RedisServer::start(&acl(&[]));
    let old_port = old.port.to_string();
    let mut replica_args = acl(&[]);
    replica_args.extend_from_slice(&["--replicaof", "127.0.0.1", &old_port]);
    let new = RedisServer::start(&replica_args);
    until_on(&new, "replica link up", &["INFO", "replication"], |i| {
        i.contains("master_link_status:up")
    })
    .await;
    let mut config = passthrough(&old, Some(ADMIN_PW));
    config.backends.push(BackendConfig {
        password: Some(ADMIN_PW.into()),
        ..BackendConfig::from_address(new.addr())
    });
    config.routing.reads = portcullis::config::ReadPolicy::PreferReplica;
    let proxy = Proxy::start_with(config).await;

    let mut c = Conn::open(&proxy.addr.to_string()).await;
    assert_eq!(text(&c.call(&["AUTH", "app", "app-pw"]).await), "+OK\r\n");
    assert_eq!(text(&c.call(&["SET", "app:k", "v1"]).await), "+OK\r\n");
    // Reads go to the replica on a link opened with the client's credentials (once the
    // proxy has seen the replica follow the master).
    until_on(&new, "replica has the write", &["GET", "app:k"], |v| {
        v.contains("v1")
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert_eq!(text(&c.call(&["GET", "app:k"]).await), "$2\r\nv1\r\n");
        let mut a = admin(&new).await;
        if text(&a.call(&["CLIENT", "LIST"]).await).contains("user=app") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replica link as app"
        );
    }

    // Promotion: the session moves to the new master with its credentials.
    let mut a = admin(&new).await;
    assert_eq!(text(&a.call(&["REPLICAOF", "NO", "ONE"]).await), "+OK\r\n");
    let mut a = admin(&old).await;
    let new_port = new.port.to_string();
    assert_eq!(
        text(&a.call(&["REPLICAOF", "127.0.0.1", &new_port]).await),
        "+OK\r\n"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = text(&c.call(&["SET", "app:k", "v2"]).await);
        if r == "+OK\r\n" {
            break;
        }
        assert!(
            r.starts_with("-MASTERDOWN") || r.contains("portcullis lost the connection"),
            "{r}"
        );
        assert!(tokio::time::Instant::now() < deadline, "{r}");
    }
    let mut direct_new = admin(&new).await;
    assert_eq!(
        text(&direct_new.call(&["GET", "app:k"]).await),
        "$2\r\nv2\r\n"
    );
    assert_eq!(text(&c.call(&["ACL", "WHOAMI"]).await), "$3\r\napp\r\n");
    let denied = text(&c.call(&["SET", "other:k", "v"]).await);
    assert!(denied.starts_with("-NOPERM"), "{denied}");
}
