//! Wire behaviour of the proxy on raw sockets, against a real redis-server: inline parsing,
//! byte-at-a-time framing, Redis's exact protocol-error texts and closes, the cross-protocol
//! guard, unknown commands, connection limits, backend loss, idle timeout and MULTI refusals.
//! Where Redis itself defines the answer, the same bytes are sent to a direct connection and
//! the two replies are compared byte for byte.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use portcullis::config::{BackendConfig, Config, Limits};
use support::{resp, role, Proxy, Raw, RedisServer, WAIT};
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A raw socket straight to the redis-server (no proxy).
async fn direct_raw(redis: &RedisServer) -> Raw {
    let addr: SocketAddr = redis.addr().parse().expect("redis addr");
    Raw::connect(addr).await
}

/// A config with one backend and the given limits.
fn config_with(redis: &RedisServer, limits: Limits) -> Config {
    Config {
        backends: vec![BackendConfig::from_address(redis.addr())],
        limits,
        ..Config::default()
    }
}

/// `PING` on an existing connection answers `+PONG`.
async fn ping(raw: &mut Raw) {
    raw.send(b"PING\r\n").await;
    raw.expect(b"+PONG\r\n").await;
}

/// A brand-new client of the proxy is served.
async fn assert_proxy_alive(proxy: &Proxy) {
    let mut c = proxy.raw().await;
    ping(&mut c).await;
}

/// `GET key` on a direct connection.
async fn direct_get(redis: &RedisServer, key: &str) -> Option<Vec<u8>> {
    let mut conn = redis.direct().await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("GET")
}

/// Send `bytes` one byte per write.
async fn send_bytewise(raw: &mut Raw, bytes: &[u8]) {
    for b in bytes {
        raw.stream.write_all(&[*b]).await.expect("write a byte");
        raw.stream.flush().await.expect("flush");
    }
}

/// Bytes as escaped ASCII, for exact comparisons with readable failure messages.
fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

// ---------------------------------------------------------------------------------------
// 1. Inline commands
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_are_parsed_like_redis() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut c = proxy.raw().await;

    // (input, exact reply) in order on one connection.
    let cases: &[(&[u8], &[u8])] = &[
        (b"PING\r\n", b"+PONG\r\n"),
        (b"PING\n", b"+PONG\r\n"),
        (b"SET k \"a b\"\r\n", b"+OK\r\n"),
        (b"GET k\r\n", b"$3\r\na b\r\n"),
        (b"SET k2 \"\\x41\\x00B\"\r\n", b"+OK\r\n"),
        (b"GET k2\r\n", b"$3\r\nA\x00B\r\n"),
        (b"SET k3 'it\\'s'\r\n", b"+OK\r\n"),
        (b"GET k3\r\n", b"$4\r\nit's\r\n"),
        (b"ECHO \"tab\\there\"\r\n", b"$8\r\ntab\there\r\n"),
        (b"  ECHO   spaced\t\r\n", b"$6\r\nspaced\r\n"),
        // Empty lines are ignored: only the PING answers.
        (b"\r\n\n\r\nPING\r\n", b"+PONG\r\n"),
    ];
    for (input, expected) in cases {
        c.send(input).await;
        let got = c.read_exact_len(expected.len()).await;
        assert_eq!(show(&got), show(expected), "reply to {:?}", show(input));
    }
    assert_eq!(direct_get(&redis, "k2").await, Some(b"A\x00B".to_vec()));

    // Quote-assembled and hex-escaped SLAVEOF are refused, the connection stays usable.
    for input in [
        &b"sLaVe\"OF\" 127.0.0.1 1\r\n"[..],
        b"\"\\x73laveof\" 127.0.0.1 1\r\n",
        b"'REPLICAOF' 127.0.0.1 1\r\n",
    ] {
        c.send(input).await;
        let line = c.read_to_line().await;
        assert!(
            line.starts_with(b"-NOPERM "),
            "{:?} answered {:?}",
            show(input),
            show(&line)
        );
        ping(&mut c).await;
    }
    assert_eq!(role(&redis).await, "master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_unbalanced_quotes_close_like_redis() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    const ERR: &[u8] = b"-ERR Protocol error: unbalanced quotes in request\r\n";
    for input in [
        &b"SET k \"a b\r\n"[..],
        b"SET k 'a\r\n",
        b"SET k \"a\"b\r\n", // closing quote not followed by a space
    ] {
        let mut direct = direct_raw(&redis).await;
        direct.send(input).await;
        assert_eq!(show(&direct.read_to_close().await), show(ERR), "redis");

        let mut c = proxy.raw().await;
        c.send(input).await;
        assert_eq!(
            show(&c.read_to_close().await),
            show(ERR),
            "proxy, input {:?}",
            show(input)
        );
        assert_proxy_alive(&proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. Every-byte splitting
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_split_at_every_byte_gives_the_same_replies() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;

    let mut pipeline = Vec::new();
    pipeline.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$3\r\nxyz\r\n");
    pipeline.extend_from_slice(b"GET a\r\n");
    pipeline.extend_from_slice(b"*2\r\n$4\r\nECHO\r\n$5\r\nhe\r\nl\r\n");
    pipeline.extend_from_slice(b"ECHO \"x y\"\n");
    pipeline.extend_from_slice(b"\r\n");
    pipeline.extend_from_slice(b"*-1\r\n*0\r\n");
    pipeline.extend_from_slice(&resp(&[b"ECHO", b""]));
    pipeline.extend_from_slice(b"PING\r\n");
    let expected: &[u8] = b"+OK\r\n$3\r\nxyz\r\n$5\r\nhe\r\nl\r\n$3\r\nx y\r\n$0\r\n\r\n+PONG\r\n";

    // Redis itself, whole.
    let mut direct = direct_raw(&redis).await;
    direct.send(&pipeline).await;
    direct.expect(expected).await;

    // The proxy, whole.
    let mut whole = proxy.raw().await;
    whole.send(&pipeline).await;
    whole.expect(expected).await;
    ping(&mut whole).await; // nothing extra was sent

    // The proxy, one byte per write.
    let mut split = proxy.raw().await;
    send_bytewise(&mut split, &pipeline).await;
    split.expect(expected).await;
    ping(&mut split).await;
}

// ---------------------------------------------------------------------------------------
// 3. Malformed input: Redis's exact error, then close; the proxy survives
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_redis_errors_and_close() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config_with(
        &redis,
        Limits {
            max_bulk_len: 1024 * 1024,
            max_inline_len: 1024,
            ..Limits::default()
        },
    ))
    .await;
    let mut bystander = proxy.raw().await;
    ping(&mut bystander).await;

    let long_inline = vec![b'a'; 2000];
    // (input, exact reply, also true of a direct redis with default settings)
    let cases: Vec<(Vec<u8>, &[u8], bool)> = vec![
        (
            b"*abc\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            b"*01\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            b"*+1\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            b"*2147483648\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            b"*1\r\n+PING\r\n".to_vec(),
            b"-ERR Protocol error: expected '$', got '+'\r\n",
            true,
        ),
        (
            b"*1\r\n$-5\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            true,
        ),
        (
            b"*1\r\n$04\r\nPING\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            true,
        ),
        (
            b"*1\r\n*1\r\n$4\r\nPING\r\n".to_vec(),
            b"-ERR Protocol error: expected '$', got '*'\r\n",
            true,
        ),
        (
            b"*2\r\n$4\r\nECHO\r\n$1048577\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            false,
        ),
        (
            long_inline,
            b"-ERR Protocol error: too big inline request\r\n",
            false,
        ),
    ];
    for (input, expected, redis_too) in &cases {
        if *redis_too {
            let mut direct = direct_raw(&redis).await;
            direct.send(input).await;
            assert_eq!(
                show(&direct.read_to_close().await),
                show(expected),
                "redis on {:?}",
                show(input)
            );
        }
        let mut c = proxy.raw().await;
        c.send(input).await;
        assert_eq!(
            show(&c.read_to_close().await),
            show(expected),
            "proxy on {:?}",
            show(input)
        );
        ping(&mut bystander).await;
        assert_proxy_alive(&proxy).await;
    }

    // Non-positive counts are ignored, the connection stays open.
    let mut c = proxy.raw().await;
    c.send(b"*-1\r\n*0\r\nPING\r\n").await;
    c.expect(b"+PONG\r\n").await;
    ping(&mut c).await;

    // Exactly at the bulk limit is accepted.
    let mut c = proxy.raw().await;
    let big = vec![b'z'; 1024 * 1024];
    c.send(&resp(&[b"ECHO", &big])).await;
    let mut expected = b"$1048576\r\n".to_vec();
    expected.extend_from_slice(&big);
    expected.extend_from_slice(b"\r\n");
    let got = c.read_exact_len(expected.len()).await;
    assert!(got == expected, "1 MiB echo through the proxy");
    ping(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_big_inline_at_default_limit_matches_redis() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let input = vec![b'a'; 64 * 1024 + 100];
    const ERR: &[u8] = b"-ERR Protocol error: too big inline request\r\n";

    let mut direct = direct_raw(&redis).await;
    direct.send(&input).await;
    assert_eq!(show(&direct.read_to_close().await), show(ERR), "redis");

    let mut c = proxy.raw().await;
    c.send(&input).await;
    assert_eq!(show(&c.read_to_close().await), show(ERR), "proxy");
    assert_proxy_alive(&proxy).await;

    // Just under the limit with a newline is an (unknown) command, not a protocol error.
    let mut c = proxy.raw().await;
    let mut line = vec![b'a'; 1000];
    line.extend_from_slice(b"\r\n");
    c.send(&line).await;
    let reply = c.read_to_line().await;
    assert!(
        reply.starts_with(b"-ERR unknown command 'aaa"),
        "{:?}",
        show(&reply)
    );
    ping(&mut c).await;
}

// ---------------------------------------------------------------------------------------
// 4. Commands before a protocol error in the same write are answered
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_before_a_protocol_error_are_answered() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let cases: &[(&[u8], &[u8])] = &[
        (
            b"PING\r\n*abc\r\n",
            b"+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"SET before 1\r\nGET before\r\n*1\r\n$x\r\nPING\r\n",
            b"+OK\r\n$1\r\n1\r\n-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            // Nothing after the error is executed.
            b"PING\r\n*1\r\n+X\r\nSET after 1\r\n",
            b"+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n",
        ),
    ];
    for (input, expected) in cases {
        let mut direct = direct_raw(&redis).await;
        direct.send(input).await;
        assert_eq!(show(&direct.read_to_close().await), show(expected), "redis");

        let mut c = proxy.raw().await;
        c.send(input).await;
        assert_eq!(
            show(&c.read_to_close().await),
            show(expected),
            "proxy on {:?}",
            show(input)
        );
    }
    assert_eq!(direct_get(&redis, "after").await, None);
    assert_proxy_alive(&proxy).await;
}

// ---------------------------------------------------------------------------------------
// 5. Cross-protocol guard
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_closes_with_or_without_requests_in_flight() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    // First command on the connection: nothing in flight, the close must still follow.
    let mut alone = proxy.raw().await;
    alone
        .send(
            b"QUIT
",
        )
        .await;
    assert_eq!(alone.read_to_close().await, b"+OK\r\n");
    // After a forwarded command whose reply has arrived.
    let mut after = proxy.raw().await;
    after.send(&resp(&[b"PING"])).await;
    after.expect(b"+PONG\r\n").await;
    after.send(&resp(&[b"QUIT"])).await;
    assert_eq!(after.read_to_close().await, b"+OK\r\n");
    // Pipelined behind a forwarded command, and with a command after it (not run).
    let mut piped = proxy.raw().await;
    let mut batch = resp(&[b"SET", b"quit:k", b"v"]);
    batch.extend_from_slice(&resp(&[b"QUIT"]));
    batch.extend_from_slice(&resp(&[b"SET", b"quit:after", b"v"]));
    piped.send(&batch).await;
    assert_eq!(piped.read_to_close().await, b"+OK\r\n+OK\r\n");
    assert!(direct_get(&redis, "quit:after").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_protocol_input_closes_without_reply() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let cases: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"*1\r\n$4\r\npost\r\n",
        b"hOsT: example\r\n",
        b"*2\r\n$5\r\nHOST:\r\n$1\r\nx\r\n",
        // Commands after the POST are never run.
        b"POST /\r\nSET injected 1\r\n",
    ];
    for input in cases {
        let mut direct = direct_raw(&redis).await;
        direct.send(input).await;
        assert_eq!(show(&direct.read_to_close().await), "", "redis");

        let mut c = proxy.raw().await;
        c.send(input).await;
        assert_eq!(
            show(&c.read_to_close().await),
            "",
            "proxy on {:?}",
            show(input)
        );
        assert_proxy_alive(&proxy).await;
    }
    assert_eq!(direct_get(&redis, "injected").await, None);

    // Inside MULTI too.
    let mut c = proxy.raw().await;
    c.send(b"MULTI\r\n").await;
    c.expect(b"+OK\r\n").await;
    c.send(b"POST /\r\n").await;
    assert_eq!(show(&c.read_to_close().await), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_line_is_a_get_then_host_closes() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;

    let mut direct = direct_raw(&redis).await;
    direct.send(b"GET / HTTP/1.1\r\n").await;
    let redis_reply = direct.read_to_line().await;
    assert_eq!(
        show(&redis_reply),
        show(b"-ERR wrong number of arguments for 'get' command\r\n")
    );
    direct.send(b"Host: example\r\n").await;
    assert_eq!(show(&direct.read_to_close().await), "");

    let mut c = proxy.raw().await;
    c.send(b"GET / HTTP/1.1\r\n").await;
    assert_eq!(show(&c.read_to_line().await), show(&redis_reply));
    c.send(b"Host: example\r\n").await;
    assert_eq!(show(&c.read_to_close().await), "");
    assert_proxy_alive(&proxy).await;
}

// ---------------------------------------------------------------------------------------
// 6. Unknown commands and subcommands: Redis's text, connection stays open
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_answer_like_redis() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut direct = direct_raw(&redis).await;
    let mut c = proxy.raw().await;

    c.send(b"FOO bar\r\n").await;
    c.expect(b"-ERR unknown command 'FOO', with args beginning with: 'bar' \r\n")
        .await;

    let long_name = format!("{} b\r\n", "X".repeat(200));
    let cases: Vec<&[u8]> = vec![
        b"FOO bar\r\n",
        b"FOO\r\n",
        b"foo a b c\r\n",
        b"*2\r\n$3\r\nFOO\r\n$3\r\nbar\r\n",
        // CR LF inside an argument or the name do not break the error line.
        b"*2\r\n$3\r\nFOO\r\n$3\r\na\r\n\r\n",
        b"*2\r\n$3\r\nF\nO\r\n$1\r\na\r\n",
        long_name.as_bytes(),
        b"CONFIG FOO\r\n",
        b"config foo bar\r\n",
        b"CONFIG\r\n",
        b"CLIENT NOSUCH\r\n",
        b"OBJECT NOSUCH k\r\n",
    ];
    for input in cases {
        direct.send(input).await;
        let want = direct.read_to_line().await;
        c.send(input).await;
        let got = c.read_to_line().await;
        assert_eq!(got, want, "reply to {:?}", show(input));
        ping(&mut c).await;
    }
    assert_eq!(role(&redis).await, "master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_text_edge_cases_match_redis() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut direct = direct_raw(&redis).await;
    let mut c = proxy.raw().await;
    let long_arg = format!("FOO {} b c\r\n", "a".repeat(180));
    let many_args = format!(
        "FOO {}\r\n",
        (b'a'..=b'l')
            .map(|p| format!("{}1234567890", p as char))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let cases: Vec<&[u8]> = vec![
        // Redis prints the name as a C string: it stops at the NUL.
        b"*3\r\n$8\r\nSLAVEOF\x00\r\n$1\r\na\r\n$1\r\nb\r\n",
        // Redis echoes the bytes; the proxy must not turn 0xFF into U+FFFD.
        b"*2\r\n$3\r\nFOO\r\n$3\r\n\x01\xff\x7f\r\n",
        // Redis stops listing arguments once the list reaches 128 bytes.
        long_arg.as_bytes(),
        many_args.as_bytes(),
    ];
    let mut mismatches = Vec::new();
    for input in cases {
        direct.send(input).await;
        let mut want = direct.read_to_line().await;
        c.send(input).await;
        let got = c.read_to_line().await;
        if input.starts_with(b"*3\r\n$8\r\nSLAVEOF\x00") && !want.starts_with(b"-ERR unknown") {
            // Redis finds a command by a hash over all 8 bytes, then compares names as C
            // strings (strcasecmp stops at the NUL): with a per-process random hash seed,
            // when "SLAVEOF\0" falls in "slaveof"'s bucket Redis runs SLAVEOF (seen once in CI).
            // The proxy never does: it answers what Redis answers when the lookup misses.
            want =
                b"-ERR unknown command 'SLAVEOF', with args beginning with: 'a' 'b' \r\n".to_vec();
        }
        if got != want {
            mismatches.push(format!(
                "input {:?}\n  proxy {:?}\n  redis {:?}",
                show(input),
                show(&got),
                show(&want)
            ));
        }
        ping(&mut c).await;
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 7. Max clients
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_refuses_with_redis_text_and_frees_slots() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config_with(
        &redis,
        Limits {
            max_clients: 2,
            ..Limits::default()
        },
    ))
    .await;
    let mut a = proxy.raw().await;
    ping(&mut a).await;
    let mut b = proxy.raw().await;
    ping(&mut b).await;

    let mut third = proxy.raw().await;
    assert_eq!(
        show(&third.read_to_close().await),
        show(b"-ERR max number of clients reached\r\n")
    );
    ping(&mut a).await;

    drop(b);
    // The slot frees once the proxy has seen the close: poll, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut c = proxy.raw().await;
        c.send(b"PING\r\n").await;
        let line = c.read_to_line().await;
        if line == b"+PONG\r\n" {
            break;
        }
        assert_eq!(show(&line), show(b"-ERR max number of clients reached\r\n"));
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never freed after a client closed"
        );
        tokio::task::yield_now().await;
    }
    ping(&mut a).await;
}

// ---------------------------------------------------------------------------------------
// 8. Backend dies
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_death_answers_errors_and_never_hangs() {
    let mut redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut c = proxy.raw().await;
    ping(&mut c).await;
    c.send(b"BLPOP q 0\r\n").await;
    // Make sure the BLPOP reached redis before killing it.
    support::wait_for_blocked(&mut redis.direct().await, 1).await;
    redis.kill();

    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-ERR portcullis lost the connection to backend"),
        "{:?}",
        show(&line)
    );
    // Next command on the same client: no confirmed master (MASTERDOWN after the failover
    // wait), the client stays usable.
    for _ in 0..2 {
        c.send(b"GET k\r\n").await;
        let line = c.read_to_line().await;
        assert!(
            line.starts_with(b"-MASTERDOWN portcullis has no confirmed master"),
            "{:?}",
            show(&line)
        );
    }
    // A new client gets a clean error too.
    let mut d = proxy.raw().await;
    d.send(b"GET k\r\n").await;
    let line = d.read_to_line().await;
    assert!(
        line.starts_with(b"-MASTERDOWN portcullis has no confirmed master"),
        "{:?}",
        show(&line)
    );
    assert!(!proxy.task.is_finished(), "the proxy is still running");
}

// ---------------------------------------------------------------------------------------
// 9. Idle timeout
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_active_ones_are_not() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start_with(config_with(
        &redis,
        Limits {
            idle_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
    ))
    .await;

    let mut idle = proxy.raw().await;
    let mut active = proxy.raw().await;
    ping(&mut idle).await;

    // The workload: a PING every 50 ms for 600 ms.
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        ping(&mut active).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ping(&mut active).await;

    assert_eq!(show(&idle.read_to_close().await), "");
}

// ---------------------------------------------------------------------------------------
// 10. MULTI with a refused command
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_command_in_multi_aborts_exec() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut c = proxy.raw().await;
    c.send(b"MULTI\r\nSET a 1\r\nSLAVEOF 127.0.0.1 1\r\nEXEC\r\n")
        .await;
    c.expect(b"+OK\r\n+QUEUED\r\n").await;
    let refusal = c.read_to_line().await;
    assert!(refusal.starts_with(b"-NOPERM "), "{:?}", show(&refusal));
    c.expect(b"-EXECABORT Transaction discarded because of previous errors.\r\n")
        .await;
    ping(&mut c).await;
    assert_eq!(direct_get(&redis, "a").await, None);
    assert_eq!(role(&redis).await, "master");
}
