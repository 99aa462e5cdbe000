//! Role tracking against real Redis processes: writes go only to a confirmed master, across
//! a hijack (REPLICAOF to an "attacker" Redis the test started on loopback), a promotion,
//! and a master restart. Clients may see MASTERDOWN during the window, never READONLY.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use portcullis::config::{BackendConfig, Config};
use redis::AsyncCommands;
use support::{cmdstat, role, wait_until, Proxy, RedisServer, WAIT};

async fn cmdstat_set_calls(r: &RedisServer) -> u64 {
    cmdstat(r, "set").await
}

const PROBE: Duration = Duration::from_millis(100);

/// One Prometheus recorder per test binary; counters are told apart by backend names.
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static H: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("recorder")
    })
}

fn config(backends: &[(&str, &RedisServer)], auto_heal: bool) -> Config {
    let mut c = Config {
        backends: backends
            .iter()
            .map(|(name, r)| BackendConfig {
                name: Some(name.to_string()),
                ..BackendConfig::from_address(r.addr())
            })
            .collect(),
        ..Config::default()
    };
    c.probe.interval = PROBE;
    c.probe.timeout = Duration::from_millis(500);
    c.routing.failover_wait = Duration::from_secs(2);
    c.protection.auto_heal = auto_heal;
    c
}

/// Promote `new` (REPLICAOF NO ONE) and make `old` its replica, straight on the servers.
async fn promote(new: &RedisServer, old: &RedisServer) {
    let mut dn = new.direct().await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut dn)
        .await
        .unwrap();
    let mut dold = old.direct().await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(new.port)
        .query_async(&mut dold)
        .await
        .unwrap();
}

/// Writes through the proxy until stopped; returns (ok, error codes seen).
fn writer(
    proxy_addr: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let mut c = support::client(&proxy_addr).await;
        let (mut ok, mut errors) = (0u64, Vec::new());
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let r: redis::RedisResult<()> = c.set(format!("w{i}"), i).await;
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    errors.push(e.code().unwrap_or("?").to_string() + " " + &e.to_string());
                    // An error may come back without ever yielding: let shutdown in.
                    tokio::task::yield_now().await;
                }
            }
        }
        (ok, errors)
    })
}

fn assert_no_readonly(errors: &[String]) {
    for e in errors {
        assert!(!e.contains("READONLY"), "client saw READONLY: {e}");
        assert!(e.starts_with("MASTERDOWN"), "unexpected error: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hijack_while_writing_is_detected_and_healed() {
    let metrics = prometheus();
    let master = RedisServer::start(&[]);
    let mp = master.port.to_string();
    let r1 = RedisServer::start(&["--replicaof", "127.0.0.1", &mp]);
    let r2 = RedisServer::start(&["--replicaof", "127.0.0.1", &mp]);
    let attacker = RedisServer::start(&[]);
    support::wait_replica_linked(&r1).await;
    support::wait_replica_linked(&r2).await;
    let proxy = Proxy::start_with(config(
        &[("hj-master", &master), ("hj-r1", &r1), ("hj-r2", &r2)],
        true,
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(proxy.addr.to_string(), stop.clone());
    // Let some writes land first (event: the key count grows).
    wait_until("writes flowing", || async {
        cmdstat_set_calls(&master).await > 50
    })
    .await;

    // The attack, straight to the backend (the proxy refuses it from clients).
    let mut direct = master.direct().await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(attacker.port)
        .query_async(&mut direct)
        .await
        .unwrap();

    // Detected: in the metrics, and healed back to master by the proxy.
    wait_until("hijack counted", || async {
        metrics
            .render()
            .lines()
            .any(|l| l.starts_with("portcullis_hijack_detections_total{backend=\"hj-master\"}"))
    })
    .await;
    wait_until("healed to master", || async {
        role(&master).await == "master"
    })
    .await;
    // Writes flow again on the real master.
    let before = cmdstat_set_calls(&master).await;
    wait_until("writes flow after heal", || async {
        cmdstat_set_calls(&master).await > before + 20
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = w.await.unwrap();
    assert!(ok > 70, "{ok} writes succeeded");
    assert_no_readonly(&errors);
    assert_eq!(
        cmdstat_set_calls(&attacker).await,
        0,
        "the attacker got writes from the proxy"
    );
    // The replicas only ever saw the proxy's probes (ROLE), never a client command:
    // every client connection on them, except their master link, last ran ROLE.
    for r in [&r1, &r2] {
        let mut d = r.direct().await;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut d)
            .await
            .unwrap();
        for line in list.lines() {
            let master_link = line.contains("flags=M");
            let this_query = line.contains("cmd=client");
            assert!(
                master_link || this_query || line.contains("cmd=role") || line.contains("cmd=NULL"),
                "a replica served a client command: {line}"
            );
        }
    }
    let text = metrics.render();
    assert!(
        text.contains("portcullis_auto_heals_total{backend=\"hj-master\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hijack_without_auto_heal_answers_masterdown() {
    let master = RedisServer::start(&[]);
    let attacker = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config(&[("nh-master", &master)], false)).await;
    let mut c = proxy.client().await;
    let _: () = c.set("before", 1).await.unwrap();
    let mut direct = master.direct().await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(attacker.port)
        .query_async(&mut direct)
        .await
        .unwrap();
    // The next write gets MASTERDOWN naming the foreign master, never READONLY.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        match c.set::<_, _, ()>("after", 1).await {
            Err(e) if e.code() == Some("MASTERDOWN") => break e.to_string(),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(()) => assert!(tokio::time::Instant::now() < deadline, "never refused"),
        }
    };
    assert!(
        text.contains(&format!("127.0.0.1:{}", attacker.port)),
        "{text}"
    );
    assert!(
        !text.contains("READONLY ") || text.contains("MASTERDOWN"),
        "{text}"
    );
    assert_eq!(cmdstat_set_calls(&attacker).await, 0);
    // Still a replica: nothing healed it.
    assert_eq!(role(&master).await, "slave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_moves_writes_to_the_new_master() {
    let metrics = prometheus();
    let old = RedisServer::start(&[]);
    let new = RedisServer::start(&["--replicaof", "127.0.0.1", &old.port.to_string()]);
    support::wait_replica_linked(&new).await;
    let proxy = Proxy::start_with(config(&[("pm-old", &old), ("pm-new", &new)], false)).await;
    // A session with state (db 3, a name) that must survive the move.
    let mut stateful = proxy.raw().await;
    stateful
        .send(
            &[
                support::resp(&[b"SELECT", b"3"]),
                support::resp(&[b"CLIENT", b"SETNAME", b"kept"]),
                support::resp(&[b"SET", b"in3", b"before"]),
            ]
            .concat(),
        )
        .await;
    stateful.expect(b"+OK\r\n+OK\r\n+OK\r\n").await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(proxy.addr.to_string(), stop.clone());
    wait_until("writes flowing", || async {
        cmdstat_set_calls(&old).await > 50
    })
    .await;

    // Promote: new becomes master, old becomes its replica.
    promote(&new, &old).await;
    let before = cmdstat_set_calls(&new).await;
    wait_until("writes reach the new master", || async {
        cmdstat_set_calls(&new).await > before + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = w.await.unwrap();
    assert!(ok > 100);
    assert_no_readonly(&errors);
    // The stateful session moved with its state replayed: db 3 and its name, on the new
    // master.
    stateful
        .send(
            &[
                support::resp(&[b"SET", b"in3", b"after"]),
                support::resp(&[b"CLIENT", b"GETNAME"]),
            ]
            .concat(),
        )
        .await;
    stateful.expect(b"+OK\r\n$4\r\nkept\r\n").await;
    let mut new3 = support::client(&format!("{}/3", new.addr())).await;
    let v: String = new3.get("in3").await.unwrap();
    assert_eq!(v, "after");
    // Operators see both role changes.
    wait_until("role changes counted", || async {
        let text = metrics.render();
        text.contains(
            "portcullis_role_changes_total{backend=\"pm-old\",from=\"master\",to=\"replica\"}",
        ) && text.contains(
            "portcullis_role_changes_total{backend=\"pm-new\",from=\"replica\",to=\"master\"}",
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_and_restarted() {
    let mut master = RedisServer::start(&[]);
    let port = master.port;
    let proxy = Proxy::start_with(config(&[("kr-master", &master)], false)).await;
    let mut c = proxy.client().await;
    let _: () = c.set("k", 1).await.unwrap();
    master.kill();
    // While it is down: MASTERDOWN (or a lost-connection error for an in-flight write).
    let r: redis::RedisResult<()> = c.set("k", 2).await;
    let e = r.expect_err("no master");
    assert!(
        e.code() == Some("MASTERDOWN") || e.to_string().contains("lost the connection"),
        "{e}"
    );
    // Restart on the same port: the proxy confirms it again and writes recover.
    let restarted = RedisServer::start_on(port, &[]);
    wait_until("writes recover", || {
        let mut c = c.clone();
        async move { c.set::<_, _, ()>("k", 3).await.is_ok() }
    })
    .await;
    let mut d = restarted.direct().await;
    let v: i64 = d.get("k").await.unwrap();
    assert_eq!(v, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_replica_reads_hit_the_replica_in_order() {
    let master = RedisServer::start(&[]);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    support::wait_replica_linked(&replica).await;
    let mut direct = master.direct().await;
    for i in 0..100 {
        let _: () = direct.set(format!("k{i}"), i).await.unwrap();
    }
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(acked, 1);
    let mut cfg = config(&[("rr-master", &master), ("rr-replica", &replica)], false);
    cfg.routing.reads = portcullis::config::ReadPolicy::PreferReplica;
    let proxy = Proxy::start_with(cfg).await;
    // Wait until the proxy knows the replica (its probe), by the metric-free route:
    // a read that lands on the replica.
    let mut c = proxy.client().await;
    wait_until("replica confirmed for reads", || {
        let mut c = c.clone();
        let replica = &replica;
        async move {
            let _: Option<i64> = c.get("k0").await.unwrap();
            cmdstat(replica, "get").await > 0
        }
    })
    .await;
    let gets_on_master = cmdstat(&master, "get").await;
    // A pipelined mix of reads (replica) and writes (master) keeps reply order.
    let mut pipe = redis::pipe();
    for i in 0..100 {
        pipe.cmd("GET").arg(format!("k{i}"));
        pipe.cmd("INCR").arg(format!("c{i}"));
        pipe.cmd("STRLEN").arg(format!("k{i}"));
    }
    let replies: Vec<i64> = pipe.query_async(&mut c).await.unwrap();
    for i in 0..100 {
        assert_eq!(replies[3 * i], i as i64, "GET k{i}");
        assert_eq!(replies[3 * i + 1], 1, "INCR c{i}");
        assert_eq!(
            replies[3 * i + 2],
            i.to_string().len() as i64,
            "STRLEN k{i}"
        );
    }
    assert!(cmdstat(&replica, "get").await >= 101);
    assert_eq!(
        cmdstat(&master, "get").await,
        gets_on_master,
        "reads went to the master"
    );
    assert_eq!(cmdstat(&master, "incr").await, 100);
    assert_eq!(cmdstat(&replica, "strlen").await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_across_a_failover_is_aborted_not_split() {
    let old = RedisServer::start(&[]);
    let new = RedisServer::start(&["--replicaof", "127.0.0.1", &old.port.to_string()]);
    support::wait_replica_linked(&new).await;
    let proxy = Proxy::start_with(config(&[("tx-old", &old), ("tx-new", &new)], false)).await;
    let mut tx = proxy.raw().await;
    tx.send(
        &[
            support::resp(&[b"MULTI"]),
            support::resp(&[b"SET", b"half", b"1"]),
        ]
        .concat(),
    )
    .await;
    tx.expect(b"+OK\r\n+QUEUED\r\n").await;

    // Promote the replica while the transaction is open.
    promote(&new, &old).await;
    // Wait until the proxy routes writes to the new master (another client's write lands).
    let mut other = proxy.client().await;
    wait_until("proxy follows the promotion", || {
        let mut other = other.clone();
        let new = &new;
        async move {
            other.set::<_, _, ()>("probe", "x").await.is_ok() && {
                let mut d = new.direct().await;
                d.get::<_, Option<String>>("probe")
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            }
        }
    })
    .await;
    let _ = &mut other;

    // The open transaction cannot continue on either side: MASTERDOWN, then EXECABORT.
    tx.send(
        &[
            support::resp(&[b"SET", b"other-half", b"2"]),
            support::resp(&[b"EXEC"]),
        ]
        .concat(),
    )
    .await;
    let line = tx.read_to_line().await;
    assert!(
        line.starts_with(b"-MASTERDOWN"),
        "{}",
        String::from_utf8_lossy(&line)
    );
    tx.expect(b"-EXECABORT Transaction discarded because of previous errors.\r\n")
        .await;
    // Nothing of it was applied anywhere.
    for r in [&old, &new] {
        let mut d = r.direct().await;
        let half: Option<String> = d.get("half").await.unwrap();
        let other_half: Option<String> = d.get("other-half").await.unwrap();
        assert_eq!((half, other_half), (None, None));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_session_follows_a_master_change() {
    let old = RedisServer::start(&[]);
    let new = RedisServer::start(&["--replicaof", "127.0.0.1", &old.port.to_string()]);
    support::wait_replica_linked(&new).await;
    let proxy = Proxy::start_with(config(&[("ro-old", &old), ("ro-new", &new)], false)).await;
    // A bulk loader: replies off, writes flowing to the old master.
    let mut loader = proxy.raw().await;
    loader
        .send(
            &[
                support::resp(&[b"CLIENT", b"REPLY", b"OFF"]),
                support::resp(&[b"SET", b"off:1", b"v"]),
            ]
            .concat(),
        )
        .await;
    wait_until("the first write lands", || async {
        old.has_key("off:1").await
    })
    .await;
    promote(&new, &old).await;
    // Wait until the proxy routes to the new master (a fresh client's write lands there).
    let probe = proxy.client().await;
    wait_until("the proxy follows the promotion", || async {
        let mut probe = probe.clone();
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg("off:probe")
            .arg("v")
            .query_async(&mut probe)
            .await;
        r.is_ok() && new.has_key("off:probe").await
    })
    .await;
    // The proxy owns CLIENT REPLY (Redis always answers it, the proxy drops what Redis
    // would not have sent), so the session moves to the new master with its mode intact:
    // the write lands there, unanswered, and the connection stays open in the same mode.
    loader.send(&support::resp(&[b"SET", b"off:2", b"v"])).await;
    wait_until("the next write lands on the new master", || async {
        new.has_key("off:2").await
    })
    .await;
    loader
        .send(
            &[
                support::resp(&[b"PING"]),
                support::resp(&[b"CLIENT", b"REPLY", b"ON"]),
                support::resp(&[b"EXISTS", b"off:2"]),
            ]
            .concat(),
        )
        .await;
    loader.expect(b"+OK\r\n:1\r\n").await;
}

/// Redis does not replicate its script cache: after a promotion, the new master answers
/// NOSCRIPT for a script loaded through the proxy on the old one. The proxy remembers the
/// body, loads it on the new master unseen and runs the EVALSHA again: the client sees
/// what one Redis that never failed over answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evalsha_after_a_promotion_finds_its_script() {
    let old = RedisServer::start(&[]);
    let new = RedisServer::start(&["--replicaof", "127.0.0.1", &old.port.to_string()]);
    support::wait_replica_linked(&new).await;
    let proxy = Proxy::start_with(config(&[("sc-old", &old), ("sc-new", &new)], false)).await;
    let mut c = proxy.raw().await;
    let body = "return redis.call('GET', KEYS[1])";
    let sha = redis::Script::new(body).get_hash().to_string();
    c.send(&support::resp(&[b"SCRIPT", b"LOAD", body.as_bytes()]))
        .await;
    c.expect(format!("$40\r\n{sha}\r\n").as_bytes()).await;
    let setter = "return redis.call('SET', KEYS[1], 'a')";
    let setter_sha = redis::Script::new(setter).get_hash().to_string();
    c.send(&support::resp(&[b"SCRIPT", b"LOAD", setter.as_bytes()]))
        .await;
    c.expect(format!("$40\r\n{setter_sha}\r\n").as_bytes())
        .await;
    promote(&new, &old).await;
    let addr = proxy.addr.to_string();
    wait_until("writes reach the new master", || {
        let addr = addr.clone();
        let new = &new;
        async move {
            let mut w = support::client(&addr).await;
            let r: redis::RedisResult<()> = w.set("sc:key", "v").await;
            r.is_ok() && new.has_key("sc:key").await
        }
    })
    .await;
    c.send(&support::resp(&[
        b"EVALSHA",
        sha.as_bytes(),
        b"1",
        b"sc:key",
    ]))
    .await;
    c.expect(b"$1\r\nv\r\n").await;
    // A request pipelined behind an EVALSHA the new master lacks would run before a
    // retry: the proxy passes NOSCRIPT on instead, and the SET after it wins, as the
    // order the client sent them says.
    c.send(
        &[
            support::resp(&[b"EVALSHA", setter_sha.as_bytes(), b"1", b"sc:order"]),
            support::resp(&[b"SET", b"sc:order", b"b"]),
            support::resp(&[b"GET", b"sc:order"]),
        ]
        .concat(),
    )
    .await;
    c.expect(b"-NOSCRIPT No matching script. Please use EVAL.\r\n+OK\r\n$1\r\nb\r\n")
        .await;
}
