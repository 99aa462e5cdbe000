#!/usr/bin/env bash
# bench-cluster.sh: a Redis Cluster through portcullis (a plain client) against the same
# cluster reached directly by a cluster-aware client (redis-benchmark --cluster), in one
# run: throughput and CPU per request.
#
# Starts its own cluster (NODES masters, no replicas, `redis-cli --cluster create`) and one
# portcullis per mode (`--cluster-seed`) on free loopback ports, then runs redis-benchmark
# (-t set,get -r KEYS --csv, so keys spread over every slot) against each target,
# interleaved every round. Around each run it reads utime+stime (/proc/PID/stat) of the
# proxy and of every node: "proxy µs/req" is the proxy's own cost, "redis µs/req" what
# the nodes together spent per request. Stops only what it started, by pid.
#
# Usage (from the repo root, after `cargo build --release`):
#   bash scripts/bench-cluster.sh
#   MODES="shared" TESTS="c50_P16" ROUNDS=5 bash scripts/bench-cluster.sh
#
# Environment (defaults in brackets):
#   NODES [3]  ROUNDS [3]  KEYS [100000]
#   TESTS [c50_P1 c50_P16 c1_P1]   -c 50 -P 1|16|128 (c50_P128 too), and -c 1 -P 1
#   N_P1 [100000] N_P16 [500000] N_P128 [1000000] N_LAT [20000]   requests per op (-n)
#   MODES [dedicated shared]   one proxy per mode (--backend-connections MODE)
#   PIN [split] CPU_CLIENT [0] CPU_SERVERS [1]   as ../shared/bench/compare.sh
#   PORTCULLIS_BIN [target/release/portcullis]  KEEP_TMP [0]

set -Eeuo pipefail

NODES=${NODES:-3}
ROUNDS=${ROUNDS:-3}
KEYS=${KEYS:-100000}
TESTS=${TESTS:-"c50_P1 c50_P16 c1_P1"}
N_P1=${N_P1:-100000}
N_P16=${N_P16:-500000}
N_P128=${N_P128:-1000000}
N_LAT=${N_LAT:-20000}
MODES=${MODES:-"dedicated shared"}
PIN=${PIN:-split}
CPU_CLIENT=${CPU_CLIENT:-0}
CPU_SERVERS=${CPU_SERVERS:-1}
KEEP_TMP=${KEEP_TMP:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/bench.sh
source "$ROOT/scripts/lib/bench.sh"
PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}

log() { printf '[bench-cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for bin in redis-server redis-cli redis-benchmark timeout python3; do
  command -v "$bin" >/dev/null 2>&1 || die "missing $bin"
done
set_pinning
[[ -x "$PORTCULLIS_BIN" ]] || die "no binary at $PORTCULLIS_BIN (cargo build --release)"

start_run bench-cluster

start_cluster "$NODES" "${SRV_PIN[@]}"
SEED=${NODE_ADDRS[0]}
log "cluster of $NODES masters: ${NODE_ADDRS[*]}"

TARGETS=("direct:${SEED##*:}:")
for mode in $MODES; do
  port=$(free_port)
  "${SRV_PIN[@]}" "$PORTCULLIS_BIN" --listen "127.0.0.1:$port" --cluster-seed "$SEED" \
    --admin-listen '' --backend-connections "$mode" >"$TMP/$mode.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait_pong "$port" "$pid" "$mode"
  deadline=$((SECONDS + 30))
  # Ready once a write on every shard goes through (every slot has a confirmed master).
  until [[ "$(redis-cli -h 127.0.0.1 -p "$port" MSET '{a}x' 1 '{b}x' 1 '{c}x' 1 2>/dev/null)" == OK ]]; do
    (( SECONDS < deadline )) || die "portcullis ($mode) never served the cluster: $(tail -5 "$TMP/$mode.log")"
    sleep 0.1
  done
  log "portcullis ($mode) pid $pid on 127.0.0.1:$port"
  TARGETS+=("$mode:$port:$pid")
done

test_args() {
  case "$1" in
    c50_P1)   echo "-c 50 -n $N_P1 -P 1" ;;
    c50_P16)  echo "-c 50 -n $N_P16 -P 16" ;;
    c50_P128) echo "-c 50 -n $N_P128 -P 128" ;;
    c1_P1)    echo "-c 1 -n $N_LAT -P 1" ;;
    *) die "unknown test $1" ;;
  esac
}
test_n() { test_args "$1" | awk '{ print $4 }'; }
for t in $TESTS; do test_args "$t" >/dev/null; done

bench() {  # bench OUT TARGET-NAME PORT ARGS...
  local out=$1 name=$2 port=$3 rc=0 cluster=()
  shift 3
  [[ "$name" == direct ]] && cluster=(--cluster)
  timeout 600 "${CLI_PIN[@]}" redis-benchmark -h 127.0.0.1 -p "$port" "${cluster[@]}" \
    -t set,get -r "$KEYS" --csv --precision 3 "$@" >"$out" 2>>"$TMP/bench-stderr.log" &
  BENCH_PID=$!
  wait "$BENCH_PID" || rc=$?
  BENCH_PID=
  return "$rc"
}

for tp in "${TARGETS[@]}"; do
  IFS=: read -r name port _ <<<"$tp"
  bench "$TMP/warmup.csv" "$name" "$port" -c 50 -n 20000 -P 1 || die "warm-up failed on $name"
done

: >"$TMP/raw.tsv"
for ((r=1; r<=ROUNDS; r++)); do
  for t in $TESTS; do
    read -r -a args <<<"$(test_args "$t")"
    n=$(test_n "$t")
    for tp in "${TARGETS[@]}"; do
      IFS=: read -r name port pid <<<"$tp"
      p0=0; p1=0
      [[ -n "$pid" ]] && p0=$(cpu_ms "$pid")
      r0=$(cpu_ms "${NODE_PIDS[@]}")
      bench "$TMP/run.csv" "$name" "$port" "${args[@]}" || die "redis-benchmark against $name ($t, round $r) failed"
      [[ -n "$pid" ]] && p1=$(cpu_ms "$pid")
      r1=$(cpu_ms "${NODE_PIDS[@]}")
      row=$(awk -F, -v r="$r" -v nm="$name" -v t="$t" -v n="$n" -v pc="$((p1 - p0))" -v rc="$((r1 - r0))" '
        /^"(SET|GET)"/ { gsub(/"/,""); rps += $2; p50 += $5; k++ }  # --cluster prints the masters first
        END {
          if (k != 2) exit 1
          proxy = (nm == "direct") ? 0 : pc * 1000 / (2 * n)
          printf "%s\t%s\t%s\t%.0f\t%.4f\t%.3f\t%.3f\n", r, nm, t, rps / 2, p50 / 2, proxy, rc * 1000 / (2 * n)
        }' "$TMP/run.csv") || die "unexpected redis-benchmark output: $(cat "$TMP/run.csv")"
      printf '%s\n' "$row" >>"$TMP/raw.tsv"
      awk -F'\t' '{ printf "round %s %-10s %-9s %10.0f rps  p50 %.3f ms  proxy %.3f µs/req  nodes %.3f µs/req\n", $1,$2,$3,$4,$5,$6,$7 }' <<<"$row" >&2
    done
  done
done

echo
echo "Redis Cluster ($NODES masters) through portcullis vs a cluster-aware client (redis-benchmark --cluster): $ROUNDS rounds, median; pin=$PIN; $(redis-server --version | awk '{print $3}'); modes: $MODES; keys: -r $KEYS"
echo "(redis µs/req: all nodes together)"
echo
cpu_table "$TMP/raw.tsv" "$TESTS" "$(for tp in "${TARGETS[@]}"; do printf '%s ' "${tp%%:*}"; done)"
echo
echo "tests: c50_P1 = -c 50 -n $N_P1 -P 1; c50_P16 = -c 50 -n $N_P16 -P 16; c50_P128 = -c 50 -n $N_P128 -P 128; c1_P1 = -c 1 -n $N_LAT -P 1 (-t set,get; n per op)"
