//! The built binary: flags, exit codes, the admin endpoints and SIGTERM, as an operator
//! runs it.

mod support;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use redis::AsyncCommands;
use support::{free_port, http_get, RedisServer, WAIT};

const BIN: &str = support::PROXY_BIN;

/// Send SIGTERM to `child` and wait (at most `WAIT`) for it to exit; a child still
/// running then is killed and the test fails, naming `what`.
fn exit_after_sigterm(child: &mut Child, what: &str) -> ExitStatus {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no exit after SIGTERM {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn wait_status(port: u16, path: &str, want: u16) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some((status, body)) = http_get(port, path).await {
            if status == want {
                return body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never answered {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn invalid_config_exits_2_naming_the_field() {
    for (args, field) in [
        (
            vec!["--listen", "nope", "--backend", "127.0.0.1:6379"],
            "listen",
        ),
        (vec![], "backends"),
        (vec!["--backend", "localhost"], "backends[0].address"),
        (
            vec!["--backend", "127.0.0.1:6379", "--log-level", "a=b=c"],
            "log.level",
        ),
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .env_remove("PORTCULLIS_BACKEND")
            .env_remove("PORTCULLIS_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{args:?}: {err}");
    }
    // A config file with an unknown key names it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[backends]]\naddress = \"127.0.0.1:6379\"\n[limits]\nmax_clientz = 1\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_clientz"));
}

#[test]
fn example_configs_parse_and_validate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(BIN)
                .arg("--config")
                .arg(&path)
                .arg("--check-config")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_sigterm() {
    let redis = RedisServer::start(&[]);
    let (port, admin) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--backend", &redis.addr()])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(wait_status(admin, "/healthz", 200).await, "ok\n");
    wait_status(admin, "/readyz", 200).await;
    let topo = wait_status(admin, "/topology", 200).await;
    let v: serde_json::Value = serde_json::from_str(&topo).unwrap();
    assert_eq!(v["confirmed_master"], serde_json::json!(redis.addr()));
    assert_eq!(v["backends"][0]["role"], "master");

    let mut c = support::client(&format!("127.0.0.1:{port}")).await;
    let _: () = c.set("a", 1).await.unwrap();
    let r: redis::RedisResult<()> = redis::cmd("SLAVEOF")
        .arg("127.0.0.1")
        .arg(1)
        .query_async(&mut c)
        .await;
    assert!(r.is_err());
    let metrics = wait_status(admin, "/metrics", 200).await;
    assert!(
        metrics.contains("portcullis_refused_commands_total{command=\"slaveof\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_backend_role{backend=\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_client_connections 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_commands_total{class=\"write\",outcome=\"forwarded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_commands_total{class=\"other\",outcome=\"refused\"} 1"),
        "{metrics}"
    );
    // The SET (and the client's connect-time commands) were timed.
    let timed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_request_duration_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(timed >= 1, "{metrics}");

    // No master: /readyz turns 503 (backend gone).
    drop(redis);
    wait_status(admin, "/readyz", 503).await;
    let metrics = wait_status(admin, "/metrics", 200).await;
    assert!(
        metrics.contains("portcullis_probe_failures_total{backend=\""),
        "{metrics}"
    );

    // SIGTERM: exits by itself, status 0.
    let status = exit_after_sigterm(&mut child, "");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_policy_for_a_connected_client() {
    let redis = RedisServer::start(&[]);
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let base = format!(
        "listen = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"\"\n[[backends]]\naddress = \"{}\"\n",
        redis.addr()
    );
    std::fs::write(&path, &base).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = support::client(&format!("127.0.0.1:{port}")).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("x*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(keys.is_empty());

    // Deny KEYS in the file, SIGHUP: the same connection is refused, not dropped.
    std::fs::write(&path, format!("{base}[protection]\ndeny = [\"keys\"]\n")).unwrap();
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r: redis::RedisResult<Vec<String>> =
            redis::cmd("KEYS").arg("x*").query_async(&mut c).await;
        match r {
            Err(e) if e.code() == Some("NOPERM") => break,
            Err(e) => panic!("unexpected: {e}"),
            Ok(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "reload never applied"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A broken file is rejected: the running policy stays, the process keeps serving.
    std::fs::write(
        &path,
        format!("{base}[protection]\nallow = [\"slaveof\"]\n"),
    )
    .unwrap();
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status();
    let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
    assert_eq!(pong, "PONG");
    let r: redis::RedisResult<Vec<String>> = redis::cmd("KEYS").arg("x*").query_async(&mut c).await;
    assert_eq!(r.unwrap_err().code(), Some("NOPERM"));
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn container_entrypoint_and_env_parse() {
    // The image runs the release binary with these env defaults (Dockerfile `ENV`).
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("PORTCULLIS_LISTEN=0.0.0.0:6380"));
    assert!(dockerfile.contains("PORTCULLIS_ADMIN_LISTEN=0.0.0.0:9190"));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/portcullis"]"#));
    let out = Command::new(BIN)
        .arg("--check-config")
        .env("PORTCULLIS_LISTEN", "0.0.0.0:6380")
        .env("PORTCULLIS_ADMIN_LISTEN", "0.0.0.0:9190")
        .env("PORTCULLIS_BACKEND", "redis:6379")
        .env("PORTCULLIS_PROTECTED_MODE", "false")
        .env("PORTCULLIS_LOG_FORMAT", "json")
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("0.0.0.0:6380") && text.contains("redis:6379"),
        "{text}"
    );
    assert!(text.contains("protected_mode: false"), "{text}");
}

/// A closed stderr (a pipe whose reader left: `portcullis ... 2>&1 | head`) loses the
/// log lines and nothing else: the proxy keeps serving, and SIGTERM, whose handler logs,
/// still drains and exits 0. Also with the proxy on one CPU (its single-threaded
/// runtime), where `taskset` exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_stderr_loses_only_the_log_lines() {
    let redis = RedisServer::start(&[]);
    for one_cpu in runtimes() {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let backend = redis.addr();
        let args = [
            "--listen",
            listen.as_str(),
            "--backend",
            backend.as_str(),
            "--admin-listen",
            "",
            "--log-level",
            "debug",
        ];
        let mut child = proxy_command(one_cpu)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the reading end at once: every log line from here on fails to write.
        drop(child.stderr.take());
        let mut c = support::client(&listen).await;
        // Sessions log (debug) as they come and go: serving goes on regardless.
        for i in 0..3 {
            let mut other = support::client(&listen).await;
            let _: () = other.set(format!("k{i}"), i).await.unwrap();
        }
        let r: redis::RedisResult<()> = redis::cmd("SLAVEOF")
            .arg("127.0.0.1")
            .arg("1")
            .query_async(&mut c)
            .await;
        assert_eq!(r.unwrap_err().code(), Some("NOPERM"), "one_cpu={one_cpu}");
        let v: i64 = c.get("k2").await.unwrap();
        assert_eq!(v, 2, "one_cpu={one_cpu}");
        drop(c);
        let status = exit_after_sigterm(&mut child, &format!("one_cpu={one_cpu}, stderr closed"));
        assert!(status.success(), "one_cpu={one_cpu}: {status:?}");
    }
}

/// Signals are handled from the moment the data port accepts: an orchestrator that sees
/// the port open and sends SIGHUP (whose default action ends a process) gets a reload, and
/// one that sends SIGTERM gets a drain (exit 0), never a death by signal. Each is sent as
/// soon as a connect succeeds, on both runtimes (the single-threaded one, under `taskset`,
/// runs the most before its first yield).
#[test]
fn signals_are_handled_as_soon_as_the_port_accepts() {
    let redis = RedisServer::start(&[]);
    for one_cpu in runtimes() {
        for (round, first) in ["HUP", "TERM", "HUP", "TERM", "HUP", "TERM"]
            .into_iter()
            .enumerate()
        {
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let mut child = proxy_command(one_cpu)
                .args(["--listen", &listen, "--backend", &redis.addr()])
                .args(["--admin-listen", ""])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = log_lines(&mut child);
            let what = format!("one_cpu={one_cpu} round={round} SIG{first}");
            // Connect attempts back to back (a refused one costs microseconds): the signal
            // goes out as close to the listen as a client can see it.
            let deadline = std::time::Instant::now() + WAIT;
            while std::net::TcpStream::connect(&listen).is_err() {
                if let Some(s) = child.try_wait().unwrap() {
                    panic!("{what}: exited before listening: {s:?}");
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: never listened"
                );
            }
            if first == "HUP" {
                let _ = Command::new("kill")
                    .arg("-HUP")
                    .arg(child.id().to_string())
                    .status();
                // The reload is logged (the process is alive and acted on it).
                let reloaded = lines.any(|l| l.contains("SIGHUP: reloading"));
                if !reloaded {
                    let status = child.try_wait().unwrap();
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{what}: no reload logged; exit status {status:?}");
                }
            }
            let status = exit_after_sigterm(&mut child, &what);
            assert!(status.success(), "{what}: {status:?}");
        }
    }
}

/// Which runtimes to run the binary on, as `one_cpu` flags for `proxy_command`: the
/// multi-threaded one, and the single-threaded one where `taskset` exists.
fn runtimes() -> Vec<bool> {
    if support::command_runs("taskset", &["-V"]) {
        vec![false, true]
    } else {
        eprintln!("skipped: no taskset, the one-CPU run");
        vec![false]
    }
}

/// The proxy binary as a command; with `one_cpu`, under `taskset -c 0`, where it sees one
/// CPU and runs its single-threaded runtime.
fn proxy_command(one_cpu: bool) -> Command {
    if one_cpu {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", BIN]);
        c
    } else {
        Command::new(BIN)
    }
}

/// The child's stderr, line by line as it is written (read on a thread; the iterator waits
/// at most `WAIT` for each line and ends when the pipe closes).
fn log_lines(child: &mut Child) -> impl Iterator<Item = String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    }
    std::iter::from_fn(move || rx.recv_timeout(WAIT).ok())
}
