//! TLS on both sides, with real peers: redis-cli `--tls` and a rustls client in front of
//! the proxy, and redis-server's own TLS port (OpenSSL) behind it. Certificates are made
//! per test with rcgen: a CA, a server certificate for localhost/127.0.0.1, a client
//! certificate, and an unrelated CA that must be refused.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portcullis::config::{BackendConfig, BackendTlsConfig, Config, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{resp, wait_until, Proxy, Raw, RedisServer, WAIT};
use tokio::net::TcpStream;

type TlsRaw = Raw<tokio_rustls::client::TlsStream<TcpStream>>;

/// Test PKI in a temp dir: `<name>.pem` certificates and `<name>.key` keys.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Two CAs ("ca", "other-ca"); under "ca": "server" (localhost, 127.0.0.1) and
    /// "client"; under "other-ca": "other-server" and "other-client".
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for (ca, server, client) in [
            ("ca", "server", "client"),
            ("other-ca", "other-server", "other-client"),
        ] {
            let ca_key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, format!("portcullis test {ca}"));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&ca_key).expect("CA cert");
            pki.write(ca, &cert.pem(), &ca_key.serialize_pem());
            let issuer = Issuer::new(params, ca_key);
            for (name, sans, usage) in [
                (
                    server,
                    vec!["localhost".to_string(), "127.0.0.1".to_string()],
                    ExtendedKeyUsagePurpose::ServerAuth,
                ),
                (
                    client,
                    vec!["portcullis-client".to_string()],
                    ExtendedKeyUsagePurpose::ClientAuth,
                ),
            ] {
                let key = KeyPair::generate().expect("key");
                let mut params = CertificateParams::new(sans).expect("params");
                params.distinguished_name.push(DnType::CommonName, name);
                params.extended_key_usages = vec![usage];
                let cert = params.signed_by(&key, &issuer).expect("leaf cert");
                pki.write(name, &cert.pem(), &key.serialize_pem());
            }
        }
        pki
    }

    fn write(&self, name: &str, cert: &str, key: &str) {
        std::fs::write(self.cert(name), cert).expect("write cert");
        std::fs::write(self.key(name), key).expect("write key");
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }

    fn path(&self, name: &str) -> String {
        self.cert(name).display().to_string()
    }

    fn key_path(&self, name: &str) -> String {
        self.key(name).display().to_string()
    }

    /// `[tls]` serving `server`'s certificate.
    fn listener(&self, server: &str, client_ca: Option<&str>) -> TlsConfig {
        TlsConfig {
            cert: self.cert(server),
            key: self.key(server),
            client_ca: client_ca.map(|ca| self.cert(ca)),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// A rustls client trusting `ca`, optionally presenting `client`'s certificate.
async fn tls_connect(
    addr: SocketAddr,
    pki: &Pki,
    ca: &str,
    client: Option<&str>,
) -> std::io::Result<TlsRaw> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.cert(ca)).expect("read CA") {
        roots.add(cert.expect("CA pem")).expect("add CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(name) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(pki.cert(name)).expect("client cert")],
                PrivateKeyDer::from_pem_file(pki.key(name)).expect("client key"),
            )
            .expect("client auth"),
    };
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(Raw::new(tls))
}

/// Connect as `tls_connect` does and check the proxy answers PING; returns the connection.
async fn served(proxy: &Proxy, pki: &Pki, ca: &str, client: Option<&str>) -> TlsRaw {
    let mut conn = tls_connect(proxy.addr, pki, ca, client)
        .await
        .unwrap_or_else(|e| panic!("TLS connect trusting {ca}, certificate {client:?}: {e}"));
    conn.send(b"PING\r\n").await;
    conn.expect(b"+PONG\r\n").await;
    conn
}

/// A TLS 1.3 server learns of a refused client certificate after the client's handshake
/// is done, so the refusal shows on the first exchange: the connection closes.
async fn refused(conn: std::io::Result<TlsRaw>) -> bool {
    let Ok(mut raw) = conn else {
        return true;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if raw.stream.write_all(b"PING\r\n").await.is_err() || raw.stream.flush().await.is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, raw.stream.read(&mut buf)).await {
        Ok(Ok(n)) => !buf[..n].starts_with(b"+PONG"),
        Ok(Err(_)) => true,
        Err(_) => panic!("no answer and no close within {WAIT:?}"),
    }
}

/// Run redis-cli with `args`; (exit success, stdout + stderr).
async fn redis_cli(args: Vec<String>) -> (bool, String) {
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("redis-cli installed")
    });
    let out = tokio::time::timeout(WAIT, run)
        .await
        .expect("redis-cli finished in time")
        .expect("redis-cli task");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_string())
}

fn cli_args(proxy: &Proxy, pki: &Pki, client: Option<&str>, cmd: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--tls".to_string(),
        "--cacert".to_string(),
        pki.path("ca"),
        "-h".to_string(),
        "127.0.0.1".to_string(),
        "-p".to_string(),
        proxy.addr.port().to_string(),
    ];
    if let Some(name) = client {
        args.extend([
            "--cert".to_string(),
            pki.path(name),
            "--key".to_string(),
            pki.key_path(name),
        ]);
    }
    args.extend(cmd.iter().map(|s| s.to_string()));
    args
}

fn tls_proxy_config(redis: &RedisServer, tls: TlsConfig) -> Config {
    Config {
        backends: vec![BackendConfig::from_address(redis.addr())],
        tls: Some(tls),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_are_served_and_plain_ones_are_not() {
    let redis = RedisServer::start(&[]);
    let pki = Pki::new();
    let proxy = Proxy::start_with(tls_proxy_config(&redis, pki.listener("server", None))).await;

    // A real client: redis-cli over TLS.
    let (ok, out) = redis_cli(cli_args(&proxy, &pki, None, &["SET", "tls:k", "v1"])).await;
    assert!(ok && out == "OK", "redis-cli SET over TLS: {out}");
    let (ok, out) = redis_cli(cli_args(&proxy, &pki, None, &["GET", "tls:k"])).await;
    assert!(ok && out == "v1", "redis-cli GET over TLS: {out}");
    let mut direct = redis.direct().await;
    let v: Option<String> = redis::cmd("GET")
        .arg("tls:k")
        .query_async(&mut direct)
        .await
        .expect("direct GET");
    assert_eq!(v.as_deref(), Some("v1"));

    // The policy applies over TLS as over TCP: refused, connection kept.
    let mut tls = tls_connect(proxy.addr, &pki, "ca", None)
        .await
        .expect("TLS connect");
    tls.send(&resp(&[b"CONFIG", b"SET", b"dir", b"/tmp"])).await;
    let line = tls.read_to_line().await;
    assert!(
        line.starts_with(b"-NOPERM"),
        "{}",
        String::from_utf8_lossy(&line)
    );

    // A deep pipeline and a value bigger than every buffer on the way, in one write:
    // exercises partial TLS reads and writes under backpressure.
    let big = vec![b'x'; 3 * 1024 * 1024 + 17];
    let mut batch = Vec::new();
    for i in 0..2000 {
        batch.extend_from_slice(&resp(&[b"SET", format!("tls:p{i}").as_bytes(), b"v"]));
    }
    batch.extend_from_slice(&resp(&[b"SET", b"tls:big", &big]));
    batch.extend_from_slice(&resp(&[b"GET", b"tls:big"]));
    batch.extend_from_slice(&resp(&[b"PING"]));
    tls.send(&batch).await;
    for _ in 0..2001 {
        tls.expect(b"+OK\r\n").await;
    }
    let mut expected = format!("${}\r\n", big.len()).into_bytes();
    expected.extend_from_slice(&big);
    expected.extend_from_slice(b"\r\n+PONG\r\n");
    let got = tls.read_exact_len(expected.len()).await;
    assert!(got == expected, "big value round trip over TLS differs");

    // A value far beyond one TLS record and every buffer, both ways: each read hands out
    // at most a record, so any per-read cost proportional to the frame shows up here.
    let huge = vec![b'h'; 48 * 1024 * 1024];
    tls.send(&resp(&[b"SET", b"tls:huge", &huge])).await;
    tls.expect(b"+OK\r\n").await;
    tls.send(&resp(&[b"STRLEN", b"tls:huge"])).await;
    tls.expect(format!(":{}\r\n", huge.len()).as_bytes()).await;
    tls.send(&resp(&[b"GET", b"tls:huge"])).await;
    let mut expected = format!("${}\r\n", huge.len()).into_bytes();
    expected.extend_from_slice(&huge);
    expected.extend_from_slice(b"\r\n");
    let got = tls.read_exact_len(expected.len()).await;
    assert!(got == expected, "48 MiB value round trip over TLS differs");

    // QUIT: +OK, then the proxy closes.
    tls.send(&resp(&[b"QUIT"])).await;
    assert_eq!(tls.read_to_close().await, b"+OK\r\n");

    // A plain-TCP client on the TLS port gets no Redis reply: its bytes are not a TLS
    // handshake, so the connection closes.
    let mut plain = Raw::connect(proxy.addr).await;
    plain.send(b"PING\r\n").await;
    let got = plain.read_to_close().await;
    assert!(
        !got.windows(5).any(|w| w == b"+PONG"),
        "plain client answered on a TLS listener: {:?}",
        String::from_utf8_lossy(&got)
    );

    // A client that does not trust the proxy's CA refuses the connection.
    assert!(tls_connect(proxy.addr, &pki, "other-ca", None)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_client_ca_is_set() {
    let redis = RedisServer::start(&[]);
    let pki = Pki::new();
    let proxy =
        Proxy::start_with(tls_proxy_config(&redis, pki.listener("server", Some("ca")))).await;

    let (ok, out) = redis_cli(cli_args(&proxy, &pki, Some("client"), &["PING"])).await;
    assert!(
        ok && out == "PONG",
        "redis-cli with a client certificate: {out}"
    );

    let (_, out) = redis_cli(cli_args(&proxy, &pki, None, &["PING"])).await;
    assert_ne!(out, "PONG", "served without a client certificate");

    assert!(
        refused(tls_connect(proxy.addr, &pki, "ca", None).await).await,
        "a client without a certificate was served"
    );
    assert!(
        refused(tls_connect(proxy.addr, &pki, "ca", Some("other-client")).await).await,
        "a client certificate from another CA was accepted"
    );
    served(&proxy, &pki, "ca", Some("client")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_time_out() {
    let redis = RedisServer::start(&[]);
    let pki = Pki::new();
    let mut listener = pki.listener("server", None);
    listener.handshake_timeout = Duration::from_millis(300);
    let proxy = Proxy::start_with(tls_proxy_config(&redis, listener)).await;

    // Connects and never says hello: closed after the handshake timeout.
    let mut silent = Raw::connect(proxy.addr).await;
    let started = tokio::time::Instant::now();
    assert!(silent.read_to_close().await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));

    served(&proxy, &pki, "ca", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_the_certificate_without_dropping_clients() {
    let redis = RedisServer::start(&[]);
    let pki = Pki::new();
    let proxy = Proxy::start_with(tls_proxy_config(&redis, pki.listener("server", None))).await;
    let mut before = served(&proxy, &pki, "ca", None).await;

    // A bad key path is rejected and the running certificate stays.
    let mut broken = pki.listener("other-server", None);
    broken.key = pki.dir.path().join("missing.key");
    let err = proxy
        .reload(tls_proxy_config(&redis, broken))
        .await
        .expect_err("a missing key must be rejected");
    assert!(err.contains("tls.key"), "{err}");
    assert!(tls_connect(proxy.addr, &pki, "ca", None).await.is_ok());

    proxy
        .reload(tls_proxy_config(&redis, pki.listener("other-server", None)))
        .await
        .expect("reload with the new certificate");
    // New connections get the new certificate...
    served(&proxy, &pki, "other-ca", None).await;
    assert!(tls_connect(proxy.addr, &pki, "ca", None).await.is_err());
    // ...and the connection made before keeps working.
    before.send(b"PING\r\n").await;
    before.expect(b"+PONG\r\n").await;
}

/// SET `key` through the proxy; a direct connection to `redis` then reads it back.
async fn write_lands(proxy: &Proxy, redis: &RedisServer, key: &str) {
    let mut c = proxy.client().await;
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("v")
        .query_async(&mut c)
        .await
        .expect("SET through the proxy");
    let mut direct = redis.direct().await;
    let v: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut direct)
        .await
        .expect("direct GET");
    assert_eq!(v.as_deref(), Some("v"), "{key} did not land on the backend");
}

/// A redis-server with a plain port (for the test's own checks) and a TLS port that
/// requires client certificates from "ca".
fn tls_redis(pki: &Pki) -> (RedisServer, u16) {
    let tls_port = support::free_port();
    let redis = RedisServer::start(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &pki.path("server"),
        "--tls-key-file",
        &pki.key_path("server"),
        "--tls-ca-cert-file",
        &pki.path("ca"),
        "--tls-auth-clients",
        "yes",
    ]);
    (redis, tls_port)
}

fn backend_tls_config(
    tls_port: u16,
    host: &str,
    tls: BackendTlsConfig,
    failover_wait: Duration,
) -> Config {
    let mut config = Config {
        backends: vec![BackendConfig::from_address(format!("{host}:{tls_port}"))],
        backend_tls: Some(tls),
        ..Config::default()
    };
    config.routing.failover_wait = failover_wait;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_over_tls_with_verification_and_client_certificates() {
    let pki = Pki::new();
    let (redis, tls_port) = tls_redis(&pki);
    let good = BackendTlsConfig {
        ca: pki.cert("ca"),
        server_name: None,
        cert: Some(pki.cert("client")),
        key: Some(pki.key("client")),
    };
    // The address is an IP: verified against the certificate's IP addresses.
    let proxy = Proxy::start_with(backend_tls_config(
        tls_port,
        "127.0.0.1",
        good.clone(),
        WAIT,
    ))
    .await;
    write_lands(&proxy, &redis, "btls:k").await;
    let mut direct = redis.direct().await;
    // A session's backend connection and the prober's both came over the TLS port.
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut direct)
        .await
        .expect("CLIENT LIST");
    assert!(
        clients.lines().filter(|l| l.contains("cmd=role")).count() >= 1,
        "no prober connection: {clients}"
    );

    // SNI / verification name override: "localhost" is in the certificate.
    let named = BackendTlsConfig {
        server_name: Some("localhost".into()),
        ..good.clone()
    };
    let proxy2 = Proxy::start_with(backend_tls_config(tls_port, "127.0.0.1", named, WAIT)).await;
    let mut c2 = proxy2.client().await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut c2)
        .await
        .expect("PING via server_name");
    assert_eq!(pong, "PONG");
    drop((proxy, proxy2));

    // Each of these must fail closed: the write is never sent, MASTERDOWN instead.
    for (what, tls) in [
        (
            "wrong CA",
            BackendTlsConfig {
                ca: pki.cert("other-ca"),
                ..good.clone()
            },
        ),
        (
            "name not in the certificate",
            BackendTlsConfig {
                server_name: Some("redis.example.com".into()),
                ..good.clone()
            },
        ),
        (
            "no client certificate",
            BackendTlsConfig {
                cert: None,
                key: None,
                ..good.clone()
            },
        ),
    ] {
        let proxy = Proxy::start_with(backend_tls_config(
            tls_port,
            "127.0.0.1",
            tls,
            Duration::from_millis(200),
        ))
        .await;
        let mut c = proxy.client().await;
        let err = redis::cmd("SET")
            .arg("btls:bad")
            .arg("x")
            .query_async::<()>(&mut c)
            .await
            .expect_err(what);
        assert_eq!(err.code(), Some("MASTERDOWN"), "{what}: {err}");
    }
    let exists: i64 = redis::cmd("EXISTS")
        .arg("btls:bad")
        .query_async(&mut direct)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_end_to_end_both_sides() {
    let pki = Pki::new();
    let (redis, tls_port) = tls_redis(&pki);
    let mut config = backend_tls_config(
        tls_port,
        "localhost",
        BackendTlsConfig {
            ca: pki.cert("ca"),
            server_name: None,
            cert: Some(pki.cert("client")),
            key: Some(pki.key("client")),
        },
        WAIT,
    );
    config.tls = Some(pki.listener("server", None));
    let proxy = Proxy::start_with(config).await;
    let (ok, out) = redis_cli(cli_args(&proxy, &pki, None, &["INCR", "e2e:n"])).await;
    assert!(ok && out == "1", "{out}");
    // Pub/sub over both TLS legs: a push arrives while nothing is sent.
    let mut sub = tls_connect(proxy.addr, &pki, "ca", None)
        .await
        .expect("TLS connect");
    sub.send(&resp(&[b"SUBSCRIBE", b"e2e:ch"])).await;
    sub.read_until(b":1\r\n").await;
    let mut direct = redis.direct().await;
    wait_until("the subscriber is registered", || {
        let mut direct = direct.clone();
        async move {
            let n: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("e2e:ch")
                .query_async(&mut direct)
                .await
                .unwrap_or_default();
            n.first().is_some_and(|(_, n)| *n == 1)
        }
    })
    .await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("e2e:ch")
        .arg("hello")
        .query_async(&mut direct)
        .await
        .expect("PUBLISH");
    sub.read_until(b"hello\r\n").await;
}

#[test]
fn check_config_loads_the_certificates() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.toml");
    let write = |key: &Path| {
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:0\"\n[[backends]]\naddress = \"127.0.0.1:6379\"\n[tls]\ncert = {:?}\nkey = {:?}\n",
                pki.cert("server"),
                key
            ),
        )
        .expect("write config");
    };
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .expect("run portcullis")
    };
    write(&pki.key("server"));
    let ok = check();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    write(&pki.key("missing"));
    let bad = check();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("tls.key"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_client_with_tls_client_certificate_and_auth() {
    use sha2::{Digest, Sha256};
    let redis = RedisServer::start(&[]);
    let pki = Pki::new();
    let mut config = tls_proxy_config(&redis, pki.listener("server", Some("ca")));
    config.users = vec![portcullis::auth::UserConfig {
        name: "app".into(),
        password_sha256: format!("{:x}", Sha256::digest(b"app-secret")),
        allow: Vec::new(),
        deny: Vec::new(),
    }];
    let proxy = Proxy::start_with(config).await;
    let read = |path: PathBuf| std::fs::read(path).expect("read PEM");
    let certs = |client: bool| redis::TlsCertificates {
        client_tls: client.then(|| redis::ClientTlsConfig {
            client_cert: read(pki.cert("client")),
            client_key: read(pki.key("client")),
        }),
        root_cert: Some(read(pki.cert("ca"))),
    };
    let port = proxy.addr.port();

    // The application's client: rediss:// with the proxy's CA, its client certificate,
    // and AUTH as a proxy user (HELLO 3 AUTH, as redis-rs sends it for RESP3 URLs).
    let url = format!("rediss://app:app-secret@127.0.0.1:{port}/?protocol=resp3");
    let client = redis::Client::build_with_tls(url.as_str(), certs(true)).expect("TLS client");
    let mut c = tokio::time::timeout(WAIT, client.get_multiplexed_async_connection())
        .await
        .expect("connect in time")
        .expect("TLS + AUTH through the proxy");
    let _: () = redis::cmd("SET")
        .arg("rs:k")
        .arg("v")
        .query_async(&mut c)
        .await
        .expect("SET");
    let v: String = redis::cmd("GET")
        .arg("rs:k")
        .query_async(&mut c)
        .await
        .expect("GET");
    assert_eq!(v, "v");
    let err = redis::cmd("CONFIG")
        .arg("SET")
        .arg("dir")
        .arg("/tmp")
        .query_async::<()>(&mut c)
        .await
        .expect_err("CONFIG SET dir is refused");
    assert_eq!(err.code(), Some("NOPERM"), "{err}");

    // Wrong password: refused at the proxy (redis-rs reports WRONGPASS as an
    // authentication failure).
    let bad = format!("rediss://app:nope@127.0.0.1:{port}/");
    let client = redis::Client::build_with_tls(bad.as_str(), certs(true)).expect("TLS client");
    let err = match tokio::time::timeout(WAIT, client.get_multiplexed_async_connection())
        .await
        .expect("answer in time")
    {
        Ok(mut c) => redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .expect_err("unauthenticated PING"),
        Err(e) => e,
    };
    assert!(
        err.kind() == redis::ErrorKind::AuthenticationFailed
            || err.to_string().contains("WRONGPASS"),
        "{err}"
    );

    // No client certificate: the handshake (or the first exchange) fails.
    let url = format!("rediss://app:app-secret@127.0.0.1:{port}/");
    let client = redis::Client::build_with_tls(url.as_str(), certs(false)).expect("TLS client");
    let refused = match tokio::time::timeout(WAIT, client.get_multiplexed_async_connection())
        .await
        .expect("answer in time")
    {
        Err(_) => true,
        Ok(mut c) => redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_err(),
    };
    assert!(refused, "served without a client certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_over_tls_names_a_tls_master() {
    let pki = Pki::new();
    let (master, tls_port) = tls_redis(&pki);
    let sentinel_tls_port = support::free_port();
    // The Sentinel monitors the master's TLS port over TLS and serves TLS itself.
    let sentinel = support::start_sentinel_with(
        "tlsmaster",
        tls_port,
        &format!(
            "tls-port {sentinel_tls_port}\ntls-cert-file {}\ntls-key-file {}\n\
             tls-ca-cert-file {}\ntls-replication yes\n\
             tls-client-cert-file {}\ntls-client-key-file {}\n",
            pki.path("server"),
            pki.key_path("server"),
            pki.path("ca"),
            pki.path("client"),
            pki.key_path("client"),
        ),
    );
    let mut config = Config {
        sentinel: Some(portcullis::config::SentinelConfig {
            addresses: vec![format!("127.0.0.1:{sentinel_tls_port}")],
            master_name: "tlsmaster".into(),
            username: None,
            password: None,
            backend_username: None,
            backend_password: None,
            tls: true,
        }),
        backend_tls: Some(BackendTlsConfig {
            ca: pki.cert("ca"),
            server_name: None,
            cert: Some(pki.cert("client")),
            key: Some(pki.key("client")),
        }),
        ..Config::default()
    };
    config.routing.failover_wait = WAIT;
    let proxy = Proxy::start_with(config).await;
    // Sentinel-named master, every leg over TLS.
    write_lands(&proxy, &master, "sentinel:tls").await;
    drop(sentinel);
}
