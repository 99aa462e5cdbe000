#!/usr/bin/env python3
"""stall-client.py HOST:PORT SECONDS: what a plain client sees during a stall.

A writer sends `SET stall:w <i>` every 50 ms on one open connection; a reader sends
`GET stall:w` every 250 ms, each on a new connection. Replies are read with a 30 s
timeout (a client that waits, as against Redis alone). Prints one line:
`ok=N errors=CODE:COUNT,... max_ms=M`; a connection failure counts as error `CONN`
and the client reconnects 100 ms later. Used by scripts/stall-scenarios.sh.
"""
import socket
import sys
import threading
import time

host, port = sys.argv[1].rsplit(":", 1)
port = int(port)
duration = float(sys.argv[2])
lock = threading.Lock()
stats = {"ok": 0, "errors": {}, "max_ms": 0.0}


def enc(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def read_reply(f):
    line = f.readline()
    if not line:
        raise EOFError("closed")
    if line[:1] == b"$" and int(line[1:]) >= 0:
        f.read(int(line[1:]) + 2)
    return line


def record(reply, started):
    ms = (time.time() - started) * 1000
    with lock:
        stats["max_ms"] = max(stats["max_ms"], ms)
        if reply.startswith(b"-"):
            code = reply[1:].split(b" ", 1)[0].strip().decode(errors="replace")
            stats["errors"][code] = stats["errors"].get(code, 0) + 1
        else:
            stats["ok"] += 1


def connect():
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s, s.makefile("rb")


def writer(end):
    conn, i = None, 0
    while time.time() < end:
        i += 1
        started = time.time()
        try:
            if conn is None:
                conn = connect()
            conn[0].sendall(enc(b"SET", b"stall:w", str(i).encode()))
            record(read_reply(conn[1]), started)
        except (OSError, EOFError, ValueError):
            record(b"-CONN", started)
            conn = None
            time.sleep(0.1)
        time.sleep(0.05)


def reader(end):
    while time.time() < end:
        started = time.time()
        try:
            s, f = connect()
            s.sendall(enc(b"GET", b"stall:w"))
            record(read_reply(f), started)
            s.close()
        except (OSError, EOFError, ValueError):
            record(b"-CONN", started)
        time.sleep(0.25)


end = time.time() + duration
threads = [threading.Thread(target=t, args=(end,)) for t in (writer, reader)]
for t in threads:
    t.start()
for t in threads:
    t.join()
errors = ",".join(f"{k}:{v}" for k, v in sorted(stats["errors"].items())) or "none"
print(f"ok={stats['ok']} errors={errors} max_ms={stats['max_ms']:.0f}")
