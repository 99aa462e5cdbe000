//! Operations: a reload changes policy for connected clients without dropping them, a bad
//! reload keeps the running config, and shutdown drains a pipelined in-flight batch.

mod support;

use std::time::Duration;

use portcullis::config::{BackendConfig, Config};
use support::{resp, Proxy, RedisServer, WAIT};

fn config(redis: &RedisServer) -> Config {
    Config {
        backends: vec![BackendConfig::from_address(redis.addr())],
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_policy_for_connected_clients() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config(&redis)).await;
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"KEYS", b"nothing*"])).await;
    c.expect(b"*0\r\n").await;

    let mut stricter = config(&redis);
    stricter.protection.deny = vec!["keys".into()];
    let generation = proxy.reload(stricter).await.expect("valid reload");
    assert_eq!(generation, 1);
    c.send(&resp(&[b"KEYS", b"nothing*"])).await;
    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-NOPERM"),
        "{}",
        String::from_utf8_lossy(&line)
    );

    // An invalid config is rejected and the running one stays.
    let mut bad = config(&redis);
    bad.protection.allow = vec!["slaveof".into()];
    let err = proxy.reload(bad).await.unwrap_err();
    assert!(err.contains("slaveof"), "{err}");
    c.send(&[resp(&[b"KEYS", b"x"]), resp(&[b"PING"])].concat())
        .await;
    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-NOPERM"),
        "{}",
        String::from_utf8_lossy(&line)
    );
    c.expect(b"+PONG\r\n").await;

    // Back to the default: allowed again on the same connection.
    proxy.reload(config(&redis)).await.expect("valid reload");
    c.send(&resp(&[b"KEYS", b"nothing*"])).await;
    c.expect(b"*0\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_a_pipelined_batch() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config(&redis)).await;
    let mut c = proxy.raw().await;
    let mut batch = Vec::new();
    for _ in 0..5000 {
        batch.extend(resp(&[b"INCR", b"drain"]));
    }
    batch.extend(resp(&[b"BLPOP", b"never", b"0.3"]));
    c.send(&batch).await;
    // When Redis has the BLPOP blocked, the whole batch was read and sent.
    support::wait_for_blocked(&mut redis.direct().await, 1).await;
    proxy.shutdown.cancel();
    let mut expected = Vec::new();
    for i in 1..=5000 {
        expected.extend(format!(":{i}\r\n").into_bytes());
    }
    expected.extend(b"*-1\r\n");
    let got = c.read_to_close().await;
    assert_eq!(
        got.len(),
        expected.len(),
        "every in-flight reply arrives before the close"
    );
    assert!(got == expected);
    // And new clients are no longer accepted.
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err() || {
            let mut r = proxy.raw().await;
            r.send(b"PING\r\n").await;
            r.read_to_close().await.is_empty()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_to_a_new_backend_list_without_dropping_clients() {
    use redis::AsyncCommands;
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    let mut cfg = config(&a);
    cfg.probe.interval = Duration::from_millis(100);
    let proxy = Proxy::start_with(cfg.clone()).await;
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"SET", b"where", b"a"])).await;
    c.expect(b"+OK\r\n").await;

    // Replace backend a by b in the config: a is retired, b is probed and confirmed.
    cfg.backends = vec![BackendConfig::from_address(b.addr())];
    proxy.reload(cfg).await.expect("valid reload");
    let mut db = b.direct().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The same client connection, never dropped.
        c.send(&resp(&[b"SET", b"where", b"b"])).await;
        let line = c.read_to_line().await;
        assert!(
            line == b"+OK\r\n" || line.starts_with(b"-MASTERDOWN"),
            "{}",
            String::from_utf8_lossy(&line)
        );
        let on_b: Option<String> = db.get("where").await.unwrap();
        if on_b.as_deref() == Some("b") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes never moved to b"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut da = a.direct().await;
    let on_a: String = da.get("where").await.unwrap();
    assert_eq!(
        on_a, "a",
        "no write went to the removed backend after the move"
    );
}

/// CPU time this test process has used (all threads), from /proc/self/stat.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the full line, in clock ticks (100 Hz).
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_sessions_wait_without_spinning() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config(&redis)).await;
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"BLPOP", b"never", b"1"])).await;
    support::wait_for_blocked(&mut redis.direct().await, 1).await;
    let before = process_cpu();
    proxy.shutdown.cancel();
    // The blocked command still gets its answer (nil after 1 s), then the close.
    assert_eq!(c.read_to_close().await, b"*-1\r\n");
    let used = process_cpu() - before;
    // A session polling its cancelled shutdown token in a loop burns a core for the
    // whole second; waiting on the backend costs next to nothing.
    assert!(
        used < Duration::from_millis(500),
        "draining used {used:?} of CPU in about one second"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_writing_answered_replies() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config(&redis)).await;
    let value = vec![b'r'; 4 * 1024 * 1024];
    let mut direct = redis.direct().await;
    let _: () = redis::cmd("SET")
        .arg("drain:big")
        .arg(&value)
        .query_async(&mut direct)
        .await
        .expect("SET");
    // A client with a small receive window asks for 4 MiB and does not read yet: the
    // whole reply is at the proxy (nothing pending at Redis) when shutdown starts.
    let mut c = support::Raw::connect_with_recv_buffer(proxy.addr, 64 * 1024).await;
    c.send(&resp(&[b"GET", b"drain:big"])).await;
    support::wait_until("Redis has answered the GET", || {
        let mut direct = direct.clone();
        async move {
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut direct)
                .await
                .unwrap_or_default();
            stats.contains("cmdstat_get:calls=1,")
        }
    })
    .await;
    proxy.shutdown.cancel();
    let mut expected = format!("${}\r\n", value.len()).into_bytes();
    expected.extend_from_slice(&value);
    expected.extend_from_slice(b"\r\n");
    let got = c.read_to_close().await;
    assert_eq!(
        got.len(),
        expected.len(),
        "the reply is cut short by shutdown"
    );
    assert!(got == expected);
}
