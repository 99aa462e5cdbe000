//! Shadow mode (`protection.mode = "shadow"`), with the proxy binary: every command the
//! policy would refuse reaches Redis, so Redis's state changes exactly as it does for the
//! same commands sent directly to a twin redis-server; each would-be refusal is a WARN
//! line and a `refused_commands_total{mode="shadow"}` count; the startup log and
//! `/topology` say that protection is not enforced.

mod support;

use support::{http_get, resp, ProxyProcess, Raw, RedisServer};

/// Commands in order: (argv, would the default policy refuse it, the table name counted).
fn script() -> Vec<(Vec<&'static str>, Option<&'static str>)> {
    vec![
        (vec!["SET", "k1", "v1"], None),
        (vec!["RPUSH", "list", "a", "b", "c"], None),
        (
            vec!["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
            Some("config|set"),
        ),
        (
            vec!["CONFIG", "GET", "maxmemory-policy"],
            Some("config|get"),
        ),
        (
            vec!["ACL", "SETUSER", "shadowuser", "on", ">pw", "~*", "+get"],
            Some("acl|setuser"),
        ),
        (vec!["SWAPDB", "0", "1"], Some("swapdb")),
        (vec!["SET", "k2", "v2"], None),
        (vec!["SWAPDB", "0", "1"], Some("swapdb")),
        (vec!["SLOWLOG", "RESET"], Some("slowlog|reset")),
        (vec!["REPLICAOF", "NO", "ONE"], Some("replicaof")),
        (vec!["CLIENT", "NO-EVICT", "on"], Some("client|no-evict")),
        (vec!["FLUSHDB"], Some("flushdb")),
        (vec!["SET", "k3", "v3"], None),
        (vec!["NOSUCHCOMMAND", "x"], Some("unknown")),
        (vec!["CONFIG", "NOSUCHSUB"], Some("unknown")),
        (vec!["GET", "k3"], None),
    ]
}

async fn send_all(c: &mut Raw) -> Vec<Vec<u8>> {
    let mut replies = Vec::new();
    for (args, _) in script() {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        c.send(&resp(&args)).await;
        c.send(b"PING\r\n").await;
        let mut r = c.read_until(b"+PONG\r\n").await;
        r.truncate(r.len() - 7);
        replies.push(r);
    }
    replies
}

/// What a client of Redis can observe of the state these commands touch.
async fn state(r: &RedisServer) -> Vec<String> {
    let mut c = Raw::connect(r.addr().parse().expect("addr")).await;
    let mut out = Vec::new();
    for args in [
        &["CONFIG", "GET", "maxmemory-policy"][..],
        &["ACL", "LIST"],
        &["DBSIZE"],
        &["KEYS", "*"],
        &["SELECT", "1"],
        &["DBSIZE"],
        &["KEYS", "*"],
    ] {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        c.send(&resp(&args)).await;
        c.send(b"PING\r\n").await;
        let r = c.read_until(b"+PONG\r\n").await;
        let mut lines: Vec<String> = String::from_utf8_lossy(&r)
            .split("\r\n")
            .map(str::to_string)
            .collect();
        // KEYS order is not defined: compare as a set.
        lines.sort();
        out.push(format!("{args:?}: {lines:?}"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_forwards_logs_and_counts_what_it_would_refuse() {
    let direct_redis = RedisServer::start(&[]);
    let proxied_redis = RedisServer::start(&[]);
    let proxy = ProxyProcess::start(&proxied_redis, "[protection]\nmode = \"shadow\"\n").await;

    // Loud at startup and in /topology.
    let log = proxy.log();
    assert!(
        log.contains("PROTECTION NOT ENFORCED"),
        "startup log: {log}"
    );
    let (status, topo) = http_get(proxy.admin_port, "/topology")
        .await
        .expect("/topology");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&topo).expect("json");
    assert_eq!(v["protection_mode"], "shadow", "{topo}");
    assert_eq!(v["protection_enforced"], false, "{topo}");
    assert!(
        v["protection_warning"]
            .as_str()
            .is_some_and(|w| w.contains("NOT ENFORCED")),
        "{topo}"
    );

    let mut direct = Raw::connect(direct_redis.addr().parse().expect("addr")).await;
    let mut proxied = proxy.raw().await;
    let want = send_all(&mut direct).await;
    let got = send_all(&mut proxied).await;
    for (((args, _), w), g) in script().iter().zip(&want).zip(&got) {
        assert_eq!(
            String::from_utf8_lossy(g),
            String::from_utf8_lossy(w),
            "{args:?}: reply through the shadow proxy differs from Redis's own"
        );
    }
    assert_eq!(
        state(&proxied_redis).await,
        state(&direct_redis).await,
        "Redis's state behind the shadow proxy differs from the same commands sent directly"
    );

    // Each would-be refusal: one WARN line and one count.
    let mut expected: std::collections::BTreeMap<&str, u32> = Default::default();
    for (_, refused) in script() {
        if let Some(name) = refused {
            *expected.entry(name).or_default() += 1;
        }
    }
    let metrics = proxy.metrics().await;
    for (name, n) in &expected {
        let series =
            format!("portcullis_refused_commands_total{{command=\"{name}\",mode=\"shadow\"}}");
        assert_eq!(
            proxy.metric(&series).await,
            f64::from(*n),
            "{series}\n{metrics}"
        );
        // Never counted as an enforced refusal.
        let enforced = format!("portcullis_refused_commands_total{{command=\"{name}\"}}");
        assert_eq!(proxy.metric(&enforced).await, 0.0, "{enforced}");
    }
    let log = proxy.log();
    let would: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("would refuse command") || l.contains("would refuse unknown"))
        .collect();
    assert_eq!(
        would.len(),
        expected.values().sum::<u32>() as usize,
        "one WARN line per would-be refusal:\n{log}"
    );
    for (name, n) in &expected {
        if *name == "unknown" {
            continue;
        }
        let lines = would
            .iter()
            .filter(|l| l.contains(&format!("command=\"{name}\"")))
            .count();
        assert_eq!(lines, *n as usize, "WARN lines for {name}:\n{log}");
    }
}

/// The default mode enforces: the same proxy binary without `mode` refuses, and says
/// so in `/topology`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_is_the_default_mode() {
    let redis = RedisServer::start(&[]);
    let proxy = ProxyProcess::start(&redis, "").await;
    assert!(!proxy.log().contains("PROTECTION NOT ENFORCED"));
    let (_, topo) = http_get(proxy.admin_port, "/topology")
        .await
        .expect("/topology");
    let v: serde_json::Value = serde_json::from_str(&topo).expect("json");
    assert_eq!(v["protection_mode"], "enforce", "{topo}");
    assert_eq!(v["protection_enforced"], true, "{topo}");
    let mut c = proxy.raw().await;
    c.send(&resp(&[
        b"CONFIG",
        b"SET",
        b"maxmemory-policy",
        b"allkeys-lru",
    ]))
    .await;
    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-NOPERM"),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
}
