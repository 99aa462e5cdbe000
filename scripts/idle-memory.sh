#!/usr/bin/env bash
# idle-memory.sh: proxy memory per idle client connection.
#
# Starts its own redis-server and portcullis on free loopback ports, then (one Python
# process with raw sockets) opens N idle client connections to the proxy in two halves:
#   silent: connect and never send anything (no backend connection expected)
#   pinged: send one PING, read +PONG, then stay idle (holds a backend connection)
# and reads the proxy's VmRSS from /proc/PID/status before and after each half, once
# the proxy has accepted every connection (its fd count) and RSS has settled.
# Prints KiB per connection for each half. Stops only what it started, by pid.
#
# Usage (from the repo root):
#   bash scripts/idle-memory.sh
#   CONNS=2000 bash scripts/idle-memory.sh
#
# Environment (defaults in brackets):
#   CONNS [10000]     total idle connections (half silent, half pinged)
#   NOFILE [30000]    ulimit -n for this script, redis and the proxy (capped at the hard limit)
#   PORTCULLIS_BIN    [${CARGO_TARGET_DIR:-target}/release/portcullis]; built when missing
#   KEEP_TMP [0]      1: keep the temp dir (logs, config)
#   MODE [dedicated]  routing.backend_connections (--backend-connections): dedicated or
#                     shared (pinged clients then share a few backend connections)
#   TLS [0]           1: clients connect with TLS (handshake done, then idle); needs openssl
#   CLUSTER [0]       N > 0: in front of a Redis Cluster of N masters (--cluster-seed); the
#                     pinged half sends one SET to each of three slots on different
#                     masters (hash tags {a} {b} {c}) instead of PING, and the backend
#                     connections each node holds (its connected_clients) are printed

set -Eeuo pipefail

CONNS=${CONNS:-10000}
NOFILE=${NOFILE:-30000}
KEEP_TMP=${KEEP_TMP:-0}
TLS=${TLS:-0}
MODE=${MODE:-dedicated}
CLUSTER=${CLUSTER:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/bench.sh
source "$ROOT/scripts/lib/bench.sh"
PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}

log() { printf '[idle-memory %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for bin in redis-server redis-cli python3 timeout; do
  command -v "$bin" >/dev/null 2>&1 || die "missing $bin"
done
# the proxy needs one fd per client plus one per backend connection (CONNS * 1.5)
HARD=$(ulimit -Hn)
if [[ "$HARD" != unlimited ]] && (( NOFILE > HARD )); then NOFILE=$HARD; fi
(( NOFILE >= CONNS * 3 / 2 + 200 )) || die "ulimit -n hard limit $HARD is too low for CONNS=$CONNS"
ulimit -n "$NOFILE" || die "cannot raise ulimit -n to $NOFILE"

if [[ ! -x "$PORTCULLIS_BIN" ]]; then
  log "building $PORTCULLIS_BIN"
  (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
fi

start_run idle-memory


if (( CLUSTER > 0 )); then
  CLUSTER_NODE_ARGS=(--maxclients $((CONNS * 3 + 1000)))
  start_cluster "$CLUSTER"
  UPSTREAM=(--cluster-seed "${NODE_ADDRS[0]}")
  log "cluster of $CLUSTER masters: ${NODE_ADDRS[*]}"
else
  REDIS_PORT=$(free_port)
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize no \
    --maxclients $((CONNS + 1000)) --dir "$TMP" --logfile "$TMP/redis.log" >/dev/null 2>&1 &
  REDIS_PID=$!; PIDS+=("$REDIS_PID")
  wait_pong "$REDIS_PORT" "$REDIS_PID" redis
  UPSTREAM=(--backend "127.0.0.1:$REDIS_PORT")
  NODE_ADDRS=("127.0.0.1:$REDIS_PORT")
fi

# max_clients above CONNS, so the readiness PINGs never compete with the idle set
cat >"$TMP/portcullis.toml" <<EOF
[limits]
max_clients = $((CONNS + 1000))
EOF
CA=""
if [[ "$TLS" == 1 ]]; then
  make_test_ca "$TMP" || die "TLS=1 needs openssl (could not make a test CA)"
  printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$TMP/server.pem" "$TMP/server.key" >>"$TMP/portcullis.toml"
  CA="$TMP/ca.pem"
fi
PROXY_PORT=$(free_port)
"$PORTCULLIS_BIN" --config "$TMP/portcullis.toml" --listen "127.0.0.1:$PROXY_PORT" \
  "${UPSTREAM[@]}" --admin-listen '' --log-level warn \
  --backend-connections "$MODE" >"$TMP/proxy.log" 2>&1 &
PROXY_PID=$!; PIDS+=("$PROXY_PID")
[[ "$TLS" == 1 ]] && PING_ARGS=(--tls --cacert "$CA")
wait_pong "$PROXY_PORT" "$PROXY_PID" proxy
log "redis ${NODE_ADDRS[*]}, portcullis pid $PROXY_PID :$PROXY_PORT, $CONNS connections"

if (( CLUSTER > 0 )); then
  # readiness: the proxy serves every slot
  deadline=$((SECONDS + 30))
  until redis-cli -p "$PROXY_PORT" CLUSTER INFO 2>/dev/null | grep -q 'cluster_state:ok'; do
    (( SECONDS < deadline )) || die "the proxy never served every slot"
    sleep 0.1
  done
fi

python3 - "$PROXY_PID" "$PROXY_PORT" "$CONNS" "$CA" "$MODE" "$CLUSTER" "${NODE_ADDRS[*]}" <<'PY'
import os, socket, ssl, sys, time

pid, port, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cluster, nodes = int(sys.argv[6]), sys.argv[7].split()
# what a pinged client sends: PING, or (cluster) one SET to each of three masters' slots
if cluster:
    keys = [b"{a}k", b"{b}k", b"{c}k"]   # slots 15495, 3300, 7365: three thirds of 16384
    hello = b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\nv\r\n" % (len(k), k) for k in keys)
    answer = b"+OK\r\n" * len(keys)
else:
    hello, answer = b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"
what = "three SETs, one per master" if cluster else "one PING"
# shared mode: pinged clients share the proxy's few backend connections
links_each = min(3, cluster) if cluster else 1
backend_fd_each = 0 if sys.argv[5] == "shared" else links_each
tls = ssl.create_default_context(cafile=sys.argv[4]) if sys.argv[4] else None
half = total // 2

def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")

def nfds():
    return len(os.listdir(f"/proc/{pid}/fd"))

def settle(min_fds, deadline_s=60):
    """Wait until the proxy holds at least min_fds fds and RSS is stable for 1 s."""
    end = time.time() + deadline_s
    while nfds() < min_fds:
        if time.time() > end:
            raise SystemExit(f"proxy has {nfds()} fds, expected >= {min_fds}")
        time.sleep(0.1)
    last = rss_kib()
    while time.time() < end:
        time.sleep(1.0)
        now = rss_kib()
        if abs(now - last) < 64:
            return now
        last = now
    return last

def connect():
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        s = tls.wrap_socket(s, server_hostname="localhost")  # handshake completes here
    return s

def read_exact(s, want):
    buf = b""
    while len(buf) < len(want):
        chunk = s.recv(len(want) - len(buf))
        if not chunk:
            raise SystemExit("proxy closed a connection")
        buf += chunk
    if buf != want:
        raise SystemExit(f"unexpected reply {buf!r}")

# Warm the runtime and allocator with one full round trip so the baseline is fair.
w = connect(); w.sendall(b"PING\r\n"); read_exact(w, b"+PONG\r\n"); w.close()
time.sleep(0.5)

fd0 = nfds(); rss0 = settle(fd0)
silent = [connect() for _ in range(half)]
rss1 = settle(fd0 + half)               # one fd per client connection
pinged = []
for _ in range(total - half):
    s = connect()
    s.sendall(hello)
    read_exact(s, answer)
    pinged.append(s)
rss2 = settle(fd0 + half + (1 + backend_fd_each) * (total - half))   # client (+ backend) fd each
fd2 = nfds()

n_p = total - half
print()
print(f"portcullis idle connections{' (TLS)' if tls else ''}: {total} ({half} silent, {n_p} after {what}); fds {fd0} -> {fd2}")
print()
print("| phase | connections | proxy VmRSS KiB | delta KiB | KiB per connection |")
print("|---|---:|---:|---:|---:|")
print(f"| baseline | 0 | {rss0} | | |")
print(f"| + silent (no bytes sent) | {half} | {rss1} | {rss1 - rss0} | {(rss1 - rss0) / half:.2f} |")
print(f"| + after {what} | {n_p} | {rss2} | {rss2 - rss1} | {(rss2 - rss1) / n_p:.2f} |")
print(f"| all | {total} | {rss2} | {rss2 - rss0} | {(rss2 - rss0) / total:.2f} |")

def connected_clients(addr):
    host, p = addr.rsplit(":", 1)
    c = socket.create_connection((host, int(p)), timeout=10)
    c.sendall(b"*2\r\n$4\r\nINFO\r\n$7\r\nclients\r\n")
    data = b""
    while b"connected_clients:" not in data or not data.endswith(b"\r\n"):
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    c.close()
    for line in data.split(b"\r\n"):
        if line.startswith(b"connected_clients:"):
            return int(line.split(b":")[1]) - 1   # minus this INFO connection
    return -1

print()
print("backend connections held (each node's connected_clients, the prober's and slot-map reader's included):", ", ".join(f"{a} {connected_clients(a)}" for a in nodes))
for s in silent + pinged:
    s.close()
PY
