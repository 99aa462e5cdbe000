"""Compatibility suite: what a real application does with redis-py, run THROUGH portcullis.

A session fixture starts its own ``redis-server`` and the proxy binary (``PORTCULLIS_BIN``,
default ``target/debug/portcullis``) on ephemeral loopback ports, waits for each by polling
with a deadline, and stops both by pid at the end. Every test gets a proxied client (the
thing under test) and a direct client (to check side effects on the backend), and uses its
own key prefix, so tests do not depend on each other.

Not covered: CLIENT REPLY OFF/SKIP (redis-py cannot drive it without desynchronising its own
reply reading) and FCALL (FUNCTION LOAD is refused by the proxy; that refusal is tested).

Run with ``bash scripts/py-test.sh``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError, WatchError

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Upper bound for any single wait (startup, a pub/sub message, a blocked client showing up).
WAIT_S = 10.0
#: Socket timeout on every client, so a proxy that hangs fails a test instead of the run.
SOCKET_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------------
# helpers


#: Lock files of the ports this process reserved, open (so locked) until it exits.
_HELD_PORTS: list = []


def _test_port_range(span: int) -> tuple[int, int]:
    """A port range outside the kernel's ephemeral range with room for ``span`` above each
    base port (the same rule as ``tests/support/mod.rs``: ``test_port_range``)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first, last = (int(n) for n in f.read().split()[:2])
    except (OSError, ValueError):
        first, last = 32768, 60999
    below = (10000, max(first, 10000))
    above = (max(last + 1, 10000), 65535)
    size = lambda r: max(r[1] - r[0], 0)  # noqa: E731
    larger, smaller = (below, above) if size(below) >= size(above) else (above, below)
    for r in (larger, smaller, (1024, max(first, 1024))):
        if size(r) > span + 500:
            return r
    raise AssertionError(f"no test port range outside the ephemeral range {first}-{last}")


def reserve_ports(offsets: tuple[int, ...] = (0,)) -> int:
    """A port ``p`` such that every ``p + offset`` is free and reserved for this process.

    Ports come from outside the kernel's ephemeral range, so a port freed by a server a
    test killed is never handed to another listener or outgoing connection while a proxy
    still points at it; each is locked (flock) in ``$TMPDIR/portcullis-test-ports``, shared
    with the Rust harness, until the process exits."""
    import fcntl
    import random

    span = max(offsets)
    lo, hi = _test_port_range(span)
    lock_dir = Path(tempfile.gettempdir()) / "portcullis-test-ports"
    lock_dir.mkdir(exist_ok=True)
    for _ in range(10000):
        base = random.randrange(lo, hi - span)
        locks = []
        for off in offsets:
            f = open(lock_dir / str(base + off), "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", base + off))
            except OSError:
                f.close()
                break
            locks.append(f)
        else:
            _HELD_PORTS.extend(locks)
            return base
        for f in locks:
            f.close()
    raise AssertionError(f"no free test port in {lo}..{hi} for offsets {offsets}")


def free_port() -> int:
    """A loopback port nobody listens on, reserved for this process (``reserve_ports``)."""
    return reserve_ports((0,))


def wait_until(predicate, what: str, timeout: float = WAIT_S, interval: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - anything means "not yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc!r}")
        time.sleep(interval)


def ping_ok(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return client.ping() is True
    finally:
        client.close()


def next_message(pubsub, timeout: float = WAIT_S, sharded: bool = False):
    """Next pub/sub message (subscribe confirmations included), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    get = pubsub.get_sharded_message if sharded else pubsub.get_message
    while time.monotonic() < deadline:
        msg = get(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        if msg is not None:
            return msg
    raise AssertionError(f"no pub/sub message within {timeout}s")


def blocked_clients(direct) -> int:
    return int(direct.info("clients")["blocked_clients"])


def _child_env() -> dict:
    # The proxy reads PORTCULLIS_* from the environment; only our flags should configure it.
    return {k: v for k, v in os.environ.items() if not k.startswith("PORTCULLIS_")}


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop one child we started, by its pid: SIGTERM, then SIGKILL after a grace."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------------------------
# fixtures


class Stack:
    """Addresses of the redis-server and the proxy started for this session."""

    def __init__(self, redis_port: int, proxy_port: int):
        self.redis_port = redis_port
        self.proxy_port = proxy_port


@pytest.fixture(scope="session")
def stack():
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        pytest.fail("redis-server not found on PATH (apt-get install redis-server)")
    proxy_bin = Path(os.environ.get("PORTCULLIS_BIN", "target/debug/portcullis"))
    if not proxy_bin.is_absolute():
        proxy_bin = REPO_ROOT / proxy_bin
    if not proxy_bin.is_file():
        pytest.fail(f"proxy binary {proxy_bin} not found (cargo build, or set PORTCULLIS_BIN)")

    workdir = Path(tempfile.mkdtemp(prefix="portcullis-pytest-"))
    redis_proc = proxy_proc = None
    try:
        # redis-server: retry on a port someone else grabbed between probe and bind.
        redis_port = None
        for attempt in range(5):
            port = free_port()
            log = open(workdir / f"redis-{attempt}.log", "wb")
            redis_proc = subprocess.Popen(
                [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir)],
                stdout=log, stderr=subprocess.STDOUT, env=_child_env(),
            )
            log.close()
            try:
                wait_until(lambda p=port: redis_proc.poll() is not None or ping_ok(p), "redis-server PING")
            except AssertionError:
                pass
            if redis_proc.poll() is None and ping_ok(port):
                redis_port = port
                break
            _stop(redis_proc)
            redis_proc = None
        if redis_port is None:
            pytest.fail(f"redis-server did not start; log:\n{_tail(workdir / 'redis-4.log')}")

        proxy_port = None
        for attempt in range(5):
            port = free_port()
            log_path = workdir / f"proxy-{attempt}.log"
            log = open(log_path, "wb")
            proxy_proc = subprocess.Popen(
                [str(proxy_bin), "--listen", f"127.0.0.1:{port}",
                 "--backend", f"127.0.0.1:{redis_port}", "--admin-listen", ""],
                stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=str(workdir),
            )
            log.close()
            try:
                wait_until(lambda p=port: proxy_proc.poll() is not None or ping_ok(p), "PING through the proxy",
                           timeout=20)
            except AssertionError:
                pass
            if proxy_proc.poll() is None and ping_ok(port):
                proxy_port = port
                break
            exited = proxy_proc.poll()
            _stop(proxy_proc)
            proxy_proc = None
            if exited is not None and attempt >= 1:
                pytest.fail(f"proxy exited with {exited}; log:\n{_tail(log_path)}")
        if proxy_port is None:
            pytest.fail(f"proxy did not answer PING; log:\n{_tail(workdir / 'proxy-4.log')}")

        # Writes need a confirmed master (first ROLE probe); wait for that too.
        probe = redis.Redis(host="127.0.0.1", port=proxy_port, socket_timeout=5)
        try:
            wait_until(lambda: probe.set("portcullis-pytest:ready", "1"), "a write through the proxy", timeout=20)
        finally:
            probe.close()

        yield Stack(redis_port, proxy_port)
    finally:
        _stop(proxy_proc)
        _stop(redis_proc)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def clients(stack):
    """Factory for clients; everything it made is closed after the test."""
    made: list = []

    def make(target: str = "proxy", **kwargs):
        port = stack.proxy_port if target == "proxy" else stack.redis_port
        kwargs.setdefault("socket_timeout", SOCKET_TIMEOUT_S)
        kwargs.setdefault("socket_connect_timeout", 5)
        client = redis.Redis(host="127.0.0.1", port=port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def raw_conns(stack):
    """Factory for single raw redis-py connections (send_command/read_response)."""
    made: list = []

    def make(target: str = "proxy", **kwargs):
        port = stack.proxy_port if target == "proxy" else stack.redis_port
        kwargs.setdefault("socket_timeout", SOCKET_TIMEOUT_S)
        kwargs.setdefault("decode_responses", True)
        conn = redis.Connection(host="127.0.0.1", port=port, **kwargs)
        conn.connect()
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.disconnect()


@pytest.fixture
def direct(clients):
    return clients("direct", decode_responses=True)


@pytest.fixture
def proxied(clients):
    return clients("proxy", decode_responses=True)


@pytest.fixture
def pfx(request):
    return f"compat:{request.node.name}:{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def _clean_backend(stack):
    """Start from an empty backend (FLUSHALL directly; through the proxy it is refused)."""
    c = redis.Redis(host="127.0.0.1", port=stack.redis_port)
    c.flushall()
    c.close()


def is_noperm(exc: BaseException) -> bool:
    """A ``-NOPERM ...`` reply: redis-py maps it to NoPermissionError and strips the code."""
    return isinstance(exc, NoPermissionError) or "NOPERM" in str(exc)


def run(conn, *args, **kwargs):
    conn.send_command(*args)
    return conn.read_response(**kwargs)


# --------------------------------------------------------------------------------------
# strings, binary safety, size, pipelining


def test_basic_set_get_del_incr(proxied, direct, pfx):
    assert proxied.set(f"{pfx}:k", "v1") is True
    assert proxied.get(f"{pfx}:k") == "v1"
    assert direct.get(f"{pfx}:k") == "v1"
    assert proxied.set(f"{pfx}:k", "v2", nx=True) is None
    assert proxied.get(f"{pfx}:missing") is None
    assert proxied.incr(f"{pfx}:n") == 1
    assert proxied.incrby(f"{pfx}:n", 41) == 42
    assert direct.get(f"{pfx}:n") == "42"
    assert proxied.delete(f"{pfx}:k", f"{pfx}:n", f"{pfx}:missing") == 2
    assert direct.exists(f"{pfx}:k", f"{pfx}:n") == 0
    assert proxied.set(f"{pfx}:s", "abc") is True
    with pytest.raises(ResponseError, match="not an integer"):
        proxied.incr(f"{pfx}:s")
    assert proxied.ping() is True


def test_binary_safe_keys_and_values(clients, pfx):
    proxied = clients("proxy")
    direct = clients("direct")
    every_byte = bytes(range(256))
    base = pfx.encode()
    # One key holding all 256 byte values in key and value (CR, LF, NUL, '*', '$' included).
    assert proxied.set(base + b":" + every_byte, every_byte + b"\r\n" + every_byte) is True
    assert proxied.get(base + b":" + every_byte) == every_byte + b"\r\n" + every_byte
    assert direct.get(base + b":" + every_byte) == every_byte + b"\r\n" + every_byte
    # And one key per byte value, written in a pipeline, read back directly.
    with proxied.pipeline(transaction=False) as pipe:
        for b in range(256):
            pipe.set(base + b":" + bytes([b]), bytes([b]) * 3)
        assert pipe.execute() == [True] * 256
    for b in range(256):
        assert direct.get(base + b":" + bytes([b])) == bytes([b]) * 3, f"byte {b}"
    assert proxied.mget([base + b":" + bytes([b]) for b in range(256)]) == [bytes([b]) * 3 for b in range(256)]
    # Empty key and empty value are legal too.
    assert proxied.set(base + b":", b"") is True
    assert proxied.get(base + b":") == b""


def test_large_value_10mb_round_trip(clients, pfx):
    proxied = clients("proxy")
    direct = clients("direct")
    data = os.urandom(10 * 1024 * 1024)
    assert proxied.set(f"{pfx}:big", data) is True
    assert direct.strlen(f"{pfx}:big") == len(data)
    got = proxied.get(f"{pfx}:big")
    assert got is not None and len(got) == len(data)
    assert got == data
    # A command after the big reply still lines up.
    assert proxied.set(f"{pfx}:after", "x") is True
    assert proxied.get(f"{pfx}:after") == b"x"


def test_pipeline_10000_commands_in_order(proxied, direct, pfx):
    expected = []
    with proxied.pipeline(transaction=False) as pipe:
        for i in range(10_000):
            kind = i % 4
            if kind == 0:
                pipe.set(f"{pfx}:{i}", f"v{i}")
                expected.append(True)
            elif kind == 1:
                pipe.get(f"{pfx}:{i - 1}")
                expected.append(f"v{i - 1}")
            elif kind == 2:
                pipe.incr(f"{pfx}:counter")
                expected.append(i // 4 + 1)
            else:
                pipe.rpush(f"{pfx}:list", i)
                expected.append(i // 4 + 1)
        results = pipe.execute()
    assert len(results) == 10_000
    assert results == expected
    assert direct.get(f"{pfx}:counter") == "2500"
    assert direct.llen(f"{pfx}:list") == 2500
    assert direct.lrange(f"{pfx}:list", 0, 2) == ["3", "7", "11"]


# --------------------------------------------------------------------------------------
# transactions


def test_multi_exec_transaction(proxied, direct, pfx):
    with proxied.pipeline(transaction=True) as pipe:
        pipe.set(f"{pfx}:a", "1")
        pipe.incr(f"{pfx}:a")
        pipe.get(f"{pfx}:a")
        pipe.rpush(f"{pfx}:l", "x", "y")
        results = pipe.execute()
    assert results == [True, 2, "2", 2]
    assert direct.get(f"{pfx}:a") == "2"
    assert direct.lrange(f"{pfx}:l", 0, -1) == ["x", "y"]
    # A runtime error inside EXEC does not abort the other commands (Redis semantics).
    with proxied.pipeline(transaction=True) as pipe:
        pipe.set(f"{pfx}:s", "abc")
        pipe.incr(f"{pfx}:s")
        pipe.set(f"{pfx}:t", "ok")
        results = pipe.execute(raise_on_error=False)
    assert results[0] is True and isinstance(results[1], ResponseError) and results[2] is True
    assert direct.get(f"{pfx}:t") == "ok"
    assert proxied.ping() is True


def test_refused_command_inside_multi_aborts_exec(proxied, direct, pfx):
    before = direct.config_get("dir")["dir"]
    with proxied.pipeline(transaction=True) as pipe:
        pipe.set(f"{pfx}:a", "1")
        pipe.execute_command("CONFIG", "SET", "dir", "/tmp")
        pipe.set(f"{pfx}:b", "2")
        with pytest.raises(ResponseError) as err:
            pipe.execute()
    assert is_noperm(err.value) or "EXECABORT" in str(err.value), repr(err.value)
    assert direct.exists(f"{pfx}:a", f"{pfx}:b") == 0, "EXEC must have been aborted"
    assert direct.config_get("dir")["dir"] == before
    assert proxied.ping() is True
    assert proxied.set(f"{pfx}:c", "3") is True


def test_watch_conflict_raises_watch_error(proxied, direct, pfx):
    key = f"{pfx}:watched"
    direct.set(key, "0")
    with proxied.pipeline() as pipe:
        pipe.watch(key)
        assert pipe.get(key) == "0"
        direct.set(key, "changed-by-other-client")
        pipe.multi()
        pipe.set(key, "mine")
        with pytest.raises(WatchError):
            pipe.execute()
    assert direct.get(key) == "changed-by-other-client"
    # Without interference the same sequence commits.
    with proxied.pipeline() as pipe:
        pipe.watch(key)
        current = pipe.get(key)
        pipe.multi()
        pipe.set(key, current + "+mine")
        assert pipe.execute() == [True]
    assert direct.get(key) == "changed-by-other-client+mine"


def test_discard(raw_conns, direct, pfx):
    conn = raw_conns()
    assert run(conn, "MULTI") == "OK"
    assert run(conn, "SET", f"{pfx}:k", "v") == "QUEUED"
    assert run(conn, "INCR", f"{pfx}:n") == "QUEUED"
    assert run(conn, "DISCARD") == "OK"
    assert direct.exists(f"{pfx}:k", f"{pfx}:n") == 0
    with pytest.raises(ResponseError, match="EXEC without MULTI"):
        run(conn, "EXEC")
    assert run(conn, "SET", f"{pfx}:k", "after") == "OK"
    assert direct.get(f"{pfx}:k") == "after"


# --------------------------------------------------------------------------------------
# databases


def test_select_db_via_client_option(clients, pfx):
    proxied_db2 = clients("proxy", db=2, decode_responses=True)
    direct_db2 = clients("direct", db=2, decode_responses=True)
    direct_db0 = clients("direct", db=0, decode_responses=True)
    assert proxied_db2.set(f"{pfx}:k", "in-db2") is True
    assert direct_db2.get(f"{pfx}:k") == "in-db2"
    assert direct_db0.exists(f"{pfx}:k") == 0
    # Several commands later (and through a pipeline) it is still db 2.
    with proxied_db2.pipeline(transaction=False) as pipe:
        pipe.set(f"{pfx}:k2", "also-db2")
        pipe.get(f"{pfx}:k")
        assert pipe.execute() == [True, "in-db2"]
    assert direct_db2.get(f"{pfx}:k2") == "also-db2"
    assert direct_db0.exists(f"{pfx}:k2") == 0


def test_select_command_on_one_connection(raw_conns, clients, pfx):
    conn = raw_conns()
    assert run(conn, "SELECT", "5") == "OK"
    assert run(conn, "SET", f"{pfx}:k", "in-db5") == "OK"
    assert clients("direct", db=5, decode_responses=True).get(f"{pfx}:k") == "in-db5"
    assert clients("direct", db=0).exists(f"{pfx}:k") == 0
    with pytest.raises(ResponseError):
        run(conn, "SELECT", "99999")
    assert run(conn, "GET", f"{pfx}:k") == "in-db5"


# --------------------------------------------------------------------------------------
# pub/sub


def test_pubsub_resp2(proxied, direct, pfx):
    channel = f"{pfx}:ch"
    pattern = f"{pfx}:p*"
    p = proxied.pubsub()
    try:
        p.subscribe(channel)
        assert next_message(p) == {"type": "subscribe", "pattern": None, "channel": channel, "data": 1}
        p.psubscribe(pattern)
        assert next_message(p) == {"type": "psubscribe", "pattern": None, "channel": pattern, "data": 2}

        assert direct.publish(channel, "hello") == 1
        assert next_message(p) == {"type": "message", "pattern": None, "channel": channel, "data": "hello"}
        assert direct.publish(f"{pfx}:pat", "world") == 1
        assert next_message(p) == {"type": "pmessage", "pattern": pattern, "channel": f"{pfx}:pat",
                                   "data": "world"}
        # Binary and empty payloads.
        assert direct.publish(channel, "") == 1
        assert next_message(p)["data"] == ""

        # PING in subscribed mode (RESP2: a ["pong", ""] array).
        p.ping()
        msg = next_message(p)
        assert msg["type"] == "pong"

        p.unsubscribe(channel)
        assert next_message(p) == {"type": "unsubscribe", "pattern": None, "channel": channel, "data": 1}
        p.punsubscribe(pattern)
        assert next_message(p) == {"type": "punsubscribe", "pattern": None, "channel": pattern, "data": 0}
        assert direct.publish(channel, "nobody") == 0
        assert direct.publish(f"{pfx}:pat", "nobody") == 0
    finally:
        p.close()
    # The pooled connection went back to normal mode.
    assert proxied.set(f"{pfx}:after", "1") is True
    assert proxied.get(f"{pfx}:after") == "1"


def test_pubsub_resp3(clients, direct, pfx):
    proxied3 = clients("proxy", protocol=3, decode_responses=True)
    channel = f"{pfx}:ch"
    p = proxied3.pubsub()
    try:
        p.subscribe(channel)
        assert next_message(p) == {"type": "subscribe", "pattern": None, "channel": channel, "data": 1}
        p.psubscribe(f"{pfx}:p*")
        assert next_message(p)["type"] == "psubscribe"
        assert direct.publish(channel, "push-1") == 1
        assert next_message(p) == {"type": "message", "pattern": None, "channel": channel, "data": "push-1"}
        assert direct.publish(f"{pfx}:pz", "push-2") == 1
        msg = next_message(p)
        assert msg["type"] == "pmessage" and msg["data"] == "push-2"
        p.unsubscribe(channel)
        assert next_message(p)["type"] == "unsubscribe"
        p.punsubscribe()
        assert next_message(p)["type"] == "punsubscribe"
        assert direct.publish(channel, "nobody") == 0
    finally:
        p.close()
    assert proxied3.set(f"{pfx}:after", "1") is True


def test_resp3_push_interleaved_with_replies(raw_conns, direct, pfx):
    """RESP3 allows ordinary commands while subscribed: push frames and replies interleave."""
    conn = raw_conns(protocol=3)
    pushes: list = []

    def on_push(message):
        pushes.append(message)
        return message

    conn._parser.set_pubsub_push_handler(on_push)
    channel = f"{pfx}:ch"
    conn.send_command("SUBSCRIBE", channel)
    assert conn.read_response(push_request=True) == ["subscribe", channel, 1]
    pushes.clear()
    assert direct.set(f"{pfx}:k", "v") is True
    assert direct.publish(channel, "between") == 1
    # The push arrives before the GET reply; the parser hands it to our handler.
    assert run(conn, "GET", f"{pfx}:k") == "v"
    assert pushes == [["message", channel, "between"]]
    assert run(conn, "PING") == "PONG"
    conn.send_command("UNSUBSCRIBE", channel)
    assert conn.read_response(push_request=True) == ["unsubscribe", channel, 0]
    assert run(conn, "SET", f"{pfx}:k2", "v2") == "OK"


def test_sharded_pubsub(proxied, direct, pfx):
    channel = f"{pfx}:sch"
    p = proxied.pubsub()
    try:
        p.ssubscribe(channel)
        assert next_message(p, sharded=True) == {"type": "ssubscribe", "pattern": None, "channel": channel,
                                                 "data": 1}
        assert direct.spublish(channel, "sharded-hello") == 1
        assert next_message(p, sharded=True) == {"type": "smessage", "pattern": None, "channel": channel,
                                                 "data": "sharded-hello"}
        # SPUBLISH through the proxy reaches a direct sharded subscriber too.
        other = direct.pubsub()
        try:
            other.ssubscribe(f"{pfx}:sch2")
            assert next_message(other, sharded=True)["type"] == "ssubscribe"
            assert proxied.spublish(f"{pfx}:sch2", "via-proxy") == 1
            assert next_message(other, sharded=True)["data"] == "via-proxy"
        finally:
            other.close()
        p.sunsubscribe(channel)
        assert next_message(p, sharded=True)["type"] == "sunsubscribe"
        assert direct.spublish(channel, "nobody") == 0
    finally:
        p.close()


def test_keyspace_notifications_spring_session_handshake(proxied, direct, pfx):
    """Spring Session: CONFIG GET/SET notify-keyspace-events, then listens to key events."""
    got = proxied.config_get("notify-keyspace-events")
    assert "notify-keyspace-events" in got
    original = got["notify-keyspace-events"]
    try:
        assert proxied.config_set("notify-keyspace-events", "Egx") is True
        assert sorted(direct.config_get("notify-keyspace-events")["notify-keyspace-events"]) == sorted("Egx")
        assert sorted(proxied.config_get("notify-keyspace-events")["notify-keyspace-events"]) == sorted("Egx")
        p = proxied.pubsub()
        try:
            p.subscribe("__keyevent@0__:del")
            assert next_message(p)["type"] == "subscribe"
            direct.set(f"{pfx}:session", "s")
            direct.delete(f"{pfx}:session")
            msg = next_message(p)
            assert msg["type"] == "message" and msg["data"] == f"{pfx}:session"
        finally:
            p.close()
    finally:
        direct.config_set("notify-keyspace-events", original)


# --------------------------------------------------------------------------------------
# blocking commands


def test_blpop_satisfied_by_other_client(clients, direct, pfx):
    proxied = clients("proxy", decode_responses=True)
    key = f"{pfx}:q"
    result: dict = {}

    def waiter():
        try:
            result["value"] = proxied.blpop([key], timeout=WAIT_S)
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc

    base = blocked_clients(direct)
    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    wait_until(lambda: blocked_clients(direct) > base, "the proxied BLPOP to block on the backend")
    assert direct.rpush(key, "job-1") == 1
    t.join(WAIT_S + 5)
    assert not t.is_alive(), "BLPOP did not return"
    assert "error" not in result, result.get("error")
    assert result["value"] == (key, "job-1") or result["value"] == [key, "job-1"]
    assert direct.llen(key) == 0


def test_blpop_timeout_returns_none(proxied, pfx):
    start = time.monotonic()
    assert proxied.blpop([f"{pfx}:empty"], timeout=1) is None
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed < 5, elapsed
    assert proxied.ping() is True


def test_client_gone_while_blocked_does_not_consume(raw_conns, direct, pfx):
    key = f"{pfx}:q"
    base = blocked_clients(direct)
    conn = raw_conns()
    conn.send_command("BLPOP", key, "0")
    wait_until(lambda: blocked_clients(direct) > base, "the proxied BLPOP to block on the backend")
    conn.disconnect()
    try:
        wait_until(lambda: blocked_clients(direct) <= base, "the backend link of the gone client to close")
        released = True
    except AssertionError:
        released = False
    assert direct.rpush(key, "must-stay") == 1
    assert direct.llen(key) == 1, (
        f"the element was consumed by the disconnected client's BLPOP (backend blocked client released: {released})"
    )
    assert released, "backend still had a blocked client for a disconnected proxy client"


# --------------------------------------------------------------------------------------
# scripting


def test_eval_and_evalsha(proxied, direct, pfx):
    assert proxied.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, f"{pfx}:k", "from-lua") == "OK"
    assert direct.get(f"{pfx}:k") == "from-lua"
    assert proxied.eval("return {KEYS[1], ARGV[1], 42}", 1, f"{pfx}:x", "y") == [f"{pfx}:x", "y", 42]

    incr_by = proxied.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert incr_by(keys=[f"{pfx}:n"], args=[5]) == 5
    assert incr_by(keys=[f"{pfx}:n"], args=[10]) == 15
    assert direct.get(f"{pfx}:n") == "15"

    sha = proxied.script_load("return ARGV[1] .. ARGV[1]")
    assert proxied.evalsha(sha, 0, "ab") == "abab"
    assert proxied.script_exists(sha) == [True]
    # A server that lost its script cache (flushed behind the proxy's back, as a restart
    # or a promoted replica would): the proxy loads the body it saw and runs it again.
    direct.script_flush()
    assert proxied.evalsha(sha, 0, "ab") == "abab"
    # SCRIPT FLUSH through the proxy: NOSCRIPT surfaces to the client, as from Redis, and
    # register_script recovers from it.
    proxied.script_flush()
    with pytest.raises(redis.exceptions.NoScriptError):
        proxied.evalsha(sha, 0, "ab")
    assert incr_by(keys=[f"{pfx}:n"], args=[1]) == 16
    with pytest.raises(ResponseError):
        proxied.eval("return redis.call('NOSUCHCOMMAND')", 0)
    assert proxied.ping() is True


def test_function_load_refused(proxied, direct):
    code = "#!lua name=compatlib\nredis.register_function('compat_echo', function(keys, args) return args[1] end)"
    with pytest.raises(NoPermissionError):
        proxied.function_load(code)
    assert direct.function_list(library="compatlib") == []
    assert proxied.ping() is True


# --------------------------------------------------------------------------------------
# connection state: CLIENT, HELLO, AUTH, RESET


def test_client_setname_getname_id(clients, direct, pfx):
    proxied = clients("proxy", decode_responses=True, single_connection_client=True)
    name = "compat-" + uuid.uuid4().hex[:8]
    assert proxied.client_setname(name) is True
    assert proxied.client_getname() == name
    client_id = proxied.client_id()
    assert isinstance(client_id, int) and client_id > 0
    assert proxied.client_id() == client_id
    on_backend = [c for c in direct.client_list() if c.get("name") == name]
    assert len(on_backend) == 1, "the name must be set on the backend connection"
    assert int(on_backend[0]["id"]) == client_id
    # client_name= on the constructor (sent as CLIENT SETNAME during connect).
    named = clients("proxy", decode_responses=True, client_name=name + "-ctor")
    assert named.client_getname() == name + "-ctor"


def test_client_setinfo_handshake(clients, direct):
    """redis-py 5 sends CLIENT SETINFO LIB-NAME/LIB-VER on connect (Redis >= 7.2 knows it)."""
    lib = "compat-lib-" + uuid.uuid4().hex[:6]
    proxied = clients("proxy", decode_responses=True, lib_name=lib, lib_version="9.9.9",
                      single_connection_client=True)
    assert proxied.ping() is True
    name = "setinfo-" + uuid.uuid4().hex[:6]
    assert proxied.client_setname(name) is True
    entry = [c for c in direct.client_list() if c.get("name") == name]
    assert len(entry) == 1
    try:
        direct.client_setinfo("LIB-NAME", "probe")
        backend_has_setinfo = True
    except ResponseError as exc:
        backend_has_setinfo = False
        backend_error = str(exc)
    if backend_has_setinfo:
        assert entry[0].get("lib-name") == lib
        assert entry[0].get("lib-ver") == "9.9.9"
        assert proxied.client_setinfo("LIB-NAME", lib + "-x") is True
        entry = [c for c in direct.client_list() if c.get("name") == name]
        assert entry[0].get("lib-name") == lib + "-x"
    else:
        # Redis 7.0: the proxy answers exactly like the backend, and the session goes on.
        with pytest.raises(ResponseError) as err:
            proxied.client_setinfo("LIB-NAME", lib + "-x")
        assert str(err.value) == backend_error
    assert proxied.client_getname() == name


def test_hello3_without_auth(clients, pfx):
    proxied3 = clients("proxy", protocol=3, decode_responses=True, single_connection_client=True)
    assert proxied3.ping() is True
    hello = proxied3.execute_command("HELLO", 3)
    assert isinstance(hello, dict), hello
    assert hello["proto"] == 3
    assert hello["server"] == "redis"
    # RESP3-typed replies come through: a map for HGETALL, a double for ZSCORE.
    proxied3.hset(f"{pfx}:h", mapping={"a": "1"})
    assert proxied3.hgetall(f"{pfx}:h") == {"a": "1"}
    proxied3.zadd(f"{pfx}:z", {"m": 1.5})
    assert proxied3.zscore(f"{pfx}:z", "m") == 1.5


def test_hello3_with_auth_default_user(clients, direct, pfx):
    proxied3 = clients("proxy", protocol=3, username="default", password="x", decode_responses=True)
    assert proxied3.ping() is True
    assert proxied3.set(f"{pfx}:k", "v") is True
    assert direct.get(f"{pfx}:k") == "v"
    assert proxied3.acl_whoami() == "default"
    # RESP2 AUTH default <anything> works the same way.
    proxied2 = clients("proxy", username="default", password="whatever", decode_responses=True)
    assert proxied2.get(f"{pfx}:k") == "v"


def test_auth_unknown_user_is_wrongpass(clients):
    bad = clients("proxy", username="no-such-user", password="x")
    with pytest.raises((redis.exceptions.AuthenticationError, ResponseError)) as err:
        bad.ping()
    assert "WRONGPASS" in str(err.value) or "invalid username-password" in str(err.value)


def test_reset(raw_conns, clients, pfx):
    conn = raw_conns(db=3, client_name="before-reset")
    assert run(conn, "SET", f"{pfx}:k1", "db3") == "OK"
    assert run(conn, "MULTI") == "OK"
    assert run(conn, "SET", f"{pfx}:never", "x") == "QUEUED"
    assert run(conn, "RESET") == "RESET"
    assert run(conn, "CLIENT", "GETNAME") is None
    assert run(conn, "SET", f"{pfx}:k2", "db0") == "OK"
    with pytest.raises(ResponseError, match="EXEC without MULTI"):
        run(conn, "EXEC")
    assert clients("direct", db=3, decode_responses=True).get(f"{pfx}:k1") == "db3"
    direct0 = clients("direct", db=0, decode_responses=True)
    assert direct0.get(f"{pfx}:k2") == "db0"
    assert direct0.exists(f"{pfx}:never") == 0
    assert clients("direct", db=3).exists(f"{pfx}:never", f"{pfx}:k2") == 0


def test_reset_via_execute_command(clients, pfx):
    proxied = clients("proxy", decode_responses=True, single_connection_client=True)
    assert proxied.execute_command("RESET") == "RESET"
    assert proxied.ping() is True


def test_reset_after_resp3_returns_to_resp2(raw_conns):
    conn = raw_conns(protocol=3)
    assert isinstance(run(conn, "HELLO"), dict)
    assert run(conn, "RESET") == "RESET"
    hello = run(conn, "HELLO")
    assert isinstance(hello, list), f"after RESET the connection must speak RESP2, got {hello!r}"
    assert hello[hello.index("proto") + 1] == 2
    assert run(conn, "PING") == "PONG"


def test_unknown_command(proxied):
    with pytest.raises(ResponseError, match="unknown command"):
        proxied.execute_command("NOSUCHCOMMAND", "a", "b")
    assert proxied.ping() is True


# --------------------------------------------------------------------------------------
# SCAN family


def test_scan_family_iterates_completely(proxied, direct, pfx):
    n = 1000
    members = {f"m{i}" for i in range(n)}
    with proxied.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.set(f"{pfx}:key:{i}", i)
        pipe.sadd(f"{pfx}:set", *members)
        pipe.hset(f"{pfx}:hash", mapping={f"f{i}": i for i in range(n)})
        pipe.zadd(f"{pfx}:zset", {f"z{i}": i for i in range(n)})
        pipe.execute()
    assert direct.scard(f"{pfx}:set") == n

    keys = set(proxied.scan_iter(match=f"{pfx}:key:*", count=100))
    assert keys == {f"{pfx}:key:{i}" for i in range(n)}
    assert set(proxied.sscan_iter(f"{pfx}:set", count=50)) == members
    assert dict(proxied.hscan_iter(f"{pfx}:hash", count=50)) == {f"f{i}": str(i) for i in range(n)}
    assert dict(proxied.zscan_iter(f"{pfx}:zset", count=50)) == {f"z{i}": float(i) for i in range(n)}
    # SCAN with TYPE filter.
    typed = set(proxied.scan_iter(match=f"{pfx}:*", count=500, _type="set"))
    assert typed == {f"{pfx}:set"}


# --------------------------------------------------------------------------------------
# protection: refused commands, and the allowed exceptions


REFUSED = [
    ("slaveof", lambda c: c.slaveof("127.0.0.1", 1)),
    ("replicaof", lambda c: c.execute_command("REPLICAOF", "127.0.0.1", "1")),
    ("slaveof-lowercase-raw", lambda c: c.execute_command("slaveof", "127.0.0.1", "1")),
    ("config-set-dir", lambda c: c.config_set("dir", "/tmp")),
    ("config-set-dbfilename", lambda c: c.execute_command("CoNfIg", "sEt", "dbfilename", "x.so")),
    ("config-get-dir", lambda c: c.config_get("dir")),
    ("config-get-all", lambda c: c.config_get("*")),
    ("module-load", lambda c: c.execute_command("MODULE", "LOAD", "/x.so")),
    ("module-unload", lambda c: c.execute_command("MODULE", "UNLOAD", "system")),
    ("debug", lambda c: c.execute_command("DEBUG", "SLEEP", "0")),
    ("shutdown", lambda c: c.execute_command("SHUTDOWN", "ABORT")),
    ("save", lambda c: c.execute_command("SAVE")),
    ("bgsave", lambda c: c.execute_command("BGSAVE")),
    ("acl-setuser", lambda c: c.execute_command("ACL", "SETUSER", "intruder", "on", ">pw", "+@all")),
    ("acl-list", lambda c: c.execute_command("ACL", "LIST")),
    ("client-kill", lambda c: c.execute_command("CLIENT", "KILL", "ID", "999999")),
    ("client-list", lambda c: c.execute_command("CLIENT", "LIST")),
    ("client-pause", lambda c: c.execute_command("CLIENT", "PAUSE", "1")),
    ("slowlog", lambda c: c.execute_command("SLOWLOG", "GET")),
    ("latency", lambda c: c.execute_command("LATENCY", "LATEST")),
    ("flushall", lambda c: c.execute_command("FLUSHALL")),
    ("flushdb", lambda c: c.execute_command("FLUSHDB")),
    ("swapdb", lambda c: c.execute_command("SWAPDB", "0", "1")),
    ("migrate", lambda c: c.execute_command("MIGRATE", "127.0.0.1", "1", "k", "0", "1000")),
    ("restore", lambda c: c.execute_command("RESTORE", "compat:restored", "0", "\x00garbage")),
    ("function-load", lambda c: c.execute_command("FUNCTION", "LOAD", "#!lua name=x\n")),
]


@pytest.mark.parametrize("name,call", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_command(name, call, clients, direct, pfx):
    proxied = clients("proxy", decode_responses=True, single_connection_client=True)
    sentinel = f"{pfx}:sentinel"
    direct.set(sentinel, "still-here")
    dir_before = direct.config_get("dir")["dir"]
    dbfilename_before = direct.config_get("dbfilename")["dbfilename"]

    with pytest.raises(ResponseError) as err:
        call(proxied)
    assert is_noperm(err.value), f"{name}: expected a NOPERM error, got {err.value!r}"

    role = direct.execute_command("ROLE")
    assert (role[0].decode() if isinstance(role[0], bytes) else role[0]) == "master"
    assert direct.config_get("dir")["dir"] == dir_before
    assert direct.config_get("dbfilename")["dbfilename"] == dbfilename_before
    assert direct.get(sentinel) == "still-here"
    assert direct.module_list() == []
    assert "intruder" not in direct.acl_users()
    # The refused client keeps a working connection.
    assert proxied.ping() is True
    assert proxied.get(sentinel) == "still-here"


def test_module_list_allowed_as_introspection(clients, direct):
    # Clients probe a server's modules at start: MODULE LIST answers as Redis does.
    proxied = clients("proxy", single_connection_client=True)
    assert proxied.module_list() == direct.module_list() == []


def test_monitor_refused_and_connection_usable(raw_conns):
    conn = raw_conns()
    with pytest.raises(NoPermissionError):
        run(conn, "MONITOR")
    assert run(conn, "PING") == "PONG"


@pytest.mark.parametrize("param", ["notify-keyspace-events", "databases", "timeout", "replica-read-only",
                                   "slave-read-only"])
def test_config_get_allowed_params(proxied, direct, param):
    got = proxied.config_get(param)
    assert got == direct.config_get(param)
    assert param in got


def test_config_set_notify_keyspace_events_allowed(proxied, direct):
    original = direct.config_get("notify-keyspace-events")["notify-keyspace-events"]
    try:
        assert proxied.config_set("notify-keyspace-events", "Egx") is True
        assert sorted(direct.config_get("notify-keyspace-events")["notify-keyspace-events"]) == sorted("Egx")
        assert proxied.config_set("notify-keyspace-events", "") is True
        assert direct.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""
        with pytest.raises(ResponseError):
            proxied.config_set("notify-keyspace-events", "Egx!dir")
    finally:
        direct.config_set("notify-keyspace-events", original)
    assert proxied.ping() is True


def test_allowed_acl_subcommands(proxied):
    assert proxied.acl_whoami() == "default"
    cats = proxied.acl_cat()
    assert "keyspace" in cats and "dangerous" in cats
    pw = proxied.acl_genpass()
    assert len(pw) == 64 and all(ch in "0123456789abcdef" for ch in pw)
