"""redis-py connecting with a password through portcullis, in both ``[auth]`` modes.

One ``redis-server`` with ``requirepass`` (the ``default`` user's password, which the proxy
holds as its own backend credential) and an ACL user ``app`` limited to ``app:*`` keys; two
proxies in front of it:

- proxy mode (the default): the app keeps sending the Redis password; the proxy accepts the
  password it holds and answers everything else as Redis would (``WRONGPASS``);
- pass-through (``--auth-mode passthrough``): AUTH goes to Redis, whose ACL decides.

Each is tried with ``protocol=2`` (``AUTH``) and ``protocol=3`` (``HELLO 3 AUTH``). Every
process started here is stopped by pid at the end. Run with ``bash scripts/py-test.sh``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from test_compat import REPO_ROOT, _child_env, _stop, _tail, free_port, wait_until

ADMIN_PW = "admin-pw"
APP_PW = "app-pw"


def _answers(port: int, **kwargs) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1, **kwargs)
    try:
        return client.ping() is True
    finally:
        client.close()


class Stack:
    def __init__(self, redis_port: int, proxy_port: int, passthrough_port: int):
        self.redis_port = redis_port
        self.proxy_port = proxy_port
        self.passthrough_port = passthrough_port


@pytest.fixture(scope="module")
def stack():
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        pytest.fail("redis-server not found on PATH")
    proxy_bin = Path(os.environ.get("PORTCULLIS_BIN", "target/debug/portcullis"))
    if not proxy_bin.is_absolute():
        proxy_bin = REPO_ROOT / proxy_bin
    workdir = Path(tempfile.mkdtemp(prefix="portcullis-pytest-auth-"))
    procs: list[subprocess.Popen] = []
    try:
        redis_port = free_port()
        log = open(workdir / "redis.log", "wb")
        procs.append(subprocess.Popen(
            [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--requirepass", ADMIN_PW,
             "--user", "app", "on", f">{APP_PW}", "~app:*", "+@all"],
            stdout=log, stderr=subprocess.STDOUT, env=_child_env(),
        ))
        log.close()
        wait_until(lambda: _answers(redis_port, password=ADMIN_PW), "redis-server PING")

        def start_proxy(name: str, *flags: str) -> int:
            port = free_port()
            config = workdir / f"{name}.toml"
            config.write_text(
                f'listen = "127.0.0.1:{port}"\n[admin]\nlisten = ""\n'
                f'[[backends]]\naddress = "127.0.0.1:{redis_port}"\npassword = "{ADMIN_PW}"\n'
            )
            log_path = workdir / f"{name}.log"
            log = open(log_path, "wb")
            proc = subprocess.Popen([str(proxy_bin), "--config", str(config), *flags],
                                    stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=str(workdir))
            log.close()
            procs.append(proc)
            # Ready when a write goes through (a confirmed master), with the admin password.
            probe = redis.Redis(host="127.0.0.1", port=port, password=ADMIN_PW, socket_timeout=5)
            try:
                wait_until(lambda: proc.poll() is not None or probe.set("ready", "1"), f"{name} ready", timeout=20)
            finally:
                probe.close()
            if proc.poll() is not None:
                pytest.fail(f"{name} exited; log:\n{_tail(log_path)}")
            return port

        proxy_port = start_proxy("proxy")
        passthrough_port = start_proxy("passthrough", "--auth-mode", "passthrough")
        yield Stack(redis_port, proxy_port, passthrough_port)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def clients(stack):
    made: list = []

    def make(port: int, **kwargs):
        kwargs.setdefault("socket_timeout", 10)
        kwargs.setdefault("decode_responses", True)
        client = redis.Redis(host="127.0.0.1", port=port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_proxy_mode_accepts_the_redis_password_the_app_kept(stack, clients, protocol):
    app = clients(stack.proxy_port, password=ADMIN_PW, protocol=protocol)
    assert app.set("pw:k", "v") is True
    assert app.get("pw:k") == "v"
    assert clients(stack.proxy_port, username="default", password=ADMIN_PW, protocol=protocol).ping() is True
    # No password: the proxy authenticates its own links.
    assert clients(stack.proxy_port, protocol=protocol).get("pw:k") == "v"
    with pytest.raises(AuthenticationError):
        clients(stack.proxy_port, password="wrong", protocol=protocol).ping()


@pytest.mark.parametrize("protocol", [2, 3])
def test_passthrough_redis_acl_decides(stack, clients, protocol):
    app = clients(stack.passthrough_port, username="app", password=APP_PW, protocol=protocol)
    assert app.acl_whoami() == "app"
    assert app.set(f"app:{protocol}", "v") is True
    with pytest.raises(NoPermissionError):
        app.set(f"other:{protocol}", "v")
    # The default user with requirepass, as one-argument AUTH.
    admin = clients(stack.passthrough_port, password=ADMIN_PW, protocol=protocol)
    assert admin.acl_whoami() == "default"
    assert admin.get(f"app:{protocol}") == "v"
    with pytest.raises(AuthenticationError):
        clients(stack.passthrough_port, username="app", password="wrong", protocol=protocol).ping()
    # Without AUTH, Redis's own requirepass applies (-NOAUTH to GET, or to HELLO 3 with
    # Redis's own text).
    with pytest.raises((AuthenticationError, ResponseError)) as err:
        clients(stack.passthrough_port, protocol=protocol).get("app:k")
    assert "uthenticat" in str(err.value)
