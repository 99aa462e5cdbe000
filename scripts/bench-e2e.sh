#!/usr/bin/env bash
# bench-e2e.sh: end-to-end throughput and latency of portcullis vs. Redis direct.
#
# Starts its own redis-server and portcullis on free loopback ports, then runs
# redis-benchmark (-t set,get --csv) against Redis directly and through the proxy,
# interleaved (direct, proxy, direct, proxy, ...) for ROUNDS rounds, and prints a
# markdown table of medians over rounds. Stops only what it started, by pid.
#
# Usage (from the repo root):
#   bash scripts/bench-e2e.sh
#   ROUNDS=5 PIN=none bash scripts/bench-e2e.sh
#
# Environment (defaults in brackets):
#   ROUNDS [3]                 rounds; each runs every test against both targets
#   TESTS  [c50_P1 c50_P16 c1_P1]  -c 50 -P 1 / -c 50 -P 16 / -c 1 -P 1 (latency)
#   N_P1 [200000] N_P16 [1000000] N_LAT [50000]   requests per run (-n)
#   PIN [split]                split: redis-benchmark on CPU_CLIENT, redis + proxy on
#                              CPU_SERVERS (as ../shared/bench/compare.sh); none: no pinning
#   CPU_CLIENT [0] CPU_SERVERS [1]
#   PORTCULLIS_BIN             proxy binary [${CARGO_TARGET_DIR:-target}/release/portcullis];
#                              built with `cargo build --release` when missing
#   PROXY_EXTRA_ARGS           extra flags for the proxy (e.g. "--log-level warn")
#   KEEP_TMP [0]               1: keep the temp dir (logs, raw.tsv)
#   TLS [0]                    1: clients use TLS (needs openssl to make a throwaway CA):
#                              direct = Redis's own tls-port; proxy = portcullis with [tls],
#                              plain TCP to the same Redis (the sidecar setup)
#
# Output columns: test, op, direct rps and proxy rps (median over rounds), ratio
# proxy/direct (median of per-round ratios), p50 direct / proxy in µs (median), added
# p50 µs (median of per-round proxy p50 - direct p50). The c1_P1 row is the latency one.

set -Eeuo pipefail

ROUNDS=${ROUNDS:-3}
TESTS=${TESTS:-"c50_P1 c50_P16 c1_P1"}
N_P1=${N_P1:-200000}
N_P16=${N_P16:-1000000}
N_LAT=${N_LAT:-50000}
PIN=${PIN:-split}
CPU_CLIENT=${CPU_CLIENT:-0}
CPU_SERVERS=${CPU_SERVERS:-1}
KEEP_TMP=${KEEP_TMP:-0}
PROXY_EXTRA_ARGS=${PROXY_EXTRA_ARGS:-}
TLS=${TLS:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/bench.sh
source "$ROOT/scripts/lib/bench.sh"
PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}

log() { printf '[bench-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for bin in redis-server redis-cli redis-benchmark timeout python3; do
  command -v "$bin" >/dev/null 2>&1 || die "missing $bin"
done
set_pinning

if [[ ! -x "$PORTCULLIS_BIN" ]]; then
  log "building $PORTCULLIS_BIN"
  (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
  [[ -x "$PORTCULLIS_BIN" ]] || die "no binary at $PORTCULLIS_BIN after the build"
fi

start_run bench-e2e



REDIS_PORT=$(free_port)
REDIS_TLS_ARGS=()
PROXY_CONFIG_ARGS=()
TLS_CLIENT=()
if [[ "$TLS" == 1 ]]; then
  make_test_ca "$TMP" || die "TLS=1 needs openssl (could not make a test CA)"
  REDIS_TLS_PORT=$(free_port)
  REDIS_TLS_ARGS=(--tls-port "$REDIS_TLS_PORT" --tls-cert-file "$TMP/server.pem"
    --tls-key-file "$TMP/server.key" --tls-ca-cert-file "$TMP/ca.pem" --tls-auth-clients no)
  printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$TMP/server.pem" "$TMP/server.key" >"$TMP/proxy.toml"
  PROXY_CONFIG_ARGS=(--config "$TMP/proxy.toml")
  TLS_CLIENT=(--tls --cacert "$TMP/ca.pem")
fi
"${SRV_PIN[@]}" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --daemonize no --dir "$TMP" --logfile "$TMP/redis.log" "${REDIS_TLS_ARGS[@]}" >/dev/null 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
wait_pong "$REDIS_PORT" "$REDIS_PID" redis
log "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT"

PROXY_PORT=$(free_port)
# shellcheck disable=SC2086  # PROXY_EXTRA_ARGS is a word list on purpose
"${SRV_PIN[@]}" "$PORTCULLIS_BIN" "${PROXY_CONFIG_ARGS[@]}" --listen "127.0.0.1:$PROXY_PORT" \
  --backend "127.0.0.1:$REDIS_PORT" --admin-listen '' $PROXY_EXTRA_ARGS >"$TMP/proxy.log" 2>&1 &
PROXY_PID=$!; PIDS+=("$PROXY_PID")
PING_ARGS=("${TLS_CLIENT[@]}")
wait_pong "$PROXY_PORT" "$PROXY_PID" proxy
log "portcullis pid $PROXY_PID on 127.0.0.1:$PROXY_PORT ($PORTCULLIS_BIN)"
DIRECT_PORT=$REDIS_PORT
if [[ "$TLS" == 1 ]]; then
  DIRECT_PORT=$REDIS_TLS_PORT
  log "TLS: direct = redis tls-port $REDIS_TLS_PORT; proxy terminates TLS, plain to redis"
fi

test_args() {
  case "$1" in
    c50_P1)  echo "-c 50 -n $N_P1 -P 1" ;;
    c50_P16) echo "-c 50 -n $N_P16 -P 16" ;;
    c1_P1)   echo "-c 1 -n $N_LAT -P 1" ;;
    *) die "unknown test $1" ;;
  esac
}
for t in $TESTS; do test_args "$t" >/dev/null; done

bench() {  # bench OUT PORT ARGS...
  local out=$1 port=$2 rc=0; shift 2
  timeout 600 "${CLI_PIN[@]}" redis-benchmark -h 127.0.0.1 -p "$port" "${TLS_CLIENT[@]}" -t set,get --csv \
    --precision 3 "$@" >"$out" 2>>"$TMP/bench-stderr.log" &
  BENCH_PID=$!
  wait "$BENCH_PID" || rc=$?
  BENCH_PID=
  return "$rc"
}

# warm-up (discarded): connections, allocator, caches
for port in "$DIRECT_PORT" "$PROXY_PORT"; do
  bench "$TMP/warmup.csv" "$port" -c 50 -n 20000 -P 1 || die "warm-up failed on port $port"
done

# raw.tsv: round target test op rps p50_ms
: >"$TMP/raw.tsv"
for ((r=1; r<=ROUNDS; r++)); do
  for t in $TESTS; do
    read -r -a args <<<"$(test_args "$t")"
    for tp in "direct:$DIRECT_PORT" "proxy:$PROXY_PORT"; do
      name=${tp%%:*}; port=${tp##*:}
      bench "$TMP/run.csv" "$port" "${args[@]}" || die "redis-benchmark against $name ($t, round $r) failed"
      kill -0 "$PROXY_PID" 2>/dev/null || die "proxy exited during $t round $r"
      rows=$(awk -F, -v r="$r" -v n="$name" -v t="$t" 'NR>1 { gsub(/"/,""); printf "%s\t%s\t%s\t%s\t%s\t%s\n", r,n,t,$1,$2,$5 }' "$TMP/run.csv")
      [[ $(grep -c . <<<"$rows") -eq 2 ]] || die "unexpected redis-benchmark output: $(cat "$TMP/run.csv")"
      printf '%s\n' "$rows" >>"$TMP/raw.tsv"
      awk -F'\t' '{ printf "round %s %-6s %-8s %-3s %10.0f rps  p50 %.3f ms\n", $1,$2,$3,$4,$5,$6 }' <<<"$rows" >&2
    done
  done
done

echo
echo "portcullis vs direct Redis: $ROUNDS rounds, median; pin=$PIN; tls=$TLS; $(redis-server --version | awk '{print $3}')"
echo
awk -F'\t' -v tests="$TESTS" "$AWK_MED"'
{ R[$1, $2, $3, $4, "rps"] = $5; R[$1, $2, $3, $4, "p50"] = $6; rounds[$1] = 1 }
END {
  print "| test | op | direct rps | proxy rps | proxy/direct | p50 direct µs | p50 proxy µs | added p50 µs |"
  print "|---|---|---:|---:|---:|---:|---:|---:|"
  nt = split(tests, T, " ")
  for (ti = 1; ti <= nt; ti++) for (oi = 1; oi <= 2; oi++) {
    t = T[ti]; op = (oi == 1 ? "SET" : "GET")
    dr = pr = ra = dp = pp = ad = ""
    for (r in rounds) {
      if (!((r, "direct", t, op, "rps") in R) || !((r, "proxy", t, op, "rps") in R)) continue
      d = R[r, "direct", t, op, "rps"]; p = R[r, "proxy", t, op, "rps"]
      dr = dr " " d; pr = pr " " p; if (d > 0) ra = ra " " p / d
      d50 = R[r, "direct", t, op, "p50"] * 1000; p50 = R[r, "proxy", t, op, "p50"] * 1000
      dp = dp " " d50; pp = pp " " p50; ad = ad " " (p50 - d50)
    }
    if (dr == "") continue
    printf "| %s | %s | %.0f | %.0f | %.2f | %.0f | %.0f | %+.0f |\n", t, op, med(dr), med(pr), med(ra), med(dp), med(pp), med(ad)
  }
}' "$TMP/raw.tsv"
echo
echo "tests: c50_P1 = -c 50 -n $N_P1 -P 1; c50_P16 = -c 50 -n $N_P16 -P 16; c1_P1 = -c 1 -n $N_LAT -P 1"
