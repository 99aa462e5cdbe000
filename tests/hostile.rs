//! Hostile clients against a real redis-server: slow senders that dribble a frame
//! (`limits.frame_timeout`), ten thousand idle and half-open connections, a client that
//! pipelines without reading, and a client whose replies it never reads. Each one must cost
//! the proxy bounded memory and lose no other client anything.
//!
//! The slow-sender tests run the proxy in-process. The others run the binary as a child
//! process: its resident memory is measured on its own, and ten thousand connections need
//! two descriptors each in an in-process proxy, over this machine's limit of 20,000.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis::config::{BackendConfig, Config, Limits};
use support::{resp, Proxy, ProxyProcess, Raw, RedisServer, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;
/// The frame timeout of the slow-sender tests.
const FRAME_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a slow sender sends its next byte.
const DRIBBLE: Duration = Duration::from_millis(200);
/// The start of a frame that needs 1,000 payload bytes: dribbling cannot complete it.
const SLOW_START: &[u8] = b"*2\r\n$4\r\nECHO\r\n$1000\r\nPI";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn config_with(redis: &RedisServer, limits: Limits) -> Config {
    Config {
        backends: vec![BackendConfig::from_address(redis.addr())],
        limits,
        ..Config::default()
    }
}

fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

async fn ping(raw: &mut Raw) {
    raw.send(b"PING\r\n").await;
    raw.expect(b"+PONG\r\n").await;
}

/// SET then GET a key of its own on `raw`.
async fn set_get(raw: &mut Raw, key: &str, value: &str) {
    raw.send(&resp(&[b"SET", key.as_bytes(), value.as_bytes()]))
        .await;
    raw.expect(b"+OK\r\n").await;
    raw.send(&resp(&[b"GET", key.as_bytes()])).await;
    raw.expect(format!("${}\r\n{value}\r\n", value.len()).as_bytes())
        .await;
}

/// PING, SET, GET on a new connection, each answered within `bound`.
async fn fresh_client_served(addr: SocketAddr, tag: &str, bound: Duration) {
    let start = Instant::now();
    let mut c = Raw::connect(addr).await;
    ping(&mut c).await;
    set_get(&mut c, &format!("fresh:{tag}"), tag).await;
    let took = start.elapsed();
    assert!(
        took < bound,
        "fresh client ({tag}): PING/SET/GET took {took:?}"
    );
}

/// The socket was closed by the proxy with nothing sent: EOF or a reset.
async fn closed_without_reply(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
        Err(_) => panic!("{what}: not closed"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: got {:?} instead of a close", show(&buf[..n])),
    }
}

/// Dribble one byte every `DRIBBLE` after `SLOW_START` until the proxy closes the
/// connection; returns (time from the first byte to the close, bytes dribbled). Fails
/// if a reply arrives or nothing closes within `limit`.
async fn dribble_until_closed(slow: &mut Raw, limit: Duration) -> (Duration, usize) {
    let start = Instant::now();
    slow.send(SLOW_START).await;
    let mut dribbled = 0;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(DRIBBLE, slow.stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return (start.elapsed(), dribbled),
            Ok(Ok(n)) => panic!("the slow sender got a reply: {:?}", show(&buf[..n])),
        }
        assert!(
            start.elapsed() < limit,
            "slow sender still connected after {:?} ({dribbled} bytes dribbled)",
            start.elapsed()
        );
        if slow.stream.write_all(b"x").await.is_err() {
            return (start.elapsed(), dribbled);
        }
        dribbled += 1;
    }
}

/// Read exactly `expected.len()` bytes and compare; the first difference is reported.
async fn expect_stream<R: AsyncReadExt + Unpin>(stream: &mut R, expected: &[u8], what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    let mut chunk = vec![0u8; 256 * 1024];
    let mut at = 0;
    while at < expected.len() {
        let want = (expected.len() - at).min(chunk.len());
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Err(_) => panic!("{what}: timed out after {at} of {} bytes", expected.len()),
            Ok(Ok(0)) => panic!("{what}: closed after {at} of {} bytes", expected.len()),
            Ok(Err(e)) => panic!("{what}: {e} after {at} bytes"),
            Ok(Ok(n)) => n,
        };
        if chunk[..n] != expected[at..at + n] {
            let i = (0..n).find(|&i| chunk[i] != expected[at + i]).unwrap_or(0);
            let from = (at + i).saturating_sub(40);
            panic!(
                "{what}: differs at byte {}: expected {:?}, got {:?}",
                at + i,
                show(&expected[from..(at + i + 40).min(expected.len())]),
                show(&chunk[i.saturating_sub(40)..(i + 40).min(n)])
            );
        }
        at += n;
    }
}

/// Wait until `f` holds, polling every 20 ms, for at most `WAIT`.
async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Largest RSS seen over `samples` readings 50 ms apart (the flood is in its steady state).
async fn peak_rss(proxy: &ProxyProcess, samples: usize) -> u64 {
    let mut peak = 0;
    for _ in 0..samples {
        peak = peak.max(proxy.rss());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak
}

/// Wait until the proxy stops reading (the `bytes_in` counter holds still over 200 ms);
/// returns the counter's value then.
async fn reading_stopped(proxy: &ProxyProcess, bytes_in: &str) -> f64 {
    let mut last = -1.0;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = proxy.metric(bytes_in).await;
        if now == last {
            return now;
        }
        last = now;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy never stopped reading"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sum of `omem=` (reply bytes Redis holds for clients that do not read) over `CLIENT LIST`.
async fn redis_output_buffers(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(c)
        .await
        .expect("CLIENT LIST");
    list.split_whitespace()
        .filter_map(|f| f.strip_prefix("omem="))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

// ---------------------------------------------------------------------------------------
// 1. Slow senders (limits.frame_timeout)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sender_is_closed_after_frame_timeout_others_are_served() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config_with(
        &redis,
        Limits {
            frame_timeout: FRAME_TIMEOUT,
            ..Limits::default()
        },
    ))
    .await;
    let mut bystander = proxy.raw().await;
    set_get(&mut bystander, "bystander", "0").await;
    let mut idle = proxy.raw().await;
    ping(&mut idle).await;
    let idle_since = Instant::now();

    // The slowloris sender, on its own task.
    let mut slow = proxy.raw().await;
    let slow_task =
        tokio::spawn(async move { dribble_until_closed(&mut slow, FRAME_TIMEOUT + WAIT).await });

    // A client whose frames each arrive in three pieces 100 ms apart: every frame is
    // complete well within the timeout, all six take longer than it.
    let mut punctual = proxy.raw().await;
    let punctual_task = tokio::spawn(async move {
        let start = Instant::now();
        for i in 0..6 {
            let frame = resp(&[b"SET", format!("punctual:{i}").as_bytes(), b"on-time"]);
            let (a, rest) = frame.split_at(7);
            let (b, c) = rest.split_at(rest.len() / 2);
            for (n, piece) in [a, b, c].into_iter().enumerate() {
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                punctual.send(piece).await;
            }
            punctual.expect(b"+OK\r\n").await;
        }
        start.elapsed()
    });

    // The bystander works throughout.
    let mut rounds = 0;
    while !(slow_task.is_finished() && punctual_task.is_finished()) {
        rounds += 1;
        set_get(&mut bystander, "bystander", &rounds.to_string()).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (closed_after, dribbled) = slow_task.await.expect("slow sender task");
    let punctual_took = punctual_task.await.expect("punctual task");

    assert!(
        closed_after >= FRAME_TIMEOUT,
        "closed after {closed_after:?}, before the frame timeout"
    );
    // It kept sending until the end: no idle timeout would have caught it.
    assert!(dribbled >= 2, "only {dribbled} bytes dribbled");
    assert!(
        punctual_took > FRAME_TIMEOUT,
        "the punctual client took {punctual_took:?}"
    );
    assert!(rounds >= 5, "bystander did only {rounds} rounds");
    for i in 0..6 {
        let mut c = redis.direct().await;
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("punctual:{i}"))
            .query_async(&mut c)
            .await
            .expect("GET");
        assert_eq!(v.as_deref(), Some("on-time"), "punctual:{i}");
    }
    // No partial frame: the idle client outlived the frame timeout (idle_timeout is 0).
    assert!(idle_since.elapsed() > FRAME_TIMEOUT);
    ping(&mut idle).await;
    set_get(&mut bystander, "bystander", "last").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_timeout_0s_disables_it_and_a_reload_applies_it() {
    let redis = RedisServer::start(&[]);
    let idle_timeout = Duration::from_millis(800);
    // Well below the idle timeout, so a slow scheduler does not make the dribbler idle.
    let dribble = Duration::from_millis(100);
    let limits = |frame_timeout| Limits {
        frame_timeout,
        idle_timeout,
        ..Limits::default()
    };
    let proxy = Proxy::start_with(config_with(&redis, limits(Duration::ZERO))).await;
    let mut idle = proxy.raw().await;
    ping(&mut idle).await;

    // With frame_timeout = 0s, the idle timeout alone does not catch a dribbler: every
    // byte is activity. It survives two idle timeouts.
    let mut slow = proxy.raw().await;
    slow.send(SLOW_START).await;
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while start.elapsed() < idle_timeout * 2 {
        if let Ok(r) = tokio::time::timeout(dribble, slow.stream.read(&mut buf)).await {
            panic!("the dribbler was closed or answered without a frame timeout: {r:?}");
        }
        slow.stream.write_all(b"x").await.expect("dribble");
    }
    // The idle timeout is in force: the client that sent nothing was closed.
    closed_without_reply(&mut idle.stream, "idle client").await;

    // Reload with a frame timeout: the dribbler's frame is already older than it, so the
    // session closes at its next read.
    let generation = proxy
        .reload(config_with(&redis, limits(FRAME_TIMEOUT)))
        .await
        .expect("reload accepted");
    assert!(generation >= 1);
    let (closed_after, _) = dribble_until_closed_after_start(&mut slow).await;
    assert!(
        closed_after < WAIT,
        "closed {closed_after:?} after the reload"
    );
    // Others are still served.
    fresh_client_served(proxy.addr, "after-reload", WAIT).await;

    // A reload to an invalid value is refused and names the field.
    let err = proxy
        .reload(config_with(&redis, limits(Duration::from_millis(5))))
        .await
        .expect_err("5ms is refused");
    assert!(err.contains("limits.frame_timeout"), "{err}");
}

/// Keep dribbling on a connection whose frame has already started, until it closes.
async fn dribble_until_closed_after_start(slow: &mut Raw) -> (Duration, usize) {
    let start = Instant::now();
    let mut dribbled = 0;
    let mut buf = [0u8; 256];
    loop {
        if slow.stream.write_all(b"x").await.is_err() {
            return (start.elapsed(), dribbled);
        }
        dribbled += 1;
        match tokio::time::timeout(DRIBBLE, slow.stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return (start.elapsed(), dribbled),
            Ok(Ok(n)) => panic!("the slow sender got a reply: {:?}", show(&buf[..n])),
        }
        assert!(start.elapsed() < WAIT, "not closed after the reload");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Ten thousand idle and half-open connections
// ---------------------------------------------------------------------------------------

/// Idle connections opened (the proxy process has room: its limit is 20,000 descriptors
/// and it needs one per client; the test process holds the other ends).
const IDLE_CONNECTIONS: usize = 10_000;
/// Connections opened at once; then the test waits until the proxy has accepted them. The
/// listen backlog is 128 (tokio's and std's default): a bigger burst overflows it, and the
/// overflowing handshakes complete only after the kernel's SYN-ACK retransmits (1 s, 3 s..).
const CONNECT_BATCH: usize = 100;
/// Every this many idle connections, one sends the start of a frame and stops.
const HALF_OPEN_EVERY: usize = 10;
/// RSS the proxy may have with all of them open.
const IDLE_RSS_BOUND: u64 = 200 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_and_half_open_connections() {
    let redis = RedisServer::start(&[]);
    let frame_timeout = Duration::from_secs(4);
    let proxy = ProxyProcess::start(
        &redis,
        &format!(
            "[limits]\nmax_clients = {}\nframe_timeout = \"{}s\"\n",
            IDLE_CONNECTIONS + 100,
            frame_timeout.as_secs()
        ),
    )
    .await;
    let connections_gauge = "portcullis_client_connections";
    let connections = |n: usize| {
        let proxy = &proxy;
        async move { proxy.metric(connections_gauge).await == n as f64 }
    };
    fresh_client_served(proxy.addr, "before", WAIT).await;
    wait_for("the first client's session ended", || connections(0)).await;
    let rss_before = proxy.rss();

    let opening = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE_CONNECTIONS);
    while idle.len() < IDLE_CONNECTIONS {
        let batch = CONNECT_BATCH.min(IDLE_CONNECTIONS - idle.len());
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let addr = proxy.addr;
            set.spawn(async move { TcpStream::connect(addr).await });
        }
        while let Some(r) = set.join_next().await {
            idle.push(r.expect("connect task").expect("connect"));
        }
        wait_for("the proxy accepted the batch", || connections(idle.len())).await;
    }
    let opened_in = opening.elapsed();
    let rss_idle = proxy.rss();

    // Every tenth connection sends the start of a GET and stops: half-open frames.
    let half_open_started = Instant::now();
    let mut half_open = 0;
    for s in idle.iter_mut().step_by(HALF_OPEN_EVERY) {
        s.write_all(b"*2\r\n$3\r\nGET\r\n$5\r\nke")
            .await
            .expect("partial frame");
        half_open += 1;
    }
    // Sessions are doing nothing: a fresh client is served promptly.
    fresh_client_served(proxy.addr, "during", Duration::from_secs(2)).await;
    let rss_loaded = proxy.rss();
    let per_connection = rss_loaded.saturating_sub(rss_before) / IDLE_CONNECTIONS as u64;
    eprintln!(
        "{IDLE_CONNECTIONS} connections opened in {opened_in:?}; proxy RSS before {:.1} MiB, \
         idle {:.1} MiB, with {half_open} partial frames {:.1} MiB ({per_connection} bytes per connection)",
        mib(rss_before),
        mib(rss_idle),
        mib(rss_loaded)
    );
    assert!(
        rss_loaded < IDLE_RSS_BOUND,
        "proxy RSS {:.1} MiB with {IDLE_CONNECTIONS} idle connections",
        mib(rss_loaded)
    );
    assert!(
        half_open_started.elapsed() < frame_timeout,
        "the machine is too slow for this test's timing: measuring took {:?}",
        half_open_started.elapsed()
    );

    // The half-open ones are closed by the frame timeout, the idle ones are not.
    for (i, s) in idle.iter_mut().enumerate().step_by(HALF_OPEN_EVERY) {
        closed_without_reply(s, &format!("half-open connection {i}")).await;
    }
    let closed_after = half_open_started.elapsed();
    assert!(
        closed_after >= frame_timeout,
        "closed after {closed_after:?}"
    );
    assert_eq!(
        proxy
            .metric("portcullis_protocol_errors_total{reason=\"frame_timeout\"}")
            .await,
        half_open as f64,
        "{}",
        proxy.log().lines().take(5).collect::<Vec<_>>().join("\n")
    );
    wait_for("only the idle sessions remain", || {
        connections(IDLE_CONNECTIONS - half_open)
    })
    .await;
    // Idle ones (no partial frame) outlived the frame timeout and still work.
    let sample = idle
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| i % HALF_OPEN_EVERY != 0)
        .step_by(97)
        .take(50);
    for (i, s) in sample {
        s.write_all(b"PING\r\n").await.expect("write");
        let mut buf = [0u8; 7];
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("idle connection {i}: no reply"))
            .unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
        assert_eq!(&buf, b"+PONG\r\n", "idle connection {i}");
    }

    // Close them all: the proxy lets go of every session and still serves.
    drop(idle);
    wait_for("every idle session ended", || connections(0)).await;
    fresh_client_served(proxy.addr, "after", WAIT).await;
    eprintln!("after closing them: proxy RSS {:.1} MiB", mib(proxy.rss()));
}

// ---------------------------------------------------------------------------------------
// 3. Request flood: a client pipelines without reading
// ---------------------------------------------------------------------------------------

/// Requests pipelined by the flooder.
const FLOOD_REQUESTS: usize = 200_000;
/// RSS growth the proxy may show under one flooding client.
const FLOOD_RSS_GROWTH_BOUND: u64 = 40 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_flood_is_back_pressured_and_loses_nothing() {
    let redis = RedisServer::start(&[]);
    let proxy = ProxyProcess::start(&redis, "[limits]\nframe_timeout = \"1s\"\n").await;
    let mut bystander = proxy.raw().await;
    set_get(&mut bystander, "bystander", "0").await;
    let rss_before = proxy.rss();
    let bytes_in = "portcullis_client_received_bytes_total";
    let in_before = proxy.metric(bytes_in).await;

    // A BLPOP that blocks, then 200,000 INCRs: Redis answers nothing until the list gets
    // an element, so the proxy's pending queue fills and it must stop reading the client
    // instead of buffering the whole pipeline.
    let mut flood = resp(&[b"BLPOP", b"flood:q", b"0"]);
    let incr = resp(&[b"INCR", b"flood:n"]);
    for _ in 0..FLOOD_REQUESTS {
        flood.extend_from_slice(&incr);
    }
    let flood_len = flood.len() as f64;
    let flooder = Raw::connect_with_recv_buffer(proxy.addr, 64 * 1024).await;
    let (mut reader, mut writer) = flooder.stream.into_split();
    let writer_task = tokio::spawn(async move {
        writer.write_all(&flood).await.expect("flood write");
        writer
    });

    // Wait until the proxy stops reading: its received byte count stops moving.
    let last = reading_stopped(&proxy, bytes_in).await;
    let read = last - in_before;
    let rss_flooded = peak_rss(&proxy, 10).await;
    eprintln!(
        "request flood: {:.1} MiB sent, proxy read {:.2} MiB, RSS {:.1} -> {:.1} MiB",
        flood_len / MIB as f64,
        read / MIB as f64,
        mib(rss_before),
        mib(rss_flooded)
    );
    // max_pending (4096 INCRs of 31 bytes) plus read buffers, not the 6 MiB pipeline.
    assert!(
        read < flood_len / 4.0,
        "the proxy read {read} of {flood_len} bytes of a pipeline it cannot answer yet"
    );
    assert!(
        rss_flooded < rss_before + FLOOD_RSS_GROWTH_BOUND,
        "proxy RSS grew from {:.1} to {:.1} MiB",
        mib(rss_before),
        mib(rss_flooded)
    );
    // Others are served; nothing behind the BLPOP ran yet.
    set_get(&mut bystander, "bystander", "1").await;
    fresh_client_served(proxy.addr, "request-flood", Duration::from_secs(2)).await;
    let mut direct = redis.direct().await;
    let n: Option<i64> = redis::cmd("GET")
        .arg("flood:n")
        .query_async(&mut direct)
        .await
        .expect("GET");
    assert_eq!(n, None, "INCRs ran before the BLPOP returned");

    // Release the BLPOP, then read: every reply, in order.
    bystander.send(&resp(&[b"LPUSH", b"flood:q", b"go"])).await;
    bystander.expect(b":1\r\n").await;
    let mut expected = b"*2\r\n$7\r\nflood:q\r\n$2\r\ngo\r\n".to_vec();
    for i in 1..=FLOOD_REQUESTS {
        expected.extend_from_slice(format!(":{i}\r\n").as_bytes());
    }
    expect_stream(&mut reader, &expected, "flood replies").await;
    let mut writer = writer_task.await.expect("writer task");
    // The flooder's connection is still good.
    writer.write_all(b"PING\r\n").await.expect("write");
    expect_stream(&mut reader, b"+PONG\r\n", "flooder PING").await;
    set_get(&mut bystander, "bystander", "2").await;
}

/// SETs pipelined by the big-value flooder, and their value size (200 MiB in all).
const BIG_SETS: usize = 200;
const BIG_SET_VALUE: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_value_flood_waits_for_a_busy_backend() {
    let redis = RedisServer::start(&["--enable-debug-command", "yes"]);
    // Probes far apart: the master stays confirmed while Redis sleeps.
    let proxy = ProxyProcess::start(
        &redis,
        "[limits]\nframe_timeout = \"1s\"\n[probe]\ninterval = \"5s\"\ntimeout = \"5s\"\n",
    )
    .await;
    let mut bystander = proxy.raw().await;
    set_get(&mut bystander, "bystander", "0").await;
    let rss_before = proxy.rss();
    let bytes_in = "portcullis_client_received_bytes_total";
    let in_before = proxy.metric(bytes_in).await;

    // Redis reads nothing for 3 s, then a 200 MiB pipeline of SETs arrives, replies unread.
    let mut sleeper = Raw::connect(redis.addr().parse().expect("redis addr")).await;
    sleeper.send(&resp(&[b"DEBUG", b"SLEEP", b"3"])).await;
    let flooder = Raw::connect_with_recv_buffer(proxy.addr, 64 * 1024).await;
    let (mut reader, mut writer) = flooder.stream.into_split();
    let writer_task = tokio::spawn(async move {
        let value = vec![b'v'; BIG_SET_VALUE];
        for i in 0..BIG_SETS {
            writer
                .write_all(&resp(&[b"SET", format!("big:{i}").as_bytes(), &value]))
                .await
                .expect("flood write");
        }
        writer
    });

    // The proxy stops reading the flooder once max_reply_buffer of its requests wait for
    // Redis, instead of taking the pipeline into memory.
    let last = reading_stopped(&proxy, bytes_in).await;
    let read = (last - in_before) as u64;
    let rss_flooded = peak_rss(&proxy, 4).await;
    eprintln!(
        "big-value flood, Redis asleep: {} MiB sent, proxy read {:.1} MiB, RSS {:.1} -> {:.1} MiB",
        BIG_SETS * BIG_SET_VALUE / MIB as usize,
        mib(read),
        mib(rss_before),
        mib(rss_flooded)
    );
    assert!(
        read < 40 * MIB,
        "the proxy read {:.1} MiB of a pipeline Redis was not taking",
        mib(read)
    );
    assert!(
        rss_flooded < rss_before + FLOOD_RSS_GROWTH_BOUND,
        "proxy RSS grew from {:.1} to {:.1} MiB",
        mib(rss_before),
        mib(rss_flooded)
    );
    sleeper.expect(b"+OK\r\n").await;

    // Redis is back: everything goes through, and others are served.
    let mut expected = Vec::new();
    for _ in 0..BIG_SETS {
        expected.extend_from_slice(b"+OK\r\n");
    }
    expect_stream(&mut reader, &expected, "SET replies").await;
    let mut writer = writer_task.await.expect("writer task");
    set_get(&mut bystander, "bystander", "1").await;
    let mut direct = redis.direct().await;
    let len: usize = redis::cmd("STRLEN")
        .arg(format!("big:{}", BIG_SETS - 1))
        .query_async(&mut direct)
        .await
        .expect("STRLEN");
    assert_eq!(len, BIG_SET_VALUE);
    writer.write_all(b"PING\r\n").await.expect("write");
    expect_stream(&mut reader, b"+PONG\r\n", "flooder PING").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_value_pipeline_to_a_fast_backend_is_bounded() {
    let redis = RedisServer::start(&[]);
    let proxy = ProxyProcess::start(&redis, "").await;
    let mut bystander = proxy.raw().await;
    set_get(&mut bystander, "bystander", "0").await;
    let rss_before = proxy.rss();

    // Redis takes everything at once; the client writes the whole pipeline, then reads.
    // Each forwarded write is kept until its reply (for a READONLY retry): those frames
    // must count toward the session's bound, or they pile up while the client is read.
    let flooder = Raw::connect(proxy.addr).await;
    let (mut reader, mut writer) = flooder.stream.into_split();
    let writer_task = tokio::spawn(async move {
        let value = vec![b'w'; BIG_SET_VALUE];
        for i in 0..BIG_SETS {
            writer
                .write_all(&resp(&[b"SET", format!("fast:{i}").as_bytes(), &value]))
                .await
                .expect("flood write");
        }
        writer
    });
    let mut expected = Vec::new();
    for _ in 0..BIG_SETS {
        expected.extend_from_slice(b"+OK\r\n");
    }
    expect_stream(&mut reader, &expected, "SET replies").await;
    writer_task.await.expect("writer task");
    let peak = support::peak_rss_bytes(proxy.pid());
    eprintln!(
        "big-value pipeline, fast Redis: {} MiB sent, proxy RSS {:.1} MiB before, peak {:.1} MiB",
        BIG_SETS * BIG_SET_VALUE / MIB as usize,
        mib(rss_before),
        mib(peak)
    );
    assert!(
        peak < rss_before + FLOOD_RSS_GROWTH_BOUND,
        "proxy peak RSS {:.1} MiB, from {:.1} MiB before the flood",
        mib(peak),
        mib(rss_before)
    );
    set_get(&mut bystander, "bystander", "1").await;
}

// ---------------------------------------------------------------------------------------
// 4. Reply flood: a client asks for big replies and never reads them
// ---------------------------------------------------------------------------------------

/// Distinct 1 MiB values, and how many GETs of them the flooder pipelines.
const BIG_KEYS: usize = 8;
const BIG_VALUE: usize = 1024 * 1024;
const BIG_GETS: usize = 96;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_flood_is_bounded_by_max_reply_buffer() {
    let redis = RedisServer::start(&[]);
    let frame_timeout = Duration::from_secs(2);
    let proxy = ProxyProcess::start(&redis, "[limits]\nframe_timeout = \"2s\"\n").await;
    let mut direct = redis.direct().await;
    let values: Vec<Vec<u8>> = (0..BIG_KEYS)
        .map(|k| vec![b'a' + k as u8; BIG_VALUE])
        .collect();
    for (k, v) in values.iter().enumerate() {
        let _: () = redis::cmd("SET")
            .arg(format!("big:{k}"))
            .arg(v.as_slice())
            .query_async(&mut direct)
            .await
            .expect("SET");
    }
    let mut bystander = proxy.raw().await;
    set_get(&mut bystander, "bystander", "0").await;
    let rss_before = proxy.rss();

    // 96 GETs of 1 MiB values, and the start of a PING: the flooder reads nothing.
    let mut pipeline = Vec::new();
    for i in 0..BIG_GETS {
        pipeline.extend_from_slice(&resp(&[b"GET", format!("big:{}", i % BIG_KEYS).as_bytes()]));
    }
    pipeline.extend_from_slice(b"*1\r\n$4\r\nPI");
    let mut flooder = Raw::connect_with_recv_buffer(proxy.addr, 64 * 1024).await;
    flooder.send(&pipeline).await;

    // The proxy stops reading its backend: Redis holds the rest of the replies.
    let deadline = tokio::time::Instant::now() + WAIT;
    while redis_output_buffers(&mut direct).await < 16 * MIB {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never had to buffer: the proxy kept reading replies nobody reads"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stalled = Instant::now();
    let rss_flooded = peak_rss(&proxy, 10).await;
    eprintln!(
        "reply flood: {} MiB of replies requested; Redis holds {:.1} MiB; proxy RSS {:.1} -> {:.1} MiB",
        BIG_GETS * BIG_VALUE / MIB as usize,
        mib(redis_output_buffers(&mut direct).await),
        mib(rss_before),
        mib(rss_flooded)
    );
    assert!(
        rss_flooded < rss_before + FLOOD_RSS_GROWTH_BOUND,
        "proxy RSS grew from {:.1} to {:.1} MiB",
        mib(rss_before),
        mib(rss_flooded)
    );
    // Others are served, big replies included.
    bystander.send(&resp(&[b"GET", b"big:3"])).await;
    let mut one = format!("${BIG_VALUE}\r\n").into_bytes();
    one.extend_from_slice(&values[3]);
    one.extend_from_slice(b"\r\n");
    expect_stream(&mut bystander.stream, &one, "bystander GET big:3").await;
    fresh_client_served(proxy.addr, "reply-flood", Duration::from_secs(2)).await;

    // Stalled for longer than the frame timeout with half a PING buffered: back-pressure
    // is the proxy's doing, so the flooder is not closed for it. Once the proxy reads it
    // again, it has a whole frame timeout to finish the PING: it reads every reply, then
    // takes its time.
    let hold = frame_timeout + Duration::from_millis(500);
    tokio::time::sleep(hold.saturating_sub(stalled.elapsed())).await;
    let mut expected = Vec::with_capacity(BIG_GETS * (BIG_VALUE + 16));
    for i in 0..BIG_GETS {
        expected.extend_from_slice(format!("${BIG_VALUE}\r\n").as_bytes());
        expected.extend_from_slice(&values[i % BIG_KEYS]);
        expected.extend_from_slice(b"\r\n");
    }
    expect_stream(&mut flooder.stream, &expected, "flooder replies").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    flooder.send(b"NG\r\n").await;
    flooder.expect(b"+PONG\r\n").await;
    ping(&mut flooder).await;
    set_get(&mut bystander, "bystander", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_behind_a_blocked_command_and_big_writes_is_noticed() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut direct = redis.direct().await;
    // BLPOP blocks every reply behind it; 12 MiB of writes follow (more than the
    // session's buffer bound), then the client goes away.
    let mut c = proxy.raw().await;
    let mut batch = resp(&[b"BLPOP", b"gone:q", b"0"]);
    let value = vec![b'g'; 1024 * 1024];
    for i in 0..12 {
        batch.extend_from_slice(&resp(&[b"SET", format!("gone:{i}").as_bytes(), &value]));
    }
    c.send(&batch).await;
    // Redis reads a blocked client's pipeline into its query buffer (runs none of it).
    support::wait_until("the writes reach Redis's query buffer", || {
        let mut direct = direct.clone();
        async move {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut direct)
                .await
                .unwrap_or_default();
            list.lines().any(|l| {
                l.contains("cmd=blpop")
                    && l.split_whitespace()
                        .filter_map(|f| f.strip_prefix("qbuf="))
                        .filter_map(|v| v.parse::<u64>().ok())
                        .any(|q| q > 11 * 1024 * 1024)
            })
        }
    })
    .await;
    drop(c);
    // The session sees the close and drops its backend connection, so the BLPOP is not
    // left to pop an element for a client that no longer exists.
    support::wait_for_blocked(&mut direct, 0).await;
    let _: i64 = redis::cmd("LPUSH")
        .arg("gone:q")
        .arg("x")
        .query_async(&mut direct)
        .await
        .expect("LPUSH");
    let len: i64 = redis::cmd("LLEN")
        .arg("gone:q")
        .query_async(&mut direct)
        .await
        .expect("LLEN");
    assert_eq!(len, 1, "an element was popped for a gone client");
}
