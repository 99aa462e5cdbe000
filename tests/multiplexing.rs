//! Shared backend connections (`routing.backend_connections = "shared"`): many clients'
//! pipelines over a handful of backend connections, interleaved with sessions that pin
//! themselves to a connection of their own; every reply reaches its own client, in order.
//! These tests set shared mode themselves, so they test it in every run.

mod support;

use std::time::{Duration, Instant};

use portcullis::config::{BackendConfig, BackendConnections, Config};
use support::*;
use tokio::net::TcpStream;

/// Plain clients, each sending pipelines of its own keys.
const PLAIN_CLIENTS: usize = 2_000;
/// Pinned sessions of each kind, running at the same time.
const PINNED_PER_KIND: usize = 10;
/// Pipelines per plain client, and requests per pipeline (SET + GET pairs).
const ROUNDS: usize = 3;
const PAIRS: usize = 8;
/// Shared connections per backend in these tests.
const SHARED: usize = 2;

fn shared_config(redis: &RedisServer) -> Config {
    let mut config = Config {
        backends: vec![BackendConfig::from_address(redis.addr())],
        ..Config::default()
    };
    config.routing.backend_connections = BackendConnections::Shared;
    config.routing.shared_connections = SHARED;
    config.limits.max_clients = PLAIN_CLIENTS + 1_000;
    config
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    resp(&args)
}

/// Backend connections Redis sees (`connected_clients`), this query's own included.
async fn backend_connections(redis: &RedisServer) -> usize {
    let mut c = redis.direct().await;
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut c)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("connected_clients")
}

/// One plain client: `ROUNDS` pipelines of SET/GET on its own key, each checked byte for
/// byte (a reply that went to the wrong client or out of order shows up here).
async fn plain_client(mut c: Raw, i: usize) -> Raw {
    let key = format!("mux:{i}");
    for r in 0..ROUNDS {
        let mut pipeline = Vec::new();
        let mut expected = String::new();
        for j in 0..PAIRS {
            let value = format!("{i}:{r}:{j}");
            pipeline.extend(cmd(&["SET", &key, &value]));
            pipeline.extend(cmd(&["GET", &key]));
            expected.push_str("+OK\r\n");
            expected.push_str(&bulk(&value));
        }
        pipeline.extend(cmd(&["ECHO", &key]));
        expected.push_str(&bulk(&key));
        c.send(&pipeline).await;
        c.expect(expected.as_bytes()).await;
    }
    c
}

/// A session with connection state, interleaved with the plain ones; `kind` picks which.
async fn pinned_client(mut c: Raw, kind: usize, i: usize) {
    let key = format!("pin:{kind}:{i}");
    match kind {
        // A transaction, then a plain command (released back to the shared path).
        0 => {
            let mut p = cmd(&["MULTI"]);
            p.extend(cmd(&["SET", &key, "1"]));
            p.extend(cmd(&["INCR", &key]));
            p.extend(cmd(&["EXEC"]));
            p.extend(cmd(&["GET", &key]));
            c.send(&p).await;
            c.expect(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:2\r\n$1\r\n2\r\n")
                .await;
        }
        // Another database, then back to 0: the key lives in db 1 only.
        1 => {
            let mut p = cmd(&["SELECT", "1"]);
            p.extend(cmd(&["SET", &key, "db1"]));
            p.extend(cmd(&["SELECT", "0"]));
            p.extend(cmd(&["GET", &key]));
            p.extend(cmd(&["SELECT", "1"]));
            p.extend(cmd(&["GET", &key]));
            c.send(&p).await;
            c.expect(b"+OK\r\n+OK\r\n+OK\r\n$-1\r\n+OK\r\n$3\r\ndb1\r\n")
                .await;
        }
        // A blocking command that times out, then plain ones.
        2 => {
            let mut p = cmd(&["BLPOP", &key, "0.05"]);
            p.extend(cmd(&["RPUSH", &key, "x"]));
            p.extend(cmd(&["LPOP", &key]));
            c.send(&p).await;
            c.expect(b"*-1\r\n:1\r\n$1\r\nx\r\n").await;
        }
        // A name: CLIENT GETNAME must see it, whatever the others do.
        3 => {
            let mut p = cmd(&["CLIENT", "SETNAME", &format!("n{kind}x{i}")]);
            p.extend(cmd(&["SET", &key, "v"]));
            p.extend(cmd(&["CLIENT", "GETNAME"]));
            c.send(&p).await;
            let name = format!("n{kind}x{i}");
            c.expect(format!("+OK\r\n+OK\r\n{}", bulk(&name)).as_bytes())
                .await;
        }
        // Pub/sub, then back to plain commands.
        _ => {
            let channel = format!("ch:{i}");
            c.send(&cmd(&["SUBSCRIBE", &channel])).await;
            c.expect(format!("*3\r\n$9\r\nsubscribe\r\n{}:1\r\n", bulk(&channel)).as_bytes())
                .await;
            let mut p = cmd(&["UNSUBSCRIBE", &channel]);
            p.extend(cmd(&["SET", &key, "after"]));
            p.extend(cmd(&["GET", &key]));
            c.send(&p).await;
            c.expect(
                format!(
                    "*3\r\n$11\r\nunsubscribe\r\n{}:0\r\n+OK\r\n$5\r\nafter\r\n",
                    bulk(&channel)
                )
                .as_bytes(),
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_pipelines_interleaved_with_pinned_sessions_get_their_own_replies() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(shared_config(&redis)).await;

    let mut plain = tokio::task::JoinSet::new();
    let mut pinned = tokio::task::JoinSet::new();
    for i in 0..PLAIN_CLIENTS {
        let c = Raw::connect(proxy.addr).await;
        plain.spawn(plain_client(c, i));
        if i % (PLAIN_CLIENTS / PINNED_PER_KIND) == 0 {
            for kind in 0..5 {
                let c = Raw::connect(proxy.addr).await;
                pinned.spawn(pinned_client(c, kind, i));
            }
        }
    }
    let mut open = Vec::with_capacity(PLAIN_CLIENTS);
    while let Some(r) = plain.join_next().await {
        open.push(r.expect("plain client"));
    }
    while let Some(r) = pinned.join_next().await {
        r.expect("pinned client");
    }

    // Every plain client is still connected; the pinned ones are done. What Redis sees:
    // the shared connections, the prober's, and this query's.
    wait_until("pinned sessions' connections closed", || async {
        backend_connections(&redis).await <= SHARED + 2
    })
    .await;
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_shared_connection_answers_in_flight_requests_and_keeps_the_sessions() {
    let redis = RedisServer::start(&[]);
    let mut config = shared_config(&redis);
    config.routing.shared_connections = 1;
    let proxy = Proxy::start_with(config).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = Raw::connect(proxy.addr).await;
        c.send(&cmd(&["PING"])).await;
        c.expect(b"+PONG\r\n").await;
        clients.push(c);
    }
    // Each client blocks nothing, but a DEBUG SLEEP from a direct connection holds Redis
    // while every client has a request in flight on the shared connection; then that
    // connection is killed from the server side.
    let mut direct = redis.direct().await;
    let sleeper = {
        let redis_addr = redis.addr();
        tokio::spawn(async move {
            let mut c = client(&redis_addr).await;
            let _: redis::Value = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("0.5")
                .query_async(&mut c)
                .await
                .expect("DEBUG SLEEP");
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for c in &mut clients {
        c.send(&cmd(&["GET", "lost:key"])).await;
    }
    // Kill every connection but the direct ones named here: the shared one.
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("direct")
        .query_async(&mut direct)
        .await
        .expect("SETNAME");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut direct)
        .await
        .expect("CLIENT KILL");
    sleeper.await.ok();
    for c in &mut clients {
        let line = c.read_to_line().await;
        let text = String::from_utf8_lossy(&line).into_owned();
        // Either the reply made it before the kill, or the lost-connection error.
        assert!(
            text == "$-1\r\n" || text.starts_with("-ERR portcullis lost the connection to backend"),
            "{text:?}"
        );
    }
    // The sessions live on: a fresh shared connection serves them.
    let started = Instant::now();
    for c in &mut clients {
        c.send(&cmd(&["SET", "after:loss", "1"])).await;
        c.expect(b"+OK\r\n").await;
    }
    assert!(started.elapsed() < WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_clients_use_a_handful_of_backend_connections() {
    const CLIENTS: usize = 10_000;
    const BATCH: usize = 100;
    let redis = RedisServer::start(&[]);
    let proxy = ProxyProcess::start(
        &redis,
        &format!(
            "[routing]\nbackend_connections = \"shared\"\nshared_connections = 2\n\
             [limits]\nmax_clients = {}\n",
            CLIENTS + 100
        ),
    )
    .await;
    // Warm up (allocator, the shared connections) with one client, then measure.
    let mut first = Raw::connect(proxy.addr).await;
    first.send(&cmd(&["GET", "k"])).await;
    first.expect(b"$-1\r\n").await;
    let rss_before = proxy.rss();
    let mut clients: Vec<Raw> = Vec::with_capacity(CLIENTS);
    while clients.len() < CLIENTS {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..BATCH.min(CLIENTS - clients.len()) {
            let addr = proxy.addr;
            set.spawn(async move {
                let stream = TcpStream::connect(addr).await.expect("connect");
                let mut c = Raw::new(stream);
                // Every client has used the backend once, then stays idle.
                c.send(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").await;
                c.expect(b"$-1\r\n").await;
                c
            });
        }
        while let Some(r) = set.join_next().await {
            clients.push(r.expect("client"));
        }
    }
    let rss_after = proxy.rss();
    let per_client = rss_after.saturating_sub(rss_before) / CLIENTS as u64;
    let backends = backend_connections(&redis).await;
    eprintln!(
        "{CLIENTS} clients (each sent one GET): {backends} backend connections (this query's \
         and the prober's included); proxy RSS {} -> {} KiB, {per_client} bytes per client",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(backends <= 10, "{backends} backend connections");
    // The target is 8 KiB per client; the bound here leaves room for allocator
    // noise on a busy machine, the table in the README has the measured figure.
    assert!(per_client <= 16 * 1024, "{per_client} bytes per client");
    drop(clients);
}

/// `CLIENT ID` through a `Raw` connection.
async fn client_id(c: &mut Raw) -> String {
    c.send(&cmd(&["CLIENT", "ID"])).await;
    let line = String::from_utf8(c.read_to_line().await).expect("utf-8");
    assert!(line.starts_with(':'), "CLIENT ID answered {line:?}");
    line.trim_start_matches(':').trim_end().to_string()
}

/// Redis keeps one id per connection: once a client has seen its connection's id
/// (`CLIENT ID`, `CLIENT INFO`, `HELLO`), shared mode keeps it on its own link, so later
/// stateless commands do not move it to a shared connection and a new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_saw_its_id_keeps_it() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(shared_config(&redis)).await;
    for first in [&["CLIENT", "ID"][..], &["CLIENT", "INFO"], &["HELLO", "2"]] {
        let mut c = Raw::connect(proxy.addr).await;
        c.send(&cmd(first)).await;
        c.send(&cmd(&["ECHO", "end-of-first"])).await;
        let seen = c.read_until(b"end-of-first\r\n").await;
        assert!(!seen.starts_with(b"-"), "{first:?} answered {seen:?}");
        // Whatever else the first reply holds, the id comes from the link it ran on.
        let id = client_id(&mut c).await;
        let mut pipeline = Vec::new();
        for _ in 0..8 {
            pipeline.extend(cmd(&["GET", "id-test"]));
        }
        c.send(&pipeline).await;
        c.expect("$-1\r\n".repeat(8).as_bytes()).await;
        assert_eq!(client_id(&mut c).await, id, "after {first:?}");
        c.send(&cmd(&["CLIENT", "INFO"])).await;
        let header = String::from_utf8(c.read_to_line().await).expect("utf-8");
        let len: usize = header
            .trim_start_matches('$')
            .trim_end()
            .parse()
            .expect("bulk");
        let info = String::from_utf8(c.read_exact_len(len + 2).await).expect("utf-8");
        assert!(info.starts_with(&format!("id={id} ")), "{info}");
    }
}

/// `WAIT` counts the replicas that acknowledged this connection's writes. In shared mode
/// a session's writes go through a shared connection and its `WAIT` through a link of its
/// own, whose write offset knew nothing of them: with the replica frozen, Redis answers
/// 0 after the timeout, and so must the proxy (it used to answer 1 at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_counts_writes_sent_on_a_shared_connection() {
    let master = RedisServer::start(&[]);
    let port = master
        .addr()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &port]);
    wait_replica_linked(&replica).await;
    let proxy = Proxy::start_with(shared_config(&master)).await;
    let direct_addr = master.addr().parse().expect("address");
    // Writes acknowledged by the replica before it stops: its offset is past 0.
    let mut warm = Raw::connect(direct_addr).await;
    warm.send(&cmd(&["SET", "wait:warm", "1"])).await;
    warm.expect(b"+OK\r\n").await;
    warm.send(&cmd(&["WAIT", "1", "5000"])).await;
    warm.expect(b":1\r\n").await;

    support::signal(replica.pid(), "STOP");
    // Writes of each kind, each followed by a read that goes through the shared
    // connection: a plain SET, a script's write (no WRITE flag on EVAL), and a write
    // inside a transaction, whose own link is released when the session goes back to
    // the shared connection.
    let cases: &[&[&[&str]]] = &[
        &[&["SET", "wait:k", "v"], &["GET", "wait:k"]],
        &[
            &[
                "EVAL",
                "return redis.call('SET', KEYS[1], 'v')",
                "1",
                "wait:e",
            ],
            &["GET", "wait:e"],
        ],
        &[
            &["MULTI"],
            &["SET", "wait:m", "v"],
            &["EXEC"],
            &["GET", "wait:m"],
        ],
    ];
    for case in cases {
        let mut answers = Vec::new();
        for addr in [direct_addr, proxy.addr] {
            let mut c = Raw::connect(addr).await;
            let mut writes = Vec::new();
            for args in *case {
                writes.extend(cmd(args));
            }
            writes.extend(cmd(&["ECHO", "written"]));
            c.send(&writes).await;
            let seen = c.read_until(b"$7\r\nwritten\r\n").await;
            assert!(!seen.contains(&b'-'), "{case:?}: {seen:?}");
            c.send(&cmd(&["WAIT", "1", "300"])).await;
            answers.push(String::from_utf8(c.read_to_line().await).expect("utf-8"));
            // And after it, on the link the session keeps: a write then WAIT again.
            c.send(&cmd(&["SET", "wait:k", "w"])).await;
            c.expect(b"+OK\r\n").await;
            c.send(&cmd(&["WAIT", "1", "300"])).await;
            answers.push(String::from_utf8(c.read_to_line().await).expect("utf-8"));
        }
        assert_eq!(
            answers[..2],
            answers[2..],
            "{case:?}: direct, then through the proxy"
        );
        assert_eq!(answers[0], ":0\r\n", "{case:?}");
    }
    support::signal(replica.pid(), "CONT");
}

/// Inside MULTI, WAIT is only queued: nothing may be added to the transaction (the
/// offset bump would be an extra element in EXEC's array).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_inside_multi_after_shared_writes_answers_as_redis() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(shared_config(&redis)).await;
    let mut seen = Vec::new();
    for addr in [redis.addr().parse().expect("address"), proxy.addr] {
        let mut c = Raw::connect(addr).await;
        let mut bytes = Vec::new();
        for args in [
            &["SET", "wm:k", "1"][..],
            &["GET", "wm:k"],
            &["MULTI"],
            &["WAIT", "0", "0"],
            &["INCR", "wm:k"],
            &["EXEC"],
            &["ECHO", "end"],
        ] {
            bytes.extend(cmd(args));
        }
        c.send(&bytes).await;
        seen.push(c.read_until(b"$3\r\nend\r\n").await);
    }
    assert_eq!(
        String::from_utf8_lossy(&seen[1]),
        String::from_utf8_lossy(&seen[0])
    );
    assert!(seen[0].ends_with(b"*2\r\n:0\r\n:2\r\n$3\r\nend\r\n"));
}

/// One pipeline whose answers mix plain replies, Redis's errors, the proxy's own answer
/// (an unknown command) and big values reaches the client byte for byte as it comes
/// from Redis directly. Over a shared connection a session's replies
/// arrive as one run: plain ones are copied as ranges, the rest one by one, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_pipeline_over_a_shared_connection_reads_as_from_redis() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(shared_config(&redis)).await;
    let big = "b".repeat(5_000);
    let mut pipeline = Vec::new();
    for round in 0..6 {
        let key = format!("mixed:{round}");
        let big_key = format!("mixed:{round}:big");
        pipeline.extend(cmd(&["SET", &key, "1"]));
        pipeline.extend(cmd(&["GET", &key]));
        pipeline.extend(cmd(&["LPUSH", &key, "x"]));
        pipeline.extend(cmd(&["INCR"]));
        pipeline.extend(cmd(&["NOSUCHCMD", &key]));
        pipeline.extend(cmd(&["SET", &big_key, &big]));
        pipeline.extend(cmd(&["GET", &big_key]));
        pipeline.extend(cmd(&["GET", &big_key]));
        pipeline.extend(cmd(&["INCR", &key]));
        pipeline.extend(cmd(&["NOSUCHCMD"]));
        pipeline.extend(cmd(&["ECHO", &key]));
    }
    pipeline.extend(cmd(&["ECHO", "mixed:end"]));
    let marker = bulk("mixed:end");

    let redis_addr = redis.addr().parse().expect("redis address");
    let mut direct = Raw::connect(redis_addr).await;
    direct.send(&pipeline).await;
    let want = direct.read_until(marker.as_bytes()).await;
    assert!(
        want.windows(10).any(|w| w == b"-WRONGTYPE"),
        "{}",
        String::from_utf8_lossy(&want)
    );
    assert!(want.windows(20).any(|w| w == b"-ERR unknown command"));

    for _ in 0..3 {
        let mut c = proxy.raw().await;
        c.send(&pipeline).await;
        c.expect(&want).await;
    }
}
