//! A real Redis Cluster on loopback: `redis-server --cluster-enabled yes` nodes on
//! reserved test ports (each with its bus port, +10000, reserved too), joined by
//! `redis-cli --cluster create ... --cluster-replicas N --cluster-yes`, awaited by polling
//! `CLUSTER INFO` on every node until `cluster_state:ok` (deadline, no bare sleeps), and
//! stopped by pid on drop.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::{wait_until, RedisServer};

/// A loopback port whose bus port (+10000) is free and reserved too (`reserve_ports`).
pub fn cluster_port() -> u16 {
    super::reserve_ports(&[0, 10_000])
}

/// One cluster node serving all 16384 slots (`CLUSTER ADDSLOTSRANGE 0 16383`): what the
/// proxy presents itself as, so the reference for what it answers. Waits for
/// `cluster_state:ok`.
pub async fn one_node_cluster() -> RedisServer {
    let node = (0..5)
        .find_map(|_| RedisServer::try_start_bin("redis-server", cluster_port(), &node_args()))
        .expect("redis-server did not start in cluster mode");
    let addr = node.addr();
    assert_eq!(
        info(&addr, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]).await,
        "OK"
    );
    wait_cluster_ok(&addr, &format!("cluster_state:ok on {addr}")).await;
    node
}

/// The cluster's nodes.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// Arguments of a cluster node (its config file lives in its own temp dir).
pub fn node_args() -> Vec<&'static str> {
    vec![
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
    ]
}

impl RedisCluster {
    /// Start `masters` masters with `replicas` replicas each and wait until every node
    /// says `cluster_state:ok` and knows every other node.
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_bin("redis-server", masters, replicas).await
    }

    /// The same with another server binary (valkey-server).
    pub async fn start_bin(bin: &str, masters: usize, replicas: usize) -> RedisCluster {
        let n = masters * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                (0..5)
                    .find_map(|_| RedisServer::try_start_bin(bin, cluster_port(), &node_args()))
                    .unwrap_or_else(|| panic!("{bin} did not start in cluster mode"))
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(node.addr());
        }
        let status = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli installed");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        cluster.wait_ok().await;
        cluster
    }

    /// Add an empty master (`redis-cli --cluster add-node`) and wait until every node knows
    /// it; returns its address.
    pub async fn add_master(&mut self) -> String {
        let node = RedisServer::start_on(cluster_port(), &node_args());
        let addr = node.addr();
        let seed = self.nodes[0].addr();
        let (a, s) = (addr.clone(), seed.clone());
        let status = tokio::task::spawn_blocking(move || {
            Command::new("redis-cli")
                .args(["--cluster", "add-node", &a, &s])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        })
        .await
        .expect("add-node ran")
        .expect("redis-cli installed");
        assert!(status.success(), "redis-cli --cluster add-node failed");
        self.nodes.push(node);
        self.wait_ok().await;
        addr
    }

    /// Wait until every running node reports `cluster_state:ok` and knows all nodes, and
    /// every replica's link to its master is up.
    pub async fn wait_ok(&self) {
        let n = self.nodes.len();
        for node in &self.nodes {
            let addr = node.addr();
            wait_until(&format!("cluster_state:ok on {addr}"), || {
                let addr = addr.clone();
                async move {
                    let info = info(&addr, &["CLUSTER", "INFO"]).await;
                    info.contains("cluster_state:ok")
                        && info.contains(&format!("cluster_known_nodes:{n}\r"))
                }
            })
            .await;
            wait_until(&format!("replication settled on {addr}"), || {
                let addr = addr.clone();
                async move {
                    let repl = info(&addr, &["INFO", "replication"]).await;
                    repl.contains("role:master") || repl.contains("master_link_status:up")
                }
            })
            .await;
        }
    }

    /// Seeds for the proxy's `[cluster]`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().take(2).map(|n| n.addr()).collect()
    }

    /// The node at `addr`.
    pub fn node(&self, addr: &str) -> Option<&RedisServer> {
        self.nodes.iter().find(|n| n.addr() == addr)
    }

    /// The node at `addr`, to stop or signal it.
    pub fn node_mut(&mut self, addr: &str) -> Option<&mut RedisServer> {
        self.nodes.iter_mut().find(|n| n.addr() == addr)
    }

    /// The address of the master serving `slot`, read from a node's `CLUSTER SHARDS`
    /// view via `CLUSTER NODES` (`<id> <ip:port@bus> <flags> ... <slots>`).
    pub async fn master_of(&self, slot: u16) -> String {
        let text = info(&self.nodes[0].addr(), &["CLUSTER", "NODES"]).await;
        for line in text.lines() {
            let f: Vec<&str> = line.split_ascii_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            for range in &f[8..] {
                if range.starts_with('[') {
                    continue;
                }
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                    if (a..=b).contains(&slot) {
                        return f[1].split('@').next().unwrap_or_default().to_string();
                    }
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// Node ids by address (`CLUSTER NODES` of the first node).
    pub async fn node_id(&self, addr: &str) -> String {
        let text = info(&self.nodes[0].addr(), &["CLUSTER", "NODES"]).await;
        text.lines()
            .find_map(|line| {
                let f: Vec<&str> = line.split_ascii_whitespace().collect();
                (f.len() > 1 && f[1].split('@').next() == Some(addr)).then(|| f[0].to_string())
            })
            .unwrap_or_else(|| panic!("no node {addr}"))
    }
}

/// A command's reply as text (bulk or verbatim), on a fresh direct connection.
pub async fn info(addr: &str, args: &[&str]) -> String {
    let Ok(client) = redis::Client::open(format!("redis://{addr}/")) else {
        return String::new();
    };
    let Ok(Ok(mut c)) = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return String::new();
    };
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match tokio::time::timeout(
        Duration::from_secs(2),
        cmd.query_async::<redis::Value>(&mut c),
    )
    .await
    {
        Ok(Ok(redis::Value::BulkString(b))) => String::from_utf8_lossy(&b).into_owned(),
        Ok(Ok(redis::Value::VerbatimString { text, .. })) => text,
        Ok(Ok(redis::Value::SimpleString(s))) => s,
        Ok(Ok(redis::Value::Okay)) => "OK".to_string(),
        _ => String::new(),
    }
}

/// Wait until `addr` (a node, or the proxy's own CLUSTER INFO) answers
/// `cluster_state:ok`.
pub async fn wait_cluster_ok(addr: &str, what: &str) {
    let addr = addr.to_string();
    wait_until(what, || {
        let addr = addr.clone();
        async move {
            info(&addr, &["CLUSTER", "INFO"])
                .await
                .contains("cluster_state:ok")
        }
    })
    .await;
}
