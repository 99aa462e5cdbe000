//! Users at the proxy (AUTH / HELLO AUTH with Redis's texts, per-user policy, pre-auth
//! bounds) and backend credentials that stay inside the proxy.

mod support;

use portcullis::auth::UserConfig;
use portcullis::config::{BackendConfig, Config};
use redis::AsyncCommands;
use sha2::{Digest, Sha256};
use support::{resp, Proxy, RedisServer};

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
    let redis = RedisServer::start(&["--requirepass", "backend-secret"]);
    let config = Config {
        backends: vec![BackendConfig {
            password: Some("backend-secret".into()),
            ..BackendConfig::from_address(redis.addr())
        }],
        ..Config::default()
    };
    let proxy = Proxy::start_with(config).await;
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
