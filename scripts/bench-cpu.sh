#!/usr/bin/env bash
# bench-cpu.sh: throughput AND CPU per request, direct Redis vs portcullis per upstream
# mode (dedicated / shared backend connections), in one run.
#
# Starts its own redis-server and one portcullis per mode on free loopback ports, then
# runs redis-benchmark (-t set,get --csv) against each target, interleaved every round.
# Around each run it reads utime+stime (/proc/PID/stat) of the proxy and of Redis, and
# prints µs of CPU per request served beside rps: "proxy µs/req" is the proxy's own cost,
# "redis µs/req" is what Redis spent per request behind it (batched writes from a shared
# connection make Redis cheaper per request). Stops only what it started, by pid.
#
# Usage (from the repo root, after `cargo build --release`):
#   bash scripts/bench-cpu.sh
#   MODES="dedicated shared" TESTS="c50_P1 c50_P16" ROUNDS=5 bash scripts/bench-cpu.sh
#
# Environment (defaults in brackets):
#   ROUNDS [3]
#   TESTS [c50_P1 c50_P16 c50_P128 c1_P1]   -c 50 -P 1|16|128, and -c 1 -P 1 (latency)
#   N_P1 [200000] N_P16 [1000000] N_P128 [2000000] N_LAT [50000]   requests per op (-n)
#   MODES [dedicated shared]  one proxy per mode, started with --backend-connections MODE;
#                             "default" starts one with no such flag (older binaries)
#   PIN [split] CPU_CLIENT [0] CPU_SERVERS [1]   as ../shared/bench/compare.sh
#   PORTCULLIS_BIN [target/release/portcullis]
#   BASE_BIN                  optional: another binary (e.g. a build of main) added as
#                             target "base", started without --backend-connections
#   OTHERS [haproxy twemproxy]  other proxies measured the same way in the same run, each
#                             skipped when its binary is missing: HAProxy in TCP mode
#                             (1 thread, the "route only to the master" tcp-check recipe
#                             of ../shared/bench/compare.sh), twemproxy (nutcracker, one
#                             pool, preconnect). OTHERS= measures portcullis alone.
#   PROXY_EXTRA_ARGS          extra proxy flags
#   KEEP_TMP [0]
#
# Columns: rps (median over rounds, SET and GET averaged), x direct (median of per-round
# ratios), proxy µs/req and redis µs/req (CPU time over the run / requests in the run,
# median), proxy user µs/req (the user-space part of the proxy's: proxies making the
# same system calls differ mostly there), client µs/req (redis-benchmark's own CPU per
# request, from bash's `times`: when it nears its core's whole time per request, the
# client, not the target, sets the rate), p50 µs (median; the c1_P1 row is the latency
# one), added p50 vs direct.
# CPU comes from clock ticks (getconf CLK_TCK, 10 ms): runs last seconds, so ~1 %.
# A second table shows how the server core was shared (medians): Redis's requests per
# wake-up (requests / its voluntary context switches: each is one sleep in its event
# loop) and the proxy's preemptions per 1,000 requests (its involuntary context
# switches, all threads).
# After the table, each mode against each of OTHERS, paired by round (measured seconds
# apart, so a slow phase of the machine hits both): the median of the per-round rps
# ratios and the rounds portcullis was ahead in.

set -Eeuo pipefail

ROUNDS=${ROUNDS:-3}
TESTS=${TESTS:-"c50_P1 c50_P16 c50_P128 c1_P1"}
N_P1=${N_P1:-200000}
N_P16=${N_P16:-1000000}
N_P128=${N_P128:-2000000}
N_LAT=${N_LAT:-50000}
MODES=${MODES:-"dedicated shared"}
PIN=${PIN:-split}
CPU_CLIENT=${CPU_CLIENT:-0}
CPU_SERVERS=${CPU_SERVERS:-1}
KEEP_TMP=${KEEP_TMP:-0}
PROXY_EXTRA_ARGS=${PROXY_EXTRA_ARGS:-}
OTHERS=${OTHERS-"haproxy twemproxy"}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/bench.sh
source "$ROOT/scripts/lib/bench.sh"
PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}

log() { printf '[bench-cpu %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for bin in redis-server redis-cli redis-benchmark timeout python3; do
  command -v "$bin" >/dev/null 2>&1 || die "missing $bin"
done
set_pinning
[[ -x "$PORTCULLIS_BIN" ]] || die "no binary at $PORTCULLIS_BIN (cargo build --release)"

start_run bench-cpu

REDIS_PORT=$(free_port)
"${SRV_PIN[@]}" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --daemonize no --dir "$TMP" --logfile "$TMP/redis.log" >/dev/null 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
wait_pong "$REDIS_PORT" "$REDIS_PID" redis
log "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT"

TARGETS=("direct:$REDIS_PORT:$REDIS_PID")
if [[ -n "${BASE_BIN:-}" ]]; then
  port=$(free_port)
  # shellcheck disable=SC2086
  "${SRV_PIN[@]}" "$BASE_BIN" --listen "127.0.0.1:$port" --backend "127.0.0.1:$REDIS_PORT" \
    --admin-listen '' $PROXY_EXTRA_ARGS >"$TMP/base.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait_pong "$port" "$pid" base
  log "base ($BASE_BIN) pid $pid on 127.0.0.1:$port"
  TARGETS+=("base:$port:$pid")
fi
for mode in $MODES; do
  port=$(free_port)
  mode_args=()
  [[ "$mode" != default ]] && mode_args=(--backend-connections "$mode")
  # shellcheck disable=SC2086  # PROXY_EXTRA_ARGS is a word list on purpose
  "${SRV_PIN[@]}" "$PORTCULLIS_BIN" --listen "127.0.0.1:$port" --backend "127.0.0.1:$REDIS_PORT" \
    --admin-listen '' "${mode_args[@]}" $PROXY_EXTRA_ARGS >"$TMP/$mode.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait_pong "$port" "$pid" "$mode"
  log "portcullis ($mode) pid $pid on 127.0.0.1:$port"
  TARGETS+=("$mode:$port:$pid")
done

# The same recipes as ../shared/bench/compare.sh, so the CPU columns compare with its table.
for other in $OTHERS; do
  port=$(free_port)
  case "$other" in
    haproxy)
      command -v haproxy >/dev/null 2>&1 || { log "no haproxy: skipped"; continue; }
      haproxy_config "$port" "$REDIS_PORT" >"$TMP/haproxy.cfg"
      "${SRV_PIN[@]}" haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
      ;;
    twemproxy)
      command -v nutcracker >/dev/null 2>&1 || { log "no nutcracker: skipped"; continue; }
      cat >"$TMP/nutcracker.yml" <<EOF
redis_pool:
  listen: 127.0.0.1:$port
  redis: true
  hash: fnv1a_64
  distribution: ketama
  preconnect: true
  auto_eject_hosts: false
  servers:
   - 127.0.0.1:$REDIS_PORT:1
EOF
      "${SRV_PIN[@]}" nutcracker -c "$TMP/nutcracker.yml" -o "$TMP/nutcracker.log" \
        -a 127.0.0.1 -s "$(free_port)" >/dev/null 2>&1 &
      ;;
    *) die "unknown entry in OTHERS: $other (haproxy, twemproxy)" ;;
  esac
  pid=$!; PIDS+=("$pid")
  wait_pong "$port" "$pid" "$other"
  log "$other pid $pid on 127.0.0.1:$port"
  TARGETS+=("$other:$port:$pid")
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

bench() {  # bench OUT PORT ARGS...
  local out=$1 port=$2 rc=0; shift 2
  timeout 600 "${CLI_PIN[@]}" redis-benchmark -h 127.0.0.1 -p "$port" -t set,get --csv \
    --precision 3 "$@" >"$out" 2>>"$TMP/bench-stderr.log" &
  BENCH_PID=$!
  wait "$BENCH_PID" || rc=$?
  BENCH_PID=
  return "$rc"
}

for tp in "${TARGETS[@]}"; do
  IFS=: read -r _ port _ <<<"$tp"
  bench "$TMP/warmup.csv" "$port" -c 50 -n 20000 -P 1 || die "warm-up failed on port $port"
done

# raw.tsv: round target test rps(mean of SET, GET) p50_ms(mean) proxy_us redis_us user_us
# client_us redis_requests_per_wakeup proxy_preemptions_per_1000
: >"$TMP/raw.tsv"
for ((r=1; r<=ROUNDS; r++)); do
  for t in $TESTS; do
    read -r -a args <<<"$(test_args "$t")"
    n=$(test_n "$t")
    for tp in "${TARGETS[@]}"; do
      IFS=: read -r name port pid <<<"$tp"
      p0=$(cpu_ms "$pid"); u0=$(cpu_user_ms "$pid"); r0=$(cpu_ms "$REDIS_PID")
      w0=$(ctx_switches voluntary "$REDIS_PID"); x0=$(ctx_switches nonvoluntary "$pid")
      children_cpu_ms; c0=$CHILDREN_MS
      bench "$TMP/run.csv" "$port" "${args[@]}" || die "redis-benchmark against $name ($t, round $r) failed"
      children_cpu_ms; c1=$CHILDREN_MS
      p1=$(cpu_ms "$pid"); u1=$(cpu_user_ms "$pid"); r1=$(cpu_ms "$REDIS_PID")
      w1=$(ctx_switches voluntary "$REDIS_PID"); x1=$(ctx_switches nonvoluntary "$pid")
      kill -0 "$pid" 2>/dev/null || die "$name exited during $t round $r"
      row=$(awk -F, -v r="$r" -v nm="$name" -v t="$t" -v n="$n" -v pc="$((p1 - p0))" -v uc="$((u1 - u0))" -v rc="$((r1 - r0))" -v cc="$((c1 - c0))" -v wk="$((w1 - w0))" -v px="$((x1 - x0))" '
        NR>1 { gsub(/"/,""); rps += $2; p50 += $5; k++ }
        END {
          if (k != 2) exit 1
          proxy = (nm == "direct") ? 0 : pc * 1000 / (2 * n)
          user = (nm == "direct") ? 0 : uc * 1000 / (2 * n)
          # Redis requests per wake-up; preemptions of the proxy per 1,000 requests.
          per_wake = wk > 0 ? 2 * n / wk : 0
          preempt = (nm == "direct") ? 0 : px * 1000 / (2 * n)
          printf "%s\t%s\t%s\t%.0f\t%.4f\t%.3f\t%.3f\t%.3f\t%.3f\t%.2f\t%.1f\n", r, nm, t, rps / 2, p50 / 2, proxy, rc * 1000 / (2 * n), user, cc * 1000 / (2 * n), per_wake, preempt
        }' "$TMP/run.csv") || die "unexpected redis-benchmark output: $(cat "$TMP/run.csv")"
      printf '%s\n' "$row" >>"$TMP/raw.tsv"
      awk -F'\t' '{ printf "round %s %-10s %-9s %10.0f rps  p50 %.3f ms  proxy %.3f µs/req (user %.3f)  redis %.3f µs/req  client %.3f µs/req\n", $1,$2,$3,$4,$5,$6,$8,$7,$9 }' <<<"$row" >&2
    done
  done
done

echo
echo "portcullis vs direct Redis${OTHERS:+ and $OTHERS}, CPU per request: $ROUNDS rounds, median; pin=$PIN; $(redis-server --version | awk '{print $3}'); modes: $MODES"
echo
cpu_table "$TMP/raw.tsv" "$TESTS" "$(for tp in "${TARGETS[@]}"; do printf '%s ' "${tp%%:*}"; done)"
echo
# Each portcullis mode against each other proxy, paired by round (both measured in the
# same round, seconds apart): the median of the per-round throughput ratios, and how many
# rounds portcullis was ahead.
if [[ -n "$OTHERS" ]]; then
  awk -F'\t' -v tests="$TESTS" -v modes="$MODES" -v others="$OTHERS" "$AWK_MED"'
{ R[$1, $2, $3] = $4; rounds[$1] = 1 }
END {
  nt = split(tests, T, " "); nm = split(modes, M, " "); no = split(others, O, " ")
  for (ti = 1; ti <= nt; ti++) for (mi = 1; mi <= nm; mi++) for (oi = 1; oi <= no; oi++) {
    s = ""; won = 0; k = 0
    for (r in rounds) {
      if (!((r, M[mi], T[ti]) in R) || !((r, O[oi], T[ti]) in R) || R[r, O[oi], T[ti]] <= 0) continue
      x = R[r, M[mi], T[ti]] / R[r, O[oi], T[ti]]; s = s " " x; k++; if (x > 1) won++
    }
    if (k) printf "%s: %s / %s rps, paired by round: median %.3f, ahead in %d of %d rounds\n", T[ti], M[mi], O[oi], med(s), won, k
  }
}' "$TMP/raw.tsv"
  echo
fi
# How the shared server core was used: requests Redis served per wake-up (a target that
# hands Redis more at once saves it an event-loop turn per request), and how often the
# kernel preempted the proxy per 1,000 requests (on the core it shares with Redis, a
# write that wakes Redis usually hands the core over).
echo "scheduling on the server core (median): Redis requests per wake-up; proxy preemptions per 1,000 requests"
echo
awk -F'\t' -v tests="$TESTS" -v targets="$(for tp in "${TARGETS[@]}"; do printf '%s ' "${tp%%:*}"; done)" "$AWK_MED"'
{ W[$1, $2, $3] = $10; X[$1, $2, $3] = $11; rounds[$1] = 1 }
END {
  print "| test | target | Redis requests per wake-up | proxy preemptions per 1,000 requests |"
  print "|---|---|---:|---:|"
  nt = split(tests, T, " "); ng = split(targets, G, " ")
  for (ti = 1; ti <= nt; ti++) for (gi = 1; gi <= ng; gi++) {
    w = x = ""
    for (r in rounds) if ((r, G[gi], T[ti]) in W) { w = w " " W[r, G[gi], T[ti]]; x = x " " X[r, G[gi], T[ti]] }
    if (w == "") continue
    printf "| %s | %s | %.1f | %s |\n", T[ti], G[gi], med(w), (G[gi] == "direct" ? "-" : sprintf("%.0f", med(x)))
  }
}' "$TMP/raw.tsv"
echo
echo "tests: c50_P1 = -c 50 -n $N_P1 -P 1; c50_P16 = -c 50 -n $N_P16 -P 16; c50_P128 = -c 50 -n $N_P128 -P 128; c1_P1 = -c 1 -n $N_LAT -P 1 (-t set,get; n per op)"
