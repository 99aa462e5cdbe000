#!/usr/bin/env bash
# bench-instructions.sh: user-space instructions per request of portcullis, counted by
# valgrind's callgrind, per upstream mode and pipeline depth.
#
# Why beside bench-cpu.sh: on a shared or virtual machine, CPU time per request moves by
# 10-20 % between runs (host steal, frequency), which hides the effect of most single
# changes. An instruction count does not depend on what else the machine does: the same
# binary and workload give the same count within ~0.2 %, so two builds compare in one run
# (BASE_BIN). It does not see the kernel (syscalls, wake-ups) nor cache misses and atomic
# operations: bench-cpu.sh stays the measure of record; this one says which way a change
# goes and where the instructions are.
#
# Starts its own redis-server (not under valgrind) and, per binary and mode, one
# portcullis under callgrind on free loopback ports. A warm-up run, then counters are
# zeroed, redis-benchmark -c 50 runs SET and GET with N requests each, and the counters
# are dumped. Prints instructions per request (total / 2N). Stops only what it started.
#
# Usage (from the repo root, after `cargo build --release`):
#   bash scripts/bench-instructions.sh
#   BASE_BIN=/tmp/portcullis-main PIPELINES="1 16" MODES=shared bash scripts/bench-instructions.sh
#
# Environment (defaults in brackets):
#   MODES [dedicated shared]   --backend-connections per run
#   PIPELINES [1 16]           redis-benchmark -P values
#   N [100000]                 requests per op (SET and GET)
#   CLIENTS [50]               redis-benchmark -c
#   PORTCULLIS_BIN [target/release/portcullis]
#   BASE_BIN                   optional: another build measured the same way ("base")
#   OTHERS [""]                "haproxy": HAProxy (TCP mode, 1 thread, bench-cpu.sh's
#                              recipe) measured the same way, per pipeline depth, for
#                              scale: it parses nothing, so it is a floor for a proxy's
#                              own work per request, not a like-for-like program
#   PROXY_CPUS [1]             CPU list the proxy runs on (taskset -c): one CPU gives it
#                              the single-threaded runtime, as bench-cpu.sh's pinning
#                              does; "all" runs it unpinned (multi-threaded runtime)
#   TOP [0]                    >0: also print the TOP functions by inclusive count for
#                              each run (callgrind_annotate)
#   KEEP_TMP [0]               1: keep the callgrind.out files

set -Eeuo pipefail

MODES=${MODES:-"dedicated shared"}
PIPELINES=${PIPELINES:-"1 16"}
N=${N:-100000}
CLIENTS=${CLIENTS:-50}
TOP=${TOP:-0}
KEEP_TMP=${KEEP_TMP:-0}
PROXY_CPUS=${PROXY_CPUS:-1}
OTHERS=${OTHERS:-}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/bench.sh
source "$ROOT/scripts/lib/bench.sh"
PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}

log() { printf '[bench-instructions %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for bin in redis-server redis-cli redis-benchmark valgrind callgrind_control python3; do
  command -v "$bin" >/dev/null 2>&1 || die "missing $bin (apt-get install -y valgrind redis-server redis-tools)"
done
[[ -x "$PORTCULLIS_BIN" ]] || die "no binary at $PORTCULLIS_BIN (cargo build --release)"

start_run bench-instructions

REDIS_PORT=$(free_port)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --daemonize no --dir "$TMP" --logfile "$TMP/redis.log" >/dev/null 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
wait_pong "$REDIS_PORT" "$REDIS_PID" redis
log "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT"

BINS=("new:$PORTCULLIS_BIN")
[[ -n "${BASE_BIN:-}" ]] && BINS=("base:$BASE_BIN" "${BINS[@]}")

# The total instruction count of a callgrind dump.
total_ir() {
  awk '/^(summary|totals):/ { print $2; exit }' "$1"
}

rows=()
# measure NAME MODE PIPELINE PORT CMD...: run CMD (listening on PORT) under callgrind,
# count the instructions of N SET and N GET requests after a warm-up, add a row.
measure() {
  local name=$1 mode=$2 p=$3 port=$4 out pid dump ir per; shift 4
  out="$TMP/callgrind.$name.$mode.P$p"
  local pin=()
  [[ "$PROXY_CPUS" != all ]] && pin=(taskset -c "$PROXY_CPUS")
  "${pin[@]}" valgrind --tool=callgrind --callgrind-out-file="$out.%p" "$@" \
    >"$TMP/$name.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait_pong "$port" "$pid" "$name"
  redis-benchmark -h 127.0.0.1 -p "$port" -c "$CLIENTS" -P "$p" -n 2000 -t set,get -q \
    >/dev/null 2>>"$TMP/bench-stderr.log" || die "warm-up failed ($name $mode P$p)"
  callgrind_control -z "$pid" >/dev/null
  redis-benchmark -h 127.0.0.1 -p "$port" -c "$CLIENTS" -P "$p" -n "$N" -t set,get -q \
    >/dev/null 2>>"$TMP/bench-stderr.log" || die "redis-benchmark failed ($name $mode P$p)"
  callgrind_control -d "$pid" >/dev/null
  stop_pid "$pid"
  # The dump taken above is the first numbered part; the rest is shutdown.
  dump=$(ls "$out.$pid".* 2>/dev/null | head -1)
  [[ -n "$dump" ]] || die "no callgrind dump for $name $mode P$p"
  ir=$(total_ir "$dump")
  per=$(awk -v ir="$ir" -v n="$N" 'BEGIN { printf "%.0f", ir / (2 * n) }')
  log "$name $mode P$p: $per instructions per request"
  rows+=("$name $mode $p $per")
  if (( TOP > 0 )); then
    callgrind_annotate --inclusive=yes --threshold=100 "$dump" 2>/dev/null \
      | grep -E '^ *[0-9,]+ ' | grep 'portcullis::' | head -n "$TOP" | cut -c1-160 >&2 || true
  fi
}

for entry in "${BINS[@]}"; do
  name=${entry%%:*}; bin=${entry#*:}
  for mode in $MODES; do
    for p in $PIPELINES; do
      port=$(free_port)
      measure "$name" "$mode" "$p" "$port" "$bin" --listen "127.0.0.1:$port" \
        --backend "127.0.0.1:$REDIS_PORT" --admin-listen '' --backend-connections "$mode"
    done
  done
done

for other in $OTHERS; do
  case "$other" in
    haproxy)
      command -v haproxy >/dev/null 2>&1 || { log "no haproxy: skipped"; continue; }
      for p in $PIPELINES; do
        port=$(free_port)
        haproxy_config "$port" "$REDIS_PORT" >"$TMP/haproxy.cfg"
        measure haproxy tcp "$p" "$port" haproxy -db -f "$TMP/haproxy.cfg"
      done
      ;;
    *) die "unknown entry in OTHERS: $other (haproxy)" ;;
  esac
done

echo
echo "user-space instructions per request (callgrind; -c $CLIENTS, SET+GET, n=$N per op; proxy on CPUs $PROXY_CPUS)"
echo
echo "| binary | mode | pipeline | instructions/request |"
echo "|---|---|---:|---:|"
for row in "${rows[@]}"; do
  read -r name mode p per <<<"$row"
  echo "| $name | $mode | $p | $per |"
done
