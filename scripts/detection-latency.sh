#!/usr/bin/env bash
# detection-latency.sh: time from a backend's role change (REPLICAOF sent straight to it)
# to the proxy no longer having it as the confirmed master (/topology), over N trials.
# Target: at most one probe interval + probe timeout (defaults 500 ms + 500 ms).
#
#   bash scripts/detection-latency.sh            # 10 trials, default probe settings
#   TRIALS=20 bash scripts/detection-latency.sh
#
# Loopback only; starts its own redis-servers and proxy and stops them by pid.
set -euo pipefail

TRIALS=${TRIALS:-10}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}
[[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --release --locked)

TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_pong() { for _ in $(seq 200); do [[ "$(redis-cli -p "$1" PING 2>/dev/null)" == PONG ]] && return 0; sleep 0.05; done; echo "no PONG on $1" >&2; exit 1; }

VICTIM=$(free_port); OTHER=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
for p in "$VICTIM" "$OTHER"; do
  redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" >/dev/null 2>&1 &
  PIDS+=($!)
  wait_pong "$p"
done
"$BIN" --listen "127.0.0.1:$PROXY" --backend "127.0.0.1:$VICTIM" --admin-listen "127.0.0.1:$ADMIN" \
  --log-level warn 2>"$TMP/proxy.log" &
PIDS+=($!)
wait_pong "$PROXY"

now_ms() { date +%s%3N; }
master_confirmed() { curl -s "127.0.0.1:$ADMIN/topology" | grep -q '"confirmed_master": "127.0.0.1'; }

results=()
for i in $(seq "$TRIALS"); do
  # back to master, and wait until the proxy confirms it again
  redis-cli -p "$VICTIM" REPLICAOF NO ONE >/dev/null
  until master_confirmed; do sleep 0.01; done
  # desynchronise the trial start from the probe schedule
  sleep "0.$((RANDOM % 500 + 100))"
  t0=$(now_ms)
  redis-cli -p "$VICTIM" REPLICAOF 127.0.0.1 "$OTHER" >/dev/null
  while master_confirmed; do sleep 0.002; done
  results+=($(( $(now_ms) - t0 )))
done
redis-cli -p "$VICTIM" REPLICAOF NO ONE >/dev/null
sorted=$(printf '%s\n' "${results[@]}" | sort -n)
echo "detection latency over $TRIALS trials (ms): $(echo $sorted)"
echo "min $(echo "$sorted" | head -1) ms, median $(echo "$sorted" | sed -n "$(( (TRIALS + 1) / 2 ))p") ms, max $(echo "$sorted" | tail -1) ms (target: <= 1000 ms = probe interval + timeout)"
