//! The key integration suites again, with every proxy on one thread with batched sends
//! through io_uring (`src/uring.rs`), as a one-CPU deployment runs: the suites' own test
//! binaries, run with `PORTCULLIS_TEST_IO_URING=1` (read by `tests/support`), so nothing
//! is copied and every assertion stays as written (`tests/support/suites.rs`).
//!
//! Skipped, with a line on stderr, where the kernel refuses io_uring (the suites have
//! already run with direct writes).

mod support;

fn run_suite(name: &str) {
    if let Err(e) = io_uring_here() {
        eprintln!("skipped: no io_uring here ({e})");
        return;
    }
    support::suites::run(name, &[], (support::URING_ENV, "1"), "io_uring mode");
}

/// Whether this kernel lets a thread set up batched sends.
fn io_uring_here() -> std::io::Result<()> {
    std::thread::spawn(portcullis::uring::enable_on_this_thread)
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
}

#[test]
fn fidelity_in_uring_mode() {
    run_suite("fidelity");
}

#[test]
fn fidelity_drain_in_uring_mode() {
    run_suite("fidelity_drain");
}

#[test]
fn wire_in_uring_mode() {
    run_suite("wire");
}

#[test]
fn hostile_in_uring_mode() {
    run_suite("hostile");
}

#[test]
fn stall_in_uring_mode() {
    run_suite("stall");
}

#[test]
fn failover_in_uring_mode() {
    run_suite("failover");
}

#[test]
fn multiplexing_in_uring_mode() {
    run_suite("multiplexing");
}

#[test]
fn differential_in_uring_mode() {
    run_suite("differential");
}

#[test]
fn compat_in_uring_mode() {
    run_suite("compat");
}

/// Clients, and pipelined INCRs each, in `one_cpu_proxy_*`.
const CLIENTS: usize = 40;
const ROUNDS: usize = 25;
const PIPELINE: usize = 4;

/// Every client's replies, in order: `CLIENTS` connections to `addr`, each sending
/// `ROUNDS` pipelines of `PIPELINE` INCRs of its own key and a GET, all at once.
async fn traffic(addr: std::net::SocketAddr) -> Vec<Vec<u8>> {
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                let key = format!("uring:{c}");
                let mut batch = Vec::new();
                for _ in 0..PIPELINE {
                    batch.extend(support::resp(&[b"INCR", key.as_bytes()]));
                }
                batch.extend(support::resp(&[b"GET", key.as_bytes()]));
                let mut raw = support::Raw::connect(addr).await;
                let mut seen = Vec::new();
                for round in 1..=ROUNDS {
                    raw.send(&batch).await;
                    let last = (round * PIPELINE).to_string();
                    let tail = format!("${}\r\n{last}\r\n", last.len());
                    seen.extend(raw.read_until(tail.as_bytes()).await);
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("client task"));
    }
    all
}

/// Whether this machine can run the binary on one CPU with io_uring.
fn one_cpu_io_uring() -> bool {
    if let Err(e) = io_uring_here() {
        eprintln!("skipped: no io_uring here ({e})");
        return false;
    }
    if !support::command_runs("taskset", &["-c", "0", "true"]) {
        eprintln!("skipped: no taskset");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cpu_proxy_batches_its_sends_and_answers_as_redis_does() {
    if !one_cpu_io_uring() {
        return;
    }
    let direct = support::RedisServer::start(&[]);
    let behind = support::RedisServer::start(&[]);
    let proxy = support::ProxyProcess::start_on(&behind, "", true).await;
    let expected = traffic(direct.addr().parse().expect("redis addr")).await;
    let got = traffic(proxy.addr).await;
    for (c, (want, seen)) in expected.iter().zip(&got).enumerate() {
        assert!(
            seen == want,
            "client {c}: replies differ from Redis's: {} against {}",
            support::excerpt(seen),
            support::excerpt(want)
        );
    }
    let submissions = proxy.metric("portcullis_uring_submissions_total").await;
    let sends = proxy.metric("portcullis_uring_sends_total").await;
    assert!(submissions > 0.0, "no batch submitted:\n{}", proxy.log());
    // Each request and each reply is one send (a pipeline is written whole): more sends
    // than submissions means batches carried several connections' writes.
    assert!(
        sends >= (CLIENTS * ROUNDS) as f64 && sends > submissions,
        "{sends} sends in {submissions} submissions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cpu_proxy_with_io_uring_off_writes_directly() {
    if !one_cpu_io_uring() {
        return;
    }
    let direct = support::RedisServer::start(&[]);
    let behind = support::RedisServer::start(&[]);
    let proxy =
        support::ProxyProcess::start_on(&behind, "[runtime]\nio_uring = \"off\"\n", true).await;
    let expected = traffic(direct.addr().parse().expect("redis addr")).await;
    assert_eq!(
        traffic(proxy.addr).await,
        expected,
        "replies differ from Redis's"
    );
    assert_eq!(proxy.metric("portcullis_uring_sends_total").await, 0.0);
}
