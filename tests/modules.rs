//! Commands the built-in table does not know, learned from the backend's own `COMMAND`
//! metadata: a test module (`tests/module/testmod.c`, built with the system C compiler
//! and loaded with `--loadmodule`) with a read, a write, a blocking and a config-style
//! command, and renamed core commands. Checks routing from the learned flags
//! (`prefer-replica`), the static policy (unknown modules refused until allowed by name
//! or category, their config subcommands refused either way), and that every reply
//! through the proxy is Redis's own.

mod support;

use portcullis::config::{BackendConfig, Config, ReadPolicy};
use portcullis::policy::ProtectionConfig;
use support::{cmdstat, resp, test_module, valkey_server, wait_until, Proxy, Raw, RedisServer};

/// Send one command and read its whole reply (up to a following PING's PONG).
async fn call(c: &mut Raw, args: &[&str]) -> String {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    c.send(&resp(&args)).await;
    c.send(b"PING\r\n").await;
    let mut r = c.read_until(b"+PONG\r\n").await;
    r.truncate(r.len() - 7);
    String::from_utf8_lossy(&r).into_owned()
}

async fn raw(r: &RedisServer) -> Raw {
    Raw::connect(r.addr().parse().expect("addr")).await
}

fn config(backends: &[&RedisServer], allow: &[&str], reads: ReadPolicy) -> Config {
    let mut cfg = Config {
        backends: backends
            .iter()
            .map(|b| BackendConfig::from_address(b.addr()))
            .collect(),
        protection: ProtectionConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ..ProtectionConfig::default()
        },
        ..Config::default()
    };
    cfg.routing.reads = reads;
    cfg
}

/// Wait until the proxy has read the backend's metadata: the module command is no
/// longer answered as unknown.
async fn learned(proxy: &Proxy, probe: &[&str]) {
    let addr = proxy.addr;
    let probe: Vec<String> = probe.iter().map(|s| s.to_string()).collect();
    wait_until("metadata learned from the backend", || {
        let probe = probe.clone();
        async move {
            let mut c = Raw::connect(addr).await;
            let args: Vec<&str> = probe.iter().map(String::as_str).collect();
            !call(&mut c, &args)
                .await
                .starts_with("-ERR unknown command")
        }
    })
    .await;
}

fn noperm(reply: &str) -> bool {
    reply.starts_with("-NOPERM ") && reply.contains("portcullis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_module_is_refused_until_allowed() {
    let module = test_module();
    let redis = RedisServer::start(&["--loadmodule", &module]);
    let proxy = Proxy::start_with(config(&[&redis], &[], ReadPolicy::Master)).await;
    learned(&proxy, &["testmod.read", "k"]).await;
    let mut c = proxy.raw().await;
    for args in [
        &["testmod.read", "k"][..],
        &["TESTMOD.WRITE", "k", "v"],
        &["testmod.block", "10"],
        &["testmod.config", "set", "a", "b"],
        &["testmod.config", "GET", "a"],
    ] {
        let got = call(&mut c, args).await;
        assert!(noperm(&got), "{args:?}: {got:?}");
    }
    let got = call(&mut c, &["testmod.write", "k", "v"]).await;
    assert!(got.contains("module portcullis does not know"), "{got}");
    // An unknown subcommand of the learned container: Redis's own text shape.
    let got = call(&mut c, &["testmod.config", "nope"]).await;
    assert!(got.starts_with("-ERR unknown subcommand"), "{got}");
    // Nothing reached Redis.
    let mut d = raw(&redis).await;
    assert_eq!(call(&mut d, &["EXISTS", "k"]).await, ":0\r\n");
    assert_eq!(cmdstat(&redis, "testmod.write").await, 0);
    // MODULE LIST (clients probe modules at start) answers as Redis does.
    assert_eq!(
        call(&mut c, &["MODULE", "LIST"]).await,
        call(&mut d, &["MODULE", "LIST"]).await
    );
    // MODULE LOAD stays refused.
    assert!(noperm(&call(&mut c, &["MODULE", "LOAD", &module]).await));
}

/// Allowed by name: the read goes to the replica under `prefer-replica`, the write and
/// the blocking command only to the master (flags learned from COMMAND); the config
/// subcommands stay refused unless one is named exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_module_commands_are_routed_by_their_learned_flags() {
    let module = test_module();
    let master = RedisServer::start(&["--loadmodule", &module]);
    let replica = RedisServer::start(&[
        "--loadmodule",
        &module,
        "--replicaof",
        "127.0.0.1",
        &master.port.to_string(),
    ]);
    support::wait_replica_linked(&replica).await;
    let mut dm = raw(&master).await;
    assert_eq!(call(&mut dm, &["SET", "mk", "mv"]).await, "+OK\r\n");
    assert_eq!(call(&mut dm, &["WAIT", "1", "5000"]).await, ":1\r\n");
    let proxy = Proxy::start_with(config(
        &[&master, &replica],
        &[
            "testmod.read",
            "testmod.write",
            "testmod.block",
            "testmod.config|get",
        ],
        ReadPolicy::PreferReplica,
    ))
    .await;
    learned(&proxy, &["testmod.read", "mk"]).await;
    // The replica is confirmed for reads once a read lands there.
    let addr = proxy.addr;
    let replica_ref = &replica;
    wait_until("reads reach the replica", || async move {
        let mut c = Raw::connect(addr).await;
        let _ = call(&mut c, &["testmod.read", "mk"]).await;
        cmdstat(replica_ref, "testmod.read").await > 0
    })
    .await;

    let mut c = proxy.raw().await;
    let reads_on_master = cmdstat(&master, "testmod.read").await;
    let reads_on_replica = cmdstat(&replica, "testmod.read").await;
    let want = call(&mut dm, &["testmod.read", "mk"]).await;
    for _ in 0..5 {
        assert_eq!(call(&mut c, &["testmod.read", "mk"]).await, want);
    }
    assert_eq!(
        cmdstat(&replica, "testmod.read").await,
        reads_on_replica + 5,
        "the readonly module command goes to the replica"
    );
    // (+1: the direct call above.)
    assert_eq!(cmdstat(&master, "testmod.read").await, reads_on_master + 1);

    // The write: only the master runs it.
    assert_eq!(
        call(&mut c, &["testmod.write", "wk", "wv"]).await,
        "+OK\r\n"
    );
    assert_eq!(cmdstat(&master, "testmod.write").await, 1);
    assert_eq!(cmdstat(&replica, "testmod.write").await, 0);
    assert_eq!(call(&mut dm, &["GET", "wk"]).await, "$2\r\nwv\r\n");

    // The blocking one: flagged readonly too, but blocking, so the master runs it; the
    // reply arrives after the block, in order with what follows.
    let want = call(&mut dm, &["testmod.block", "30"]).await;
    assert_eq!(want, "+TIMEDOUT\r\n");
    assert_eq!(call(&mut c, &["testmod.block", "30"]).await, want);
    assert_eq!(cmdstat(&master, "testmod.block").await, 2);
    assert_eq!(cmdstat(&replica, "testmod.block").await, 0);

    // Config subcommands: `get` named exactly is allowed, `set` (flagged "write" by the
    // module) stays refused.
    assert_eq!(
        call(&mut c, &["testmod.config", "get", "x"]).await,
        call(&mut dm, &["testmod.config", "get", "x"]).await
    );
    let got = call(&mut c, &["testmod.config", "set", "x", "y"]).await;
    assert!(noperm(&got) && got.contains("control"), "{got}");
    assert_eq!(cmdstat(&master, "testmod.config|set").await, 0);

    // Inside MULTI, learned commands queue and run like any other.
    c.send(&resp(&[b"MULTI"])).await;
    c.send(&resp(&[b"testmod.write", b"tk", b"1"])).await;
    c.send(&resp(&[b"testmod.read", b"tk"])).await;
    c.send(&resp(&[b"EXEC"])).await;
    c.expect(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n$1\r\n1\r\n")
        .await;
}

/// Allowed by the module's own ACL category (Valkey and Redis >= 7.4 let modules add
/// one); the config subcommands stay refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_allowed_by_category_keeps_its_config_refused() {
    let Some(valkey) = valkey_server() else {
        eprintln!("skipped: no valkey-server (scripts/test.sh installs one; or set PORTCULLIS_TEST_VALKEY)");
        return;
    };
    let module = test_module();
    let server = RedisServer::start_bin(&valkey, &["--loadmodule", &module]);
    let mut d = raw(&server).await;
    let info = call(&mut d, &["COMMAND", "INFO", "testmod.read"]).await;
    assert!(info.contains("@testmod"), "{info}");
    let proxy = Proxy::start_with(config(&[&server], &["@testmod"], ReadPolicy::Master)).await;
    learned(&proxy, &["testmod.read", "k"]).await;
    let mut c = proxy.raw().await;
    for args in [
        &["testmod.write", "k", "v"][..],
        &["testmod.read", "k"],
        &["testmod.block", "20"],
    ] {
        let got = call(&mut c, args).await;
        let want = call(&mut d, args).await;
        assert_eq!(got, want, "{args:?}");
        assert!(!got.starts_with('-'), "{args:?}: {got}");
    }
    for args in [
        &["testmod.config", "set", "a", "b"][..],
        &["testmod.config", "get", "a"],
    ] {
        let got = call(&mut c, args).await;
        assert!(noperm(&got), "{args:?}: {got}");
    }
    // Another category allows nothing of it.
    drop(c);
    let proxy = Proxy::start_with(config(&[&server], &["@json"], ReadPolicy::Master)).await;
    learned(&proxy, &["testmod.read", "k"]).await;
    let mut c = proxy.raw().await;
    assert!(noperm(&call(&mut c, &["testmod.read", "k"]).await));
}

/// Core commands of a server newer than (or different from) the built-in table: Valkey's
/// own commands are absent from the table (it follows Redis's metadata) and present in
/// the server's. The proxy learns them: a write goes to the master, a read to the
/// replica under `prefer-replica`, a new CLIENT subcommand passes, and an admin one
/// (`COMMANDLOG`, Valkey's SLOWLOG successor) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_commands_only_the_server_knows_are_learned() {
    let Some(valkey) = valkey_server() else {
        eprintln!("skipped: no valkey-server (scripts/test.sh installs one; or set PORTCULLIS_TEST_VALKEY)");
        return;
    };
    for name in ["delifeq", "clusterscan", "commandlog", "client|capa"] {
        assert!(
            portcullis::command::lookup_name(name).is_none(),
            "{name} is in the built-in table: pick another command for this test"
        );
    }
    let master = RedisServer::start_bin(&valkey, &[]);
    let mp = master.port.to_string();
    let replica = RedisServer::start_bin(&valkey, &["--replicaof", "127.0.0.1", &mp]);
    support::wait_replica_linked(&replica).await;
    let mut dm = raw(&master).await;
    let mut dr = raw(&replica).await;
    assert_eq!(call(&mut dm, &["SET", "a", "1"]).await, "+OK\r\n");
    assert_eq!(call(&mut dm, &["SET", "b", "2"]).await, "+OK\r\n");
    assert_eq!(call(&mut dm, &["WAIT", "1", "5000"]).await, ":1\r\n");
    let proxy =
        Proxy::start_with(config(&[&master, &replica], &[], ReadPolicy::PreferReplica)).await;
    learned(&proxy, &["DELIFEQ", "nokey", "x"]).await;
    let mut c = proxy.raw().await;

    // A write only the server knows: to the master, Redis's (Valkey's) own replies.
    let before = cmdstat(&master, "delifeq").await;
    assert_eq!(call(&mut c, &["DELIFEQ", "a", "other"]).await, ":0\r\n");
    assert_eq!(call(&mut c, &["delifeq", "a", "1"]).await, ":1\r\n");
    assert_eq!(call(&mut dm, &["EXISTS", "a"]).await, ":0\r\n");
    assert_eq!(cmdstat(&master, "delifeq").await, before + 2);
    assert_eq!(cmdstat(&replica, "delifeq").await, 0);

    // A read only the server knows: to the replica.
    let addr = proxy.addr;
    let replica_ref = &replica;
    wait_until("learned read reaches the replica", || async move {
        let mut c = Raw::connect(addr).await;
        let _ = call(&mut c, &["CLUSTERSCAN", "0"]).await;
        cmdstat(replica_ref, "clusterscan").await > 0
    })
    .await;
    let on_master = cmdstat(&master, "clusterscan").await;
    let want = call(&mut dr, &["CLUSTERSCAN", "0"]).await;
    assert_eq!(call(&mut c, &["CLUSTERSCAN", "0"]).await, want);
    assert_eq!(cmdstat(&master, "clusterscan").await, on_master);

    // A new subcommand of a built-in container that clients send on connect.
    assert_eq!(
        call(&mut c, &["CLIENT", "CAPA", "redirect"]).await,
        call(&mut dm, &["CLIENT", "CAPA", "redirect"]).await
    );
    // An admin one (reads other clients' commands): refused.
    let got = call(&mut c, &["COMMANDLOG", "GET", "10", "slow"]).await;
    assert!(noperm(&got), "{got}");
}

/// After a restart (here: a different server at the same address, now with the module
/// loaded), the proxy reads the metadata again: the module's commands go from unknown to
/// known (refused by policy, or allowed and answered by Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_read_again_after_a_restart() {
    let module = test_module();
    let mut plain = RedisServer::start(&[]);
    let port = plain.port;
    let proxy = Proxy::start_with(config(&[&plain], &["testmod.read"], ReadPolicy::Master)).await;
    let mut c = proxy.raw().await;
    // Before: the server has no such commands, neither has the proxy.
    wait_until("proxy serves", || async {
        let mut c = Raw::connect(proxy.addr).await;
        call(&mut c, &["SET", "k", "v"]).await == "+OK\r\n"
    })
    .await;
    let got = call(&mut c, &["testmod.read", "k"]).await;
    assert!(
        got.starts_with("-ERR unknown command 'testmod.read'"),
        "{got}"
    );
    drop(c);

    plain.kill();
    let with_module = RedisServer::start_on(port, &["--loadmodule", &module]);
    let mut d = raw(&with_module).await;
    assert_eq!(call(&mut d, &["SET", "k", "v2"]).await, "+OK\r\n");
    learned(&proxy, &["testmod.read", "k"]).await;
    let mut c = proxy.raw().await;
    assert_eq!(call(&mut c, &["testmod.read", "k"]).await, "$2\r\nv2\r\n");
    let got = call(&mut c, &["testmod.write", "k", "x"]).await;
    assert!(noperm(&got), "{got}");
}

/// Redis's own data modules (RedisJSON, RediSearch, RedisBloom from Redis Stack 7.4,
/// loaded into Valkey): their data commands pass by default and answer as the server
/// does; their control, debug and internal commands (`FT.CONFIG`, `FT.DEBUG`,
/// `JSON.DEBUG`, `BF.DEBUG`, `FT._DROPIFX`, ...) are refused; `FT._LIST` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_module_data_commands_pass_and_their_control_is_refused() {
    let (Some(valkey), Some(dir)) = (
        valkey_server(),
        std::env::var("PORTCULLIS_TEST_STACK_MODULES").ok(),
    ) else {
        eprintln!("skipped: needs valkey-server and PORTCULLIS_TEST_STACK_MODULES (scripts/test.sh installs both)");
        return;
    };
    let module = |name: &str| format!("{dir}/{name}");
    let (json, search, bloom) = (
        module("rejson.so"),
        module("redisearch.so"),
        module("redisbloom.so"),
    );
    let server = RedisServer::start_bin(
        &valkey,
        &[
            "--loadmodule",
            &json,
            "--loadmodule",
            &search,
            "--loadmodule",
            &bloom,
        ],
    );
    let proxy = Proxy::start_with(config(&[&server], &[], ReadPolicy::Master)).await;
    learned(&proxy, &["JSON.GET", "nokey"]).await;
    let mut c = proxy.raw().await;
    let mut d = raw(&server).await;

    // Data commands: through the proxy (first) and directly (then, on other keys or the
    // same reads) the replies are the server's own.
    let same = [
        &["JSON.SET", "doc", "$", r#"{"a":1,"b":[1,2]}"#][..],
        &["JSON.GET", "doc", "$.b"],
        &["json.arrappend", "doc", "$.b", "3"],
        &["JSON.TYPE", "doc", "$.a"],
        &["BF.ADD", "bf", "x"],
        &["BF.EXISTS", "bf", "x"],
        &["CF.ADD", "cf", "x"],
        &["CMS.INITBYDIM", "cms", "10", "2"],
        &["CMS.INCRBY", "cms", "a", "3"],
        &["TOPK.RESERVE", "tk", "2"],
        &["TDIGEST.CREATE", "td"],
        &["TDIGEST.ADD", "td", "1", "2", "3"],
        &["HSET", "d:1", "t", "hello world"],
        &[
            "FT.CREATE",
            "idx",
            "ON",
            "HASH",
            "PREFIX",
            "1",
            "d:",
            "SCHEMA",
            "t",
            "TEXT",
        ],
    ];
    for args in same {
        let got = call(&mut c, args).await;
        assert!(!got.starts_with('-'), "{args:?}: {got}");
    }
    for args in [
        &["JSON.GET", "doc", "$"][..],
        &["BF.EXISTS", "bf", "x"],
        &["BF.EXISTS", "bf", "y"],
        &["CMS.QUERY", "cms", "a"],
        &["TDIGEST.MAX", "td"],
        &["FT._LIST"],
        &["FT.TAGVALS", "idx", "nope"],
    ] {
        assert_eq!(
            call(&mut c, args).await,
            call(&mut d, args).await,
            "{args:?}"
        );
    }
    wait_until("index built", || async {
        let mut d = raw(&server).await;
        call(&mut d, &["FT.SEARCH", "idx", "hello"])
            .await
            .starts_with("*3\r\n:1\r\n")
    })
    .await;
    assert_eq!(
        call(&mut c, &["FT.SEARCH", "idx", "hello"]).await,
        call(&mut d, &["FT.SEARCH", "idx", "hello"]).await
    );

    // Control, debug, internal: refused, and nothing changed.
    let timeout_before = call(&mut d, &["FT.CONFIG", "GET", "TIMEOUT"]).await;
    let indexes_before = call(&mut d, &["FT._LIST"]).await;
    assert!(indexes_before.contains("idx"), "{indexes_before}");
    for args in [
        &["FT.CONFIG", "SET", "TIMEOUT", "1"][..],
        &["FT.CONFIG", "GET", "TIMEOUT"],
        &["FT.DEBUG", "DOCINFO", "idx", "d:1"],
        &["FT._DROPIFX", "idx"],
        &["FT._DROPINDEXIFX", "idx"],
        &["JSON.DEBUG", "MEMORY", "doc"],
        &["BF.DEBUG", "bf"],
        &["CF.DEBUG", "cf"],
    ] {
        let got = call(&mut c, args).await;
        assert!(noperm(&got), "{args:?}: {got}");
    }
    assert_eq!(
        call(&mut d, &["FT.CONFIG", "GET", "TIMEOUT"]).await,
        timeout_before
    );
    assert_eq!(call(&mut d, &["FT._LIST"]).await, indexes_before);
}
