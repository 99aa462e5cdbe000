//! Users at the proxy (AUTH / HELLO AUTH with Redis's texts, per-user policy, pre-auth
//! bounds), backend credentials that stay inside the proxy, and proxy mode without users
//! accepting the backend password an app kept. Pass-through mode: `tests/passthrough.rs`.

mod support;

use portcullis::auth::UserConfig;
use portcullis::config::{BackendConfig, Config};
use redis::AsyncCommands;
use sha2::{Digest, Sha256};
use support::{resp, Conn, Proxy, RedisServer};

fn sha(p: &str) -> String {
    Sha256::digest(p.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn with_users(redis: &RedisServer) -> Config {
    Config {
        backends: vec![BackendConfig::from_address(redis.addr())],
        users: vec![
            UserConfig {
                name: "app".into(),
                password_sha256: sha("app-pw"),
                allow: vec!["flushdb".into()],
                deny: vec!["keys".into()],
            },
            UserConfig {
                name: "default".into(),
                password_sha256: sha("default-pw"),
                allow: vec![],
                deny: vec![],
            },
        ],
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_required_and_answered_with_redis_texts() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(with_users(&redis)).await;
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"PING"])).await;
    c.expect(b"-NOAUTH Authentication required.\r\n").await;
    c.send(&resp(&[b"HELLO", b"3"])).await;
    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-NOAUTH HELLO must be called"),
        "{}",
        String::from_utf8_lossy(&line)
    );
    c.send(&resp(&[b"AUTH", b"app", b"nope"])).await;
    c.expect(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        .await;
    c.send(&resp(&[b"AUTH", b"nobody", b"app-pw"])).await;
    c.expect(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        .await;
    // Unauthenticated requests get Redis's pre-auth bounds.
    let mut big = proxy.raw().await;
    big.send(b"*11\r\n").await;
    big.expect(b"-ERR Protocol error: unauthenticated multibulk length\r\n")
        .await;
    big.read_to_close().await;

    c.send(&resp(&[b"AUTH", b"app", b"app-pw"])).await;
    c.expect(b"+OK\r\n").await;
    c.send(
        &[
            resp(&[b"SET", b"k", b"v"]),
            resp(&[b"FLUSHDB"]),
            resp(&[b"KEYS", b"*"]),
        ]
        .concat(),
    )
    .await;
    c.expect(b"+OK\r\n+OK\r\n").await;
    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-NOPERM"),
        "{}",
        String::from_utf8_lossy(&line)
    );
    // RESET drops back to unauthenticated.
    c.send(&[resp(&[b"RESET"]), resp(&[b"PING"])].concat())
        .await;
    c.expect(b"+RESET\r\n-NOAUTH Authentication required.\r\n")
        .await;
    // One-argument AUTH is the default user; its policy is the global one.
    c.send(&[resp(&[b"AUTH", b"default-pw"]), resp(&[b"FLUSHDB"])].concat())
        .await;
    c.expect(b"+OK\r\n").await;
    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-NOPERM"),
        "{}",
        String::from_utf8_lossy(&line)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_authenticate() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(with_users(&redis)).await;
    // redis-rs sends AUTH user pass (RESP2) from the URL.
    let mut c = support::client(&format!("app:app-pw@{}", proxy.addr)).await;
    let _: () = c.set("x", 1).await.unwrap();
    // HELLO 3 AUTH ... SETNAME, as Lettuce/redis-py send it.
    let mut raw = proxy.raw().await;
    raw.send(&resp(&[
        b"HELLO", b"3", b"AUTH", b"app", b"app-pw", b"SETNAME", b"svc",
    ]))
    .await;
    raw.send(&resp(&[b"CLIENT", b"GETNAME"])).await;
    let got = raw.read_until(b"$3\r\nsvc\r\n").await;
    assert!(
        got.starts_with(b"%7\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let mut raw = proxy.raw().await;
    raw.send(&resp(&[b"HELLO", b"3", b"AUTH", b"app", b"bad"]))
        .await;
    raw.expect(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_credentials_stay_in_the_proxy() {
    let (_redis, proxy) = proxy_holding_backend_password().await;
    let mut c = proxy.client().await;
    let _: () = c.set("k", "v").await.unwrap();
    let v: String = c.get("k").await.unwrap();
    assert_eq!(v, "v");
    let r: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("requirepass")
        .query_async(&mut c)
        .await;
    assert_eq!(r.unwrap_err().code(), Some("NOPERM"));
    let r: redis::RedisResult<String> = redis::cmd("ACL").arg("LIST").query_async(&mut c).await;
    assert_eq!(r.unwrap_err().code(), Some("NOPERM"));
}

/// Proxy mode, no `[[users]]`, Redis with `requirepass` held by the proxy: an app that still
/// sends that password gets what Redis would answer (`+OK`), a wrong one Redis's
/// `-WRONGPASS`, byte for byte against a direct connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_accepts_the_backend_password_the_app_kept() {
    let (redis, proxy) = proxy_holding_backend_password().await;
    let script: &[&[&str]] = &[
        &["AUTH", "wrong"],
        &["AUTH", "default", "wrong"],
        &["AUTH", "nobody", "backend-secret"],
        &["HELLO", "2", "AUTH", "default", "wrong"],
        &["AUTH", "backend-secret"],
        &["AUTH", "default", "backend-secret"],
        &["HELLO", "3", "AUTH", "default", "backend-secret"],
        &[
            "HELLO",
            "2",
            "AUTH",
            "default",
            "backend-secret",
            "SETNAME",
            "app",
        ],
        &["CLIENT", "GETNAME"],
        &["SET", "k", "v"],
        &["ACL", "WHOAMI"],
    ];
    let mut via = Conn::open(&proxy.addr.to_string()).await;
    let mut direct = Conn::open(&redis.addr()).await;
    for cmd in script {
        let got = via.call(cmd).await;
        let want = direct.call(cmd).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{cmd:?}"
        );
    }
    // redis-rs with the password in the URL (AUTH <password>, RESP2), and a wrong one.
    let mut app = support::client(&format!(":backend-secret@{}", proxy.addr)).await;
    let _: () = app.set("x", 1).await.unwrap();
    let wrong = redis::Client::open(format!("redis://:nope@{}/", proxy.addr)).unwrap();
    let err = wrong.get_multiplexed_async_connection().await.err();
    assert!(
        err.as_ref()
            .is_some_and(|e| e.kind() == redis::ErrorKind::AuthenticationFailed),
        "{err:?}"
    );
}

/// `[auth] mode = "passthrough"` with `[[users]]` is a configuration error, and a reload
/// cannot switch the mode (it needs new connections): the running mode stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_mode_with_users_is_rejected_and_kept_across_reload() {
    let secured = RedisServer::start(&["--requirepass", "pw"]);
    let mut both = with_users(&secured);
    both.auth.mode = portcullis::auth::AuthMode::Passthrough;
    let err = both.validate().unwrap_err().to_string();
    assert!(err.contains("auth.mode"), "{err}");

    let held = |mode| {
        let mut c = Config {
            backends: vec![BackendConfig {
                password: Some("pw".into()),
                ..BackendConfig::from_address(secured.addr())
            }],
            ..Config::default()
        };
        c.auth.mode = mode;
        c
    };
    let proxy = Proxy::start_with(held(portcullis::auth::AuthMode::Proxy)).await;
    let generation = proxy
        .reload(held(portcullis::auth::AuthMode::Passthrough))
        .await
        .unwrap();
    assert_eq!(generation, 1);
    // Still proxy mode: a client that never sends AUTH is served on the proxy's
    // credentials (pass-through would get Redis's -NOAUTH).
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"SET", b"k", b"v"])).await;
    c.expect(b"+OK\r\n").await;
}

/// A Redis with `requirepass`, and a proxy (no `[[users]]`) holding that password as its
/// backend credential.
async fn proxy_holding_backend_password() -> (RedisServer, Proxy) {
    let redis = RedisServer::start(&["--requirepass", "backend-secret"]);
    let config = Config {
        backends: vec![BackendConfig {
            password: Some("backend-secret".into()),
            ..BackendConfig::from_address(redis.addr())
        }],
        ..Config::default()
    };
    let proxy = Proxy::start_with(config).await;
    (redis, proxy)
}
