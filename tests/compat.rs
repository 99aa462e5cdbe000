//! Everything Redis does keeps working through the proxy: real redis-server, real client
//! (redis-rs), plus raw sockets where the client library hides the wire.

mod support;

use redis::AsyncCommands;
use support::{resp, Proxy, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_set_binary_safe_and_large_values() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut c = proxy.client().await;

    let key: Vec<u8> = (0..=255u8).collect();
    let value: Vec<u8> = (0..=255u8).rev().cycle().take(4096).collect();
    let _: () = c.set(&key, &value).await.unwrap();
    let got: Vec<u8> = c.get(&key).await.unwrap();
    assert_eq!(got, value);

    // 100 MB value round trip.
    let big = vec![b'x'; 100 * 1024 * 1024];
    let _: () = c.set("big", &big).await.unwrap();
    let got: Vec<u8> = c.get("big").await.unwrap();
    assert_eq!(got.len(), big.len());
    assert!(got == big);
    let len: usize = c.strlen("big").await.unwrap();
    assert_eq!(len, big.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_of_10000_keeps_order() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut c = proxy.client().await;
    let mut pipe = redis::pipe();
    for i in 0..10_000 {
        pipe.cmd("SET").arg(format!("k{i}")).arg(i).ignore();
        pipe.cmd("GET").arg(format!("k{i}"));
    }
    let got: Vec<i64> = pipe.query_async(&mut c).await.unwrap();
    assert_eq!(got, (0..10_000).collect::<Vec<i64>>());

    // The same as one raw write of 10,000 commands.
    let mut raw = proxy.raw().await;
    let mut batch = Vec::new();
    for i in 0..10_000 {
        batch.extend(resp(&[b"INCR", b"counter"]));
        let _ = i;
    }
    raw.send(&batch).await;
    let mut expected = Vec::new();
    for i in 1..=10_000 {
        expected.extend(format!(":{i}\r\n").into_bytes());
    }
    raw.expect(&expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_watch_and_discard() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut c = proxy.client().await;
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr("tx", 1)
        .incr("tx", 2)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((a, b), (1, 3));

    // WATCH conflict: a direct client changes the key between WATCH and EXEC.
    let mut raw = proxy.raw().await;
    raw.send(&resp(&[b"WATCH", b"w"])).await;
    raw.expect(b"+OK\r\n").await;
    let mut direct = redis.direct().await;
    let _: () = direct.set("w", "changed").await.unwrap();
    raw.send(
        &[
            resp(&[b"MULTI"]),
            resp(&[b"SET", b"w", b"mine"]),
            resp(&[b"EXEC"]),
        ]
        .concat(),
    )
    .await;
    raw.expect(b"+OK\r\n+QUEUED\r\n*-1\r\n").await;
    let w: String = direct.get("w").await.unwrap();
    assert_eq!(w, "changed");

    raw.send(
        &[
            resp(&[b"MULTI"]),
            resp(&[b"SET", b"d", b"1"]),
            resp(&[b"DISCARD"]),
        ]
        .concat(),
    )
    .await;
    raw.expect(b"+OK\r\n+QUEUED\r\n+OK\r\n").await;
    let d: Option<String> = direct.get("d").await.unwrap();
    assert_eq!(d, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_and_client_name_survive() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut raw = proxy.raw().await;
    raw.send(
        &[
            resp(&[b"SELECT", b"3"]),
            resp(&[b"SET", b"in3", b"yes"]),
            resp(&[b"CLIENT", b"SETNAME", b"app-1"]),
            resp(&[b"CLIENT", b"GETNAME"]),
        ]
        .concat(),
    )
    .await;
    raw.expect(b"+OK\r\n+OK\r\n+OK\r\n$5\r\napp-1\r\n").await;
    let mut direct = support::client(&format!("{}/3", redis.addr())).await;
    let v: String = direct.get("in3").await.unwrap();
    assert_eq!(v, "yes");
    raw.send(&resp(&[b"CLIENT", b"ID"])).await;
    let id = raw.read_exact_len(1).await;
    assert_eq!(id, b":");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_resp2_messages_and_ping() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut sub = proxy.raw().await;
    sub.send(&resp(&[b"SUBSCRIBE", b"a", b"b"])).await;
    sub.expect(
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n",
    )
    .await;
    sub.send(&resp(&[b"PSUBSCRIBE", b"p*"])).await;
    sub.expect(b"*3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:3\r\n")
        .await;

    let mut publisher = proxy.client().await;
    let n: i64 = publisher.publish("a", "hello").await.unwrap();
    assert_eq!(n, 1);
    sub.expect(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhello\r\n")
        .await;
    let n: i64 = publisher.publish("pq", "x").await.unwrap();
    assert_eq!(n, 1);
    sub.expect(b"*4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npq\r\n$1\r\nx\r\n")
        .await;

    sub.send(&resp(&[b"PING"])).await;
    sub.expect(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n").await;

    // UNSUBSCRIBE with no arguments: one confirmation per channel, then normal again.
    sub.send(
        &[
            resp(&[b"UNSUBSCRIBE"]),
            resp(&[b"PUNSUBSCRIBE"]),
            resp(&[b"PING"]),
        ]
        .concat(),
    )
    .await;
    let got = sub.read_until(b"+PONG\r\n").await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.contains("unsubscribe\r\n$1\r\na\r\n"), "{text}");
    assert!(text.contains("unsubscribe\r\n$1\r\nb\r\n"), "{text}");
    assert!(
        text.ends_with("*3\r\n$12\r\npunsubscribe\r\n$2\r\np*\r\n:0\r\n+PONG\r\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_resp3_push_frames_and_commands() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut sub = proxy.raw().await;
    sub.send(&resp(&[b"HELLO", b"3"])).await;
    sub.send(&resp(&[b"ECHO", b"end-of-hello"])).await;
    let hello = sub.read_until(b"end-of-hello\r\n").await;
    assert!(
        hello.starts_with(b"%7\r\n"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    assert!(
        hello.windows(9).any(|w| w == b"proto\r\n:3"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    sub.send(&resp(&[b"SUBSCRIBE", b"c"])).await;
    sub.expect(b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n")
        .await;
    sub.send(&resp(&[b"SSUBSCRIBE", b"s"])).await;
    sub.expect(b">3\r\n$10\r\nssubscribe\r\n$1\r\ns\r\n:1\r\n")
        .await;
    // RESP3 allows normal commands while subscribed.
    sub.send(&resp(&[b"SET", b"k3", b"v"])).await;
    sub.expect(b"+OK\r\n").await;
    let mut publisher = proxy.client().await;
    let _: i64 = publisher.publish("c", "m1").await.unwrap();
    sub.expect(b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nm1\r\n")
        .await;
    let _: i64 = redis::cmd("SPUBLISH")
        .arg("s")
        .arg("m2")
        .query_async(&mut publisher)
        .await
        .unwrap();
    sub.expect(b">3\r\n$8\r\nsmessage\r\n$1\r\ns\r\n$2\r\nm2\r\n")
        .await;
    sub.send(&resp(&[b"PING"])).await;
    sub.expect(b"+PONG\r\n").await;
    sub.send(&resp(&[b"SUNSUBSCRIBE"])).await;
    sub.expect(b">3\r\n$12\r\nsunsubscribe\r\n$1\r\ns\r\n:0\r\n")
        .await;
    sub.send(&resp(&[b"GET", b"k3"])).await;
    sub.expect(b"$1\r\nv\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_and_disconnect_while_blocked() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut blocked = proxy.raw().await;
    blocked.send(&resp(&[b"BLPOP", b"q", b"0"])).await;
    let mut direct = redis.direct().await;
    // Wait until Redis sees the blocked client (an event, not a sleep).
    support::wait_for_blocked(&mut direct, 1).await;
    let mut c = proxy.client().await;
    let _: i64 = c.rpush("q", "job").await.unwrap();
    blocked.expect(b"*2\r\n$1\r\nq\r\n$3\r\njob\r\n").await;

    blocked.send(&resp(&[b"BRPOP", b"none", b"0.05"])).await;
    blocked.expect(b"*-1\r\n").await;

    // A client that disconnects while blocked must not consume a later push.
    let mut gone = proxy.raw().await;
    gone.send(&resp(&[b"BLPOP", b"q2", b"0"])).await;
    support::wait_for_blocked(&mut direct, 1).await;
    drop(gone);
    support::wait_for_blocked(&mut direct, 0).await;
    let _: i64 = c.rpush("q2", "keep").await.unwrap();
    let len: i64 = direct.llen("q2").await.unwrap();
    assert_eq!(len, 1);

    // XREAD BLOCK and WAIT.
    blocked
        .send(&resp(&[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"st", b"$"]))
        .await;
    support::wait_for_blocked(&mut direct, 1).await;
    let _: String = c.xadd("st", "*", &[("f", "v")]).await.unwrap();
    let head = blocked.read_exact_len(4).await;
    assert_eq!(head, b"*1\r\n");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), blocked.read_to_close()).await;
    let n: i64 = redis::cmd("WAIT")
        .arg(0)
        .arg(10)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_and_scan() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut c = proxy.client().await;
    let script = redis::Script::new("return redis.call('SET', KEYS[1], ARGV[1])");
    let ok: String = script
        .key("sk")
        .arg("sv")
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(ok, "OK");
    let v: String = c.get("sk").await.unwrap();
    assert_eq!(v, "sv");
    let ro: i64 = redis::cmd("EVAL_RO")
        .arg("return 7")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(ro, 7);

    for i in 0..1000 {
        let _: () = c.sadd("set", i).await.unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<i64>) = redis::cmd("SSCAN")
            .arg("set")
            .arg(cursor)
            .arg("COUNT")
            .arg(100)
            .query_async(&mut c)
            .await
            .unwrap();
        seen.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert_eq!(seen.len(), 1000);
    let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg("s*")
        .arg("COUNT")
        .arg(1000)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(keys.contains(&"set".to_string()) && keys.contains(&"sk".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_skip_on() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut raw = proxy.raw().await;
    raw.send(
        &[
            resp(&[b"CLIENT", b"REPLY", b"OFF"]),
            resp(&[b"SET", b"r1", b"1"]),
            resp(&[b"SLAVEOF", b"127.0.0.1", b"1"]), // refused, but silently: reply is off
            resp(&[b"CLIENT", b"REPLY", b"ON"]),
            resp(&[b"CLIENT", b"REPLY", b"SKIP"]),
            resp(&[b"GET", b"r1"]),
            resp(&[b"INCR", b"r1"]),
        ]
        .concat(),
    )
    .await;
    raw.expect(b"+OK\r\n:2\r\n").await;
    let mut direct = redis.direct().await;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut direct).await.unwrap();
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"master".to_vec()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_auth_reset_quit() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(&[&redis]).await;
    let mut raw = proxy.raw().await;
    raw.send(&resp(&[b"HELLO", b"2", b"AUTH", b"nobody", b"pw"]))
        .await;
    raw.expect(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        .await;
    raw.send(&resp(&[
        b"HELLO",
        b"2",
        b"AUTH",
        b"default",
        b"anything",
        b"SETNAME",
        b"n1",
    ]))
    .await;
    raw.send(&resp(&[b"CLIENT", b"GETNAME"])).await;
    let hello = raw.read_until(b"$2\r\nn1\r\n").await;
    assert!(
        hello.starts_with(b"*14\r\n"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    raw.send(&resp(&[b"AUTH", b"pw"])).await;
    let got = raw.read_to_line().await;
    assert!(
        got.starts_with(b"-ERR AUTH <password> called without any password"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    raw.send(
        &[
            resp(&[b"RESET"]),
            resp(&[b"CLIENT", b"GETNAME"]),
            resp(&[b"QUIT"]),
            resp(&[b"PING"]),
        ]
        .concat(),
    )
    .await;
    let rest = raw.read_to_close().await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.ends_with("+RESET\r\n$-1\r\n+OK\r\n"), "{text}");
}
