"""redis-py's cluster client (``redis.cluster.RedisCluster``) pointed at portcullis in
cluster mode: it reads ``CLUSTER SLOTS`` from the proxy, sees one node serving every slot,
and never learns the real nodes' addresses; keys in every shard work, and so do its
multi-key helpers and pipelines.

Starts a 3-master Redis Cluster (``redis-server --cluster-enabled yes`` on free port pairs,
``redis-cli --cluster create``, ``cluster_state:ok`` polled) and the proxy binary with
``--cluster-seed``; every process is stopped by pid at the end. Run with
``bash scripts/py-test.sh``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from test_compat import REPO_ROOT, _child_env, _stop, _tail, free_port, reserve_ports, wait_until


def _port_pair() -> int:
    """A reserved port whose cluster bus port (+10000) is reserved too."""
    return reserve_ports((0, 10000))


def _cluster_ok(port: int) -> bool:
    c = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        info = c.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and "cluster_known_nodes:3" in text
    finally:
        c.close()


@pytest.fixture(scope="module")
def proxy_port():
    redis_bin = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if redis_bin is None or cli is None:
        pytest.fail("redis-server and redis-cli are required")
    proxy_bin = Path(os.environ.get("PORTCULLIS_BIN", "target/debug/portcullis"))
    if not proxy_bin.is_absolute():
        proxy_bin = REPO_ROOT / proxy_bin
    workdir = Path(tempfile.mkdtemp(prefix="portcullis-pytest-cluster-"))
    procs: list[subprocess.Popen] = []
    try:
        ports = [_port_pair() for _ in range(3)]
        for p in ports:
            d = workdir / str(p)
            d.mkdir()
            procs.append(subprocess.Popen(
                [redis_bin, "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--dir", str(d)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in ports:
            wait_until(lambda p=p: redis.Redis(port=p, socket_timeout=1).ping(), f"redis-server on {p}")
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in ports:
            wait_until(lambda p=p: _cluster_ok(p), f"cluster_state:ok on {p}")
        port = free_port()
        log_path = workdir / "proxy.log"
        log = open(log_path, "wb")
        procs.append(subprocess.Popen(
            [str(proxy_bin), "--listen", f"127.0.0.1:{port}", "--admin-listen", "",
             "--cluster-seed", f"127.0.0.1:{ports[0]}", "--cluster-seed", f"127.0.0.1:{ports[1]}"],
            stdout=log, stderr=subprocess.STDOUT, env=_child_env()))
        try:
            wait_until(lambda: _cluster_ok_proxy(port), "the proxy serving every slot")
        except AssertionError:
            raise AssertionError(_tail(log_path))
        yield port, ports
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(workdir, ignore_errors=True)


def _cluster_ok_proxy(port: int) -> bool:
    c = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        text = c.execute_command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else str(text)
        return "cluster_state:ok" in text
    finally:
        c.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_cluster_client_through_the_proxy(proxy_port, protocol):
    port, node_ports = proxy_port
    rc = RedisCluster(host="127.0.0.1", port=port, protocol=protocol, socket_timeout=5)
    try:
        # One node: the proxy itself; the real nodes stay hidden.
        nodes = rc.get_nodes()
        assert [(n.host, n.port) for n in nodes] == [("127.0.0.1", port)]
        keys = [f"py:{protocol}:{i}" for i in range(200)]
        for k in keys:
            assert rc.set(k, k) is True
        for k in keys:
            assert rc.get(k) == k.encode()
        # Keys spread over every shard (checked directly on the nodes).
        for p in node_ports:
            assert redis.Redis(port=p).dbsize() > 0
        assert rc.mget_nonatomic(keys[:50]) == [k.encode() for k in keys[:50]]
        pipe = rc.pipeline()
        for k in keys[:20]:
            pipe.incr(f"{k}:n")
        assert pipe.execute() == [1] * 20
        assert rc.delete(*keys[:10]) == 10
        assert rc.exists(*keys[:20]) == 10
    finally:
        rc.close()
