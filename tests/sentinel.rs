//! Sentinel mode against a real Sentinel: the master comes from Sentinel, is confirmed by
//! ROLE, and a Sentinel failover moves writes without a client ever seeing READONLY.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portcullis::config::{Config, SentinelConfig};
use redis::AsyncCommands;
use support::{try_role, wait_until, Proxy, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_moves_writes_without_readonly() {
    let master = RedisServer::start(&[]);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let sentinel = support::start_sentinel("mymaster", master.port);
    // Sentinel knows the replica before we ask it to fail over.
    wait_until("sentinel sees the replica", || async {
        let mut s = sentinel.direct().await;
        let r: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SENTINEL")
            .arg("replicas")
            .arg("mymaster")
            .query_async(&mut s)
            .await;
        r.is_ok_and(|v| !v.is_empty())
    })
    .await;

    let mut cfg = Config {
        sentinel: Some(SentinelConfig {
            addresses: vec![sentinel.addr()],
            master_name: "mymaster".into(),
            username: None,
            password: None,
            backend_username: None,
            backend_password: None,
            tls: false,
        }),
        ..Config::default()
    };
    cfg.probe.interval = Duration::from_millis(100);
    cfg.routing.failover_wait = Duration::from_secs(5);
    let proxy = Proxy::start_with(cfg).await;
    let mut c = proxy.client().await;
    let _: () = c.set("before", 1).await.unwrap();
    let mut direct = master.direct().await;
    let v: i64 = direct.get("before").await.unwrap();
    assert_eq!(v, 1);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut c = proxy.client().await;
        tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, Vec::<String>::new());
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match c.set::<_, _, ()>(format!("w{i}"), i).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errors.push(e.to_string());
                        // An error may come back without ever yielding: let shutdown in.
                        tokio::task::yield_now().await;
                    }
                }
            }
            (ok, errors)
        })
    };
    // Sentinel accepts the failover once it has fresh INFO from the replica.
    wait_until("sentinel accepts FAILOVER", || async {
        let mut s = sentinel.direct().await;
        let r: redis::RedisResult<()> = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg("mymaster")
            .query_async(&mut s)
            .await;
        r.is_ok()
    })
    .await;
    wait_until("replica promoted", || async {
        try_role(&replica).await.as_deref() == Some("master")
    })
    .await;
    // Writes through the proxy land on the new master.
    wait_until("writes reach the new master", || {
        let mut c = c.clone();
        let replica = &replica;
        async move {
            if c.set::<_, _, ()>("after", "yes").await.is_err() {
                return false;
            }
            let mut d = replica.direct().await;
            d.get::<_, Option<String>>("after")
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some("yes")
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = writer.await.unwrap();
    assert!(ok > 0);
    for e in &errors {
        assert!(!e.contains("READONLY"), "client saw READONLY: {e}");
        assert!(e.contains("MASTERDOWN"), "unexpected error: {e}");
    }
}
