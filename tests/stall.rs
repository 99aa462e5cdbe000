//! A slow master is not a lost master (issue 11): stalls Redis has in normal operation
//! (CLIENT PAUSE, DEBUG SLEEP, a busy script or function, SIGSTOP) are waits through the
//! proxy exactly as against Redis alone, compared byte for byte with the same client
//! talking to Redis directly; only silence past `probe.down_after` or evidence (a killed
//! master, a role change) ends the master. Real role changes during a stall still never
//! let a client see READONLY.
//!
//! The proxy runs as its own process (`ProxyProcess`): its `/topology` shows when the
//! prober has seen the stall, which is the event the tests wait for (never a fixed sleep).
//! The stall durations themselves (a 4 s pause, a 3 s SIGSTOP) are the scenario.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{http_get, resp, role, wait_until, ProxyProcess, Raw, RedisServer};

/// Probes in these tests: a stall is seen within 0.5 s; down_after stays the default 10 s.
/// Writes the proxy forwarded (counted once written to their backend link).
const WRITES_FORWARDED: &str = "portcullis_commands_total{class=\"write\",outcome=\"forwarded\"}";

const PROBES: &str = "[probe]\ninterval = \"200ms\"\ntimeout = \"300ms\"\n";

fn sock(r: &RedisServer) -> SocketAddr {
    r.addr().parse().expect("redis address")
}

fn show(replies: &[Vec<u8>]) -> Vec<String> {
    replies
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect()
}

/// One whole reply of a simple type (status, error, integer, bulk string).
async fn reply(c: &mut Raw) -> Vec<u8> {
    let mut line = c.read_to_line().await;
    if line.first() == Some(&b'$') {
        let len: i64 = std::str::from_utf8(&line[1..line.len() - 2])
            .ok()
            .and_then(|n| n.parse().ok())
            .expect("bulk length");
        if len >= 0 {
            line.extend(c.read_exact_len(len as usize + 2).await);
        }
    }
    line
}

/// `/topology` as JSON.
async fn topology(p: &ProxyProcess) -> serde_json::Value {
    match http_get(p.admin_port, "/topology").await {
        Some((200, body)) => serde_json::from_str(&body).expect("/topology JSON"),
        other => panic!("/topology: {other:?}"),
    }
}

/// `(state, evidence)` of backend `i` in `/topology`.
async fn state(p: &ProxyProcess, i: usize) -> (String, String) {
    let t = topology(p).await;
    let b = &t["backends"][i];
    (
        b["state"].as_str().unwrap_or("?").to_string(),
        b["evidence"].as_str().unwrap_or("").to_string(),
    )
}

/// Wait until backend `i` is in `wanted` state; returns its evidence.
async fn wait_state(p: &ProxyProcess, i: usize, wanted: &str) -> String {
    let deadline = tokio::time::Instant::now() + support::WAIT * 3;
    loop {
        let (s, evidence) = state(p, i).await;
        if s == wanted {
            return evidence;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend {i} never {wanted}: {s} ({evidence})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until `/topology` names `addr` as the confirmed master.
async fn wait_master(p: &ProxyProcess, addr: &str) {
    wait_until(&format!("{addr} confirmed master"), || async {
        topology(p).await["confirmed_master"].as_str() == Some(addr)
    })
    .await;
}

async fn ready(p: &ProxyProcess) -> u16 {
    http_get(p.admin_port, "/readyz")
        .await
        .map_or(0, |(s, _)| s)
}

/// Redis directly has stopped answering: a PING on a fresh connection gets no reply
/// within 300 ms (what the prober sees).
async fn wait_silent(r: &RedisServer) {
    wait_until("redis silent", || async {
        let mut c = Raw::connect(sock(r)).await;
        c.send(&resp(&[b"PING"])).await;
        tokio::time::timeout(Duration::from_millis(300), c.read_to_line())
            .await
            .is_err()
    })
    .await;
}

/// Redis directly answers `-BUSY` (a script or function runs past the threshold).
async fn wait_busy(r: &RedisServer) {
    wait_until("redis busy", || async {
        let mut c = Raw::connect(sock(r)).await;
        c.send(&resp(&[b"PING"])).await;
        c.read_to_line().await.starts_with(b"-BUSY")
    })
    .await;
}

#[derive(Clone, Copy, Debug)]
enum Stall {
    /// `CLIENT PAUSE 4000 ALL`.
    PauseAll,
    /// `CLIENT PAUSE 4000 WRITE` (ROLE and reads still answer).
    PauseWrite,
    /// `DEBUG SLEEP 3`.
    DebugSleep,
    /// SIGSTOP, SIGCONT 3 s later.
    Stop,
}

/// Start the stall on `r`; what keeps it going is returned (dropped at the end).
async fn begin(r: &RedisServer, stall: Stall) -> Option<Raw> {
    let mut c = Raw::connect(sock(r)).await;
    match stall {
        Stall::PauseAll | Stall::PauseWrite => {
            let mode: &[u8] = if matches!(stall, Stall::PauseAll) {
                b"ALL"
            } else {
                b"WRITE"
            };
            c.send(&resp(&[b"CLIENT", b"PAUSE", b"4000", mode])).await;
            c.expect(b"+OK\r\n").await;
            None
        }
        Stall::DebugSleep => {
            c.send(&resp(&[b"DEBUG", b"SLEEP", b"3"])).await;
            Some(c)
        }
        Stall::Stop => {
            let pid = r.pid();
            support::signal(pid, "STOP");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                support::signal(pid, "CONT");
            });
            None
        }
    }
}

/// The scenario: a stall starts; once it is visible, a client sends `SET st:k 1`
/// on an open connection and `GET st:k` on a new one. Returns both replies and how long
/// after the stall began they arrived. Through the proxy, also checks it stays ready.
async fn stall_then_write(
    target: SocketAddr,
    r: &RedisServer,
    stall: Stall,
    proxy: Option<&ProxyProcess>,
) -> (Vec<Vec<u8>>, Duration) {
    let mut a = Raw::connect(target).await;
    a.send(&resp(&[b"SET", b"st:k", b"0"])).await;
    a.expect(b"+OK\r\n").await;
    let began = Instant::now();
    let sleeper = begin(r, stall).await;
    if !matches!(stall, Stall::PauseWrite) {
        match proxy {
            Some(p) => {
                let evidence = wait_state(p, 0, "slow").await;
                assert!(evidence.contains("timed out"), "{evidence}");
                assert_eq!(ready(p).await, 200, "/readyz during a stall");
            }
            None => wait_silent(r).await,
        }
    }
    let forwarded_before = match proxy {
        Some(p) => p.metric(WRITES_FORWARDED).await,
        None => 0.0,
    };
    a.send(&resp(&[b"SET", b"st:k", b"1"])).await;
    if let Some(p) = proxy {
        // Redis takes a's SET before b's GET: a's bytes are in its socket before b even
        // connects. Through the proxy the same holds once a's session has written the
        // SET to its link; without this wait the two sessions race (on two runtime
        // threads, b's GET can be read and forwarded first: two clients' requests that
        // reach the proxy together keep no order between them).
        wait_until("a's SET forwarded", || async {
            p.metric(WRITES_FORWARDED).await > forwarded_before
        })
        .await;
    }
    let mut b = Raw::connect(target).await;
    b.send(&resp(&[b"GET", b"st:k"])).await;
    let replies = vec![reply(&mut a).await, reply(&mut b).await];
    let waited = began.elapsed();
    if let Some(mut s) = sleeper {
        s.expect(b"+OK\r\n").await;
    }
    (replies, waited)
}

async fn compare_stall(stall: Stall, redis_args: &[&str], at_least: Duration) {
    let redis = RedisServer::start(redis_args);
    let proxy = ProxyProcess::start(&redis, PROBES).await;
    let (direct, direct_took) = stall_then_write(sock(&redis), &redis, stall, None).await;
    let (proxied, proxied_took) = stall_then_write(proxy.addr, &redis, stall, Some(&proxy)).await;
    eprintln!(
        "{stall:?}: direct {:?} after {direct_took:?}; proxy {:?} after {proxied_took:?}",
        show(&direct),
        show(&proxied)
    );
    assert_eq!(show(&proxied), show(&direct), "{stall:?}: proxy vs direct");
    assert!(
        !proxied.iter().any(|r| r.starts_with(b"-")),
        "{stall:?}: {:?}",
        show(&proxied)
    );
    assert!(
        proxied_took >= at_least,
        "{stall:?}: answered before the stall ended"
    );
    // Back to confirmed after the stall, with the transitions logged.
    wait_state(&proxy, 0, "confirmed").await;
    if !matches!(stall, Stall::PauseWrite) {
        let log = proxy.log();
        assert!(
            log.contains("backend standing") && log.contains("slow"),
            "{log}"
        );
        let changes = proxy
            .metric(&format!(
                "portcullis_backend_state_changes_total{{backend=\"{}\",from=\"confirmed\",to=\"slow\"}}",
                redis.addr()
            ))
            .await;
        assert!(changes >= 1.0, "{}", proxy.metrics().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pause_all_is_a_wait_not_an_error() {
    compare_stall(Stall::PauseAll, &[], Duration::from_millis(3500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pause_write_is_a_wait_not_an_error() {
    compare_stall(Stall::PauseWrite, &[], Duration::from_millis(3500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_sleep_is_a_wait_not_an_error() {
    compare_stall(
        Stall::DebugSleep,
        &["--enable-debug-command", "yes"],
        Duration::from_millis(2500),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_for_3s_is_a_wait_not_an_error() {
    compare_stall(Stall::Stop, &[], Duration::from_millis(2500)).await;
}

#[derive(Clone, Copy, Debug)]
enum Busy {
    Script,
    Function,
}

/// Client A runs a script (or function) that never ends; once Redis answers `-BUSY`,
/// client B sends PING, then SCRIPT KILL (FUNCTION KILL). Returns B's two replies and A's.
async fn busy_then_kill(
    target: SocketAddr,
    r: &RedisServer,
    busy: Busy,
    proxy: Option<&ProxyProcess>,
) -> Vec<Vec<u8>> {
    let mut a = Raw::connect(target).await;
    a.send(&resp(&[b"PING"])).await;
    a.expect(b"+PONG\r\n").await;
    let (run, kill) = match busy {
        Busy::Script => (
            resp(&[b"EVAL", b"while true do end", b"0"]),
            resp(&[b"SCRIPT", b"KILL"]),
        ),
        Busy::Function => (
            resp(&[b"FCALL", b"spin", b"0"]),
            resp(&[b"FUNCTION", b"KILL"]),
        ),
    };
    a.send(&run).await;
    wait_busy(r).await;
    if let Some(p) = proxy {
        let evidence = wait_state(p, 0, "busy").await;
        assert!(evidence.contains("BUSY"), "{evidence}");
        assert_eq!(ready(p).await, 200, "/readyz while busy");
    }
    let mut b = Raw::connect(target).await;
    b.send(&resp(&[b"PING"])).await;
    let ping = reply(&mut b).await;
    b.send(&kill).await;
    let killed = reply(&mut b).await;
    vec![ping, killed, reply(&mut a).await]
}

async fn compare_busy(busy: Busy) {
    let redis = RedisServer::start(&["--busy-reply-threshold", "300"]);
    let mut c = redis.direct().await;
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(
            "#!lua name=spinlib\nredis.register_function('spin', function() while true do end end)",
        )
        .query_async(&mut c)
        .await
        .expect("FUNCTION LOAD");
    let proxy = ProxyProcess::start(&redis, PROBES).await;
    let direct = busy_then_kill(sock(&redis), &redis, busy, None).await;
    let proxied = busy_then_kill(proxy.addr, &redis, busy, Some(&proxy)).await;
    eprintln!(
        "{busy:?}: direct {:?}; proxy {:?}",
        show(&direct),
        show(&proxied)
    );
    assert_eq!(show(&proxied), show(&direct), "{busy:?}: proxy vs direct");
    assert!(proxied[0].starts_with(b"-BUSY"), "{:?}", show(&proxied));
    assert_eq!(proxied[1], b"+OK\r\n");
    wait_state(&proxy, 0, "confirmed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_script_is_killed_through_the_proxy() {
    compare_busy(Busy::Script).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_function_is_killed_through_the_proxy() {
    compare_busy(Busy::Function).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_stopped_past_down_after_is_down_then_recovers() {
    let redis = RedisServer::start(&[]);
    let proxy = ProxyProcess::start(
        &redis,
        "[probe]\ninterval = \"100ms\"\ntimeout = \"200ms\"\ndown_after = \"1500ms\"\n\
         [routing]\nfailover_wait = \"500ms\"\n",
    )
    .await;
    let mut a = proxy.raw().await;
    a.send(&resp(&[b"SET", b"st:k", b"0"])).await;
    a.expect(b"+OK\r\n").await;
    let stopped = Instant::now();
    support::signal(redis.pid(), "STOP");
    wait_state(&proxy, 0, "slow").await;
    // A write sent within the bound waits for the master, as against Redis alone.
    a.send(&resp(&[b"SET", b"st:k", b"1"])).await;
    let evidence = wait_state(&proxy, 0, "down").await;
    let down_after = stopped.elapsed();
    eprintln!("stopped master down after {down_after:?}: {evidence}");
    assert!(evidence.contains("silent for"), "{evidence}");
    assert!(down_after >= Duration::from_millis(1200), "{down_after:?}");
    assert_eq!(ready(&proxy).await, 503, "/readyz past down_after");
    // Past the bound, new requests get MASTERDOWN (never READONLY).
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"SET", b"st:other", b"1"])).await;
    let refused = c.read_to_line().await;
    assert!(
        refused.starts_with(b"-MASTERDOWN"),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    support::signal(redis.pid(), "CONT");
    // The write in flight lands once Redis runs again; writes resume.
    a.expect(b"+OK\r\n").await;
    wait_state(&proxy, 0, "confirmed").await;
    let mut d = proxy.raw().await;
    d.send(&resp(&[b"SET", b"st:k", b"2"])).await;
    d.expect(b"+OK\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_master_is_down_at_once() {
    let mut redis = RedisServer::start(&[]);
    let proxy = ProxyProcess::start(&redis, PROBES).await;
    let killed = Instant::now();
    redis.kill();
    let evidence = wait_state(&proxy, 0, "down").await;
    let took = killed.elapsed();
    eprintln!("killed master down after {took:?}: {evidence}");
    // Evidence, not a bound: one probe round (200 ms + 300 ms), with slack for load.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(!evidence.contains("silent for"), "{evidence}");
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"SET", b"k", b"1"])).await;
    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-MASTERDOWN"),
        "{}",
        String::from_utf8_lossy(&line)
    );
}

/// A master and a linked replica behind the proxy (backend 0 = master, 1 = replica).
async fn pair(master_args: &[&str]) -> (RedisServer, RedisServer, ProxyProcess) {
    let master = RedisServer::start(master_args);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    support::wait_replica_linked(&replica).await;
    let proxy = ProxyProcess::start(
        &master,
        &format!("{PROBES}[[backends]]\naddress = \"{}\"\n", replica.addr()),
    )
    .await;
    wait_state(&proxy, 1, "confirmed").await;
    (master, replica, proxy)
}

async fn direct_cmd(r: &RedisServer, args: &[&[u8]]) -> Vec<u8> {
    let mut c = Raw::connect(sock(r)).await;
    c.send(&resp(args)).await;
    reply(&mut c).await
}

/// A role change during a stall (REPLICAOF on the paused or sleeping master): the write
/// waiting on it is retried on the new master, never answered READONLY.
async fn replicaof_during(stall: Stall) {
    let args: &[&str] = match stall {
        Stall::DebugSleep => &["--enable-debug-command", "yes"],
        _ => &[],
    };
    let (master, replica, proxy) = pair(args).await;
    let mut a = proxy.raw().await;
    a.send(&resp(&[b"SET", b"sf:k", b"0"])).await;
    a.expect(b"+OK\r\n").await;
    let sleeper = begin(&master, stall).await;
    a.send(&resp(&[b"SET", b"sf:k", b"1"])).await;
    let changed = Instant::now();
    assert_eq!(
        direct_cmd(&replica, &[b"REPLICAOF", b"NO", b"ONE"]).await,
        b"+OK\r\n"
    );
    // Under PAUSE WRITE this runs at once; behind DEBUG SLEEP it waits its turn.
    let mut demote = Raw::connect(sock(&master)).await;
    demote
        .send(&resp(&[
            b"REPLICAOF",
            b"127.0.0.1",
            replica.port.to_string().as_bytes(),
        ]))
        .await;
    wait_master(&proxy, &replica.addr()).await;
    eprintln!(
        "{stall:?}: new master confirmed {:?} after the role change",
        changed.elapsed()
    );
    let got = reply(&mut a).await;
    assert_eq!(got, b"+OK\r\n", "{}", String::from_utf8_lossy(&got));
    demote.expect(b"+OK\r\n").await;
    if let Some(mut s) = sleeper {
        s.expect(b"+OK\r\n").await;
    }
    if matches!(stall, Stall::PauseWrite) {
        // REPLICAOF ran at once, so the paused SET met a replica: refused, retried on the
        // new master. (Behind DEBUG SLEEP the SET may run first, on the old master while
        // it still is one, and be lost in its resync: as it would be without the proxy.)
        assert_eq!(
            direct_cmd(&replica, &[b"GET", b"sf:k"]).await,
            b"$1\r\n1\r\n"
        );
    }
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"SET", b"sf:after", b"1"])).await;
    c.expect(b"+OK\r\n").await;
    assert_eq!(
        direct_cmd(&replica, &[b"GET", b"sf:after"]).await,
        b"$1\r\n1\r\n"
    );
    assert_eq!(role(&master).await, "slave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicaof_on_a_paused_master_never_shows_readonly() {
    replicaof_during(Stall::PauseWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicaof_behind_debug_sleep_never_shows_readonly() {
    replicaof_during(Stall::DebugSleep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_promoted_while_the_master_is_frozen_takes_the_writes() {
    let (master, replica, proxy) = pair(&[]).await;
    let mut a = proxy.raw().await;
    a.send(&resp(&[b"SET", b"fz:a", b"0"])).await;
    a.expect(b"+OK\r\n").await;
    support::signal(master.pid(), "STOP");
    wait_state(&proxy, 0, "slow").await;
    // In flight on the frozen master, as it would be against Redis alone.
    a.send(&resp(&[b"SET", b"fz:a", b"1"])).await;
    let promoted = Instant::now();
    assert_eq!(
        direct_cmd(&replica, &[b"REPLICAOF", b"NO", b"ONE"]).await,
        b"+OK\r\n"
    );
    wait_master(&proxy, &replica.addr()).await;
    let detected = promoted.elapsed();
    eprintln!("promotion while the master is frozen: writes move after {detected:?}");
    assert!(detected < Duration::from_secs(3), "{detected:?}");
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"SET", b"fz:c", b"1"])).await;
    c.expect(b"+OK\r\n").await;
    assert_eq!(
        direct_cmd(&replica, &[b"GET", b"fz:c"]).await,
        b"$1\r\n1\r\n"
    );
    // A failover tool demotes the old master; it takes the command once it runs again.
    let mut demote = Raw::connect(sock(&master)).await;
    demote
        .send(&resp(&[
            b"REPLICAOF",
            b"127.0.0.1",
            replica.port.to_string().as_bytes(),
        ]))
        .await;
    support::signal(master.pid(), "CONT");
    demote.expect(b"+OK\r\n").await;
    // The write that waited on the frozen master: applied there before the demotion, or
    // refused by it and retried on the new master. Never READONLY.
    let got = reply(&mut a).await;
    assert!(
        got == b"+OK\r\n" || got.starts_with(b"-MASTERDOWN"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    wait_state(&proxy, 0, "confirmed").await;
    wait_master(&proxy, &replica.addr()).await;
    let mut d = proxy.raw().await;
    d.send(&resp(&[b"SET", b"fz:d", b"1"])).await;
    d.expect(b"+OK\r\n").await;
    assert_eq!(
        direct_cmd(&replica, &[b"GET", b"fz:d"]).await,
        b"$1\r\n1\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_kill_reaches_a_busy_master_after_a_promotion() {
    let (master, replica, proxy) = pair(&["--busy-reply-threshold", "300"]).await;
    let mut a = proxy.raw().await;
    a.send(&resp(&[b"EVAL", b"while true do end", b"0"])).await;
    wait_busy(&master).await;
    wait_state(&proxy, 0, "busy").await;
    // The replica is promoted while the master runs the script: writes move to it.
    assert_eq!(
        direct_cmd(&replica, &[b"REPLICAOF", b"NO", b"ONE"]).await,
        b"+OK\r\n"
    );
    wait_master(&proxy, &replica.addr()).await;
    let mut c = proxy.raw().await;
    c.send(&resp(&[b"SET", b"bz:c", b"1"])).await;
    c.expect(b"+OK\r\n").await;
    // SCRIPT KILL still reaches the backend the script runs on.
    let mut b = proxy.raw().await;
    b.send(&resp(&[b"SCRIPT", b"KILL"])).await;
    b.expect(b"+OK\r\n").await;
    let killed = reply(&mut a).await;
    assert!(
        killed.starts_with(b"-ERR Script killed by user"),
        "{}",
        String::from_utf8_lossy(&killed)
    );
    // A failover tool demotes the old master; the session's next command goes to the
    // confirmed master again.
    assert_eq!(
        direct_cmd(
            &master,
            &[
                b"REPLICAOF",
                b"127.0.0.1",
                replica.port.to_string().as_bytes()
            ]
        )
        .await,
        b"+OK\r\n"
    );
    wait_state(&proxy, 0, "confirmed").await;
    wait_master(&proxy, &replica.addr()).await;
    b.send(&resp(&[b"SET", b"bz:b", b"1"])).await;
    b.expect(b"+OK\r\n").await;
    assert_eq!(
        direct_cmd(&replica, &[b"GET", b"bz:b"]).await,
        b"$1\r\n1\r\n"
    );
}
