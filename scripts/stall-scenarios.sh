#!/usr/bin/env bash
# stall-scenarios.sh: what clients see during the stalls Redis has in normal operation,
# through portcullis versus Redis directly, and how fast a real role change is detected
# during such a stall (issue 11: a slow master is not a lost master).
#
# Starts its own redis-servers (master, replica, and a standalone "other" master) and
# portcullis (default probe settings: interval 500 ms, timeout 500 ms, down_after 10 s) on
# free loopback ports, and stops only what it started, by pid.
#
# Part 1, per stall scenario, run once against Redis directly and once through the proxy:
# a writer sends SET every 50 ms on one open connection and a reader sends GET every
# 250 ms on new connections (scripts/lib/stall-client.py); 0.5 s in, the stall starts.
# Reported: replies OK, errors by code, slowest reply. Target: the same errors.
#
# Part 2, detection time of a real role change (ms from the change to /topology naming the
# new state), TRIALS times each. Target: at most probe interval + timeout (1000 ms).
#
#   bash scripts/stall-scenarios.sh
#   TRIALS=5 PORTCULLIS_BIN=target/debug/portcullis bash scripts/stall-scenarios.sh
#   STALLS="" CHANGES=promotion-during-debug-sleep DEBUG=1 bash scripts/stall-scenarios.sh
#
# Environment: TRIALS [3], STALLS and CHANGES (space-separated subsets of the scenario
# names below), DEBUG [0] (1: print /topology when a change is made and detected),
# LOG_LEVEL [warn] (the proxy's, to TMP/proxy.log), KEEP_TMP [0] (1: keep the temp dir).
set -Eeuo pipefail

TRIALS=${TRIALS:-3}
STALLS=${STALLS-pause-all-4s pause-write-4s debug-sleep-3s busy-script-kill busy-function-kill sigstop-3s sigstop-12s}
CHANGES=${CHANGES-replicaof replicaof-during-pause-write promotion-while-master-sigstopped promotion-during-debug-sleep promotion-while-master-busy}
DEBUG=${DEBUG:-0}
LOG_LEVEL=${LOG_LEVEL:-warn}
KEEP_TMP=${KEEP_TMP:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/bench.sh
source "$ROOT/scripts/lib/bench.sh"
BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}
CLIENT="$ROOT/scripts/lib/stall-client.py"

log() { printf '[stall %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
for bin in redis-server redis-cli python3 curl; do
  command -v "$bin" >/dev/null 2>&1 || die "missing $bin"
done
[[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --release --locked)

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

M=$(free_port); R=$(free_port); O=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
start_redis() { # PORT NAME [ARGS...]
  local port=$1 name=$2; shift 2
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" \
    --enable-debug-command yes --busy-reply-threshold 300 "$@" >"$TMP/$name.log" 2>&1 &
  PIDS+=($!)
  wait_pong "$port" $! "$name"
}
start_redis "$M" master; MPID=${PIDS[-1]}
start_redis "$R" replica --replicaof 127.0.0.1 "$M"
start_redis "$O" other
redis-cli -p "$M" FUNCTION LOAD REPLACE "#!lua name=spinlib
redis.register_function('spin', function() while true do end end)" >/dev/null
"$BIN" --listen "127.0.0.1:$PROXY" --admin-listen "127.0.0.1:$ADMIN" --log-level "$LOG_LEVEL" \
  --backend "127.0.0.1:$M" --backend "127.0.0.1:$R" 2>"$TMP/proxy.log" &
PIDS+=($!)
wait_pong "$PROXY" $! proxy

now_ms() { date +%s%3N; }
topology() { curl -s "127.0.0.1:$ADMIN/topology"; }
master_is() { topology | grep -q "\"confirmed_master\": \"127.0.0.1:$1\""; }
state_of() { # PORT: the backend's state in /topology
  topology | python3 -c "import json,sys; t=json.load(sys.stdin); print(next(b['state'] for b in t['backends'] if b['address'].endswith(':$1')))"
}
wait_for() { # DESCRIPTION COMMAND...: poll until it holds, 30 s deadline
  local what=$1 deadline=$((SECONDS + 30)); shift
  until "$@"; do ((SECONDS < deadline)) || die "timed out waiting for: $what"; sleep 0.01; done
}
settled() { master_is "$M" && [[ "$(state_of "$M")" == confirmed ]] && [[ "$(redis-cli -p "$M" PING 2>/dev/null)" == PONG ]]; }

# --- part 1: stalls -----------------------------------------------------------------
stall() { # NAME TARGET_PORT: start the stall (0.5 s into the client run)
  case $1 in
    pause-all-4s) redis-cli -p "$M" CLIENT PAUSE 4000 ALL >/dev/null ;;
    pause-write-4s) redis-cli -p "$M" CLIENT PAUSE 4000 WRITE >/dev/null ;;
    debug-sleep-3s) redis-cli -p "$M" DEBUG SLEEP 3 >/dev/null ;;
    busy-script-kill)
      redis-cli -p "$2" EVAL "while true do end" 0 >"$TMP/run.out" 2>&1 &
      sleep 1.2; redis-cli -p "$2" SCRIPT KILL >"$TMP/kill.out" 2>&1; wait $! || true ;;
    busy-function-kill)
      redis-cli -p "$2" FCALL spin 0 >"$TMP/run.out" 2>&1 &
      sleep 1.2; redis-cli -p "$2" FUNCTION KILL >"$TMP/kill.out" 2>&1; wait $! || true ;;
    sigstop-3s) kill -STOP "$MPID"; sleep 3; kill -CONT "$MPID" ;;
    sigstop-12s) kill -STOP "$MPID"; sleep 12; kill -CONT "$MPID" ;;
  esac
}
duration() { case $1 in sigstop-12s) echo 15 ;; *) echo 6 ;; esac; }

rows=()
for name in $STALLS; do
  line="| $name |"
  for target in "$M" "$PROXY"; do
    wait_for "master settled" settled
    : >"$TMP/kill.out"
    python3 "$CLIENT" "127.0.0.1:$target" "$(duration "$name")" >"$TMP/client.out" &
    cpid=$!
    sleep 0.5
    stall "$name" "$target"
    wait "$cpid"
    kill_reply=$(tr -d '\n' <"$TMP/kill.out")
    line+=" $(cat "$TMP/client.out")${kill_reply:+ kill=$kill_reply} |"
    log "$name via $([[ $target == "$M" ]] && echo direct || echo proxy): $(cat "$TMP/client.out") ${kill_reply}"
  done
  rows+=("$line")
done

# --- part 2: detection of a real role change ------------------------------------------
restore() { # back to: M master (confirmed), R its replica
  redis-cli -p "$M" REPLICAOF NO ONE >/dev/null
  redis-cli -p "$R" REPLICAOF 127.0.0.1 "$M" >/dev/null
  wait_for "restored" settled
}
not_master_m() { ! master_is "$M"; }
state_is() { [[ "$(state_of "$1")" == "$2" ]]; }
master_r() { master_is "$R"; }
detect() { # NAME: one trial, prints "ms/cmd_ms": from the change command's answer to
  # /topology showing it, and how long that command itself took
  local t0 t1 t2
  case $1 in
    replicaof)
      sleep "0.$((RANDOM % 500 + 100))"; t0=$(now_ms)
      redis-cli -p "$M" REPLICAOF 127.0.0.1 "$O" >/dev/null; t1=$(now_ms); wait_for "$1" not_master_m; t2=$(now_ms) ;;
    replicaof-during-pause-write)
      redis-cli -p "$M" CLIENT PAUSE 3000 WRITE >/dev/null
      sleep "0.$((RANDOM % 500 + 100))"; t0=$(now_ms)
      redis-cli -p "$M" REPLICAOF 127.0.0.1 "$O" >/dev/null; t1=$(now_ms); wait_for "$1" not_master_m; t2=$(now_ms)
      redis-cli -p "$M" CLIENT UNPAUSE >/dev/null ;;
    promotion-while-master-sigstopped)
      kill -STOP "$MPID"; wait_for "slow" state_is "$M" slow
      t0=$(now_ms); redis-cli -p "$R" REPLICAOF NO ONE >/dev/null; t1=$(now_ms); [[ $DEBUG == 1 ]] && topology >&2; wait_for "$1" master_r; t2=$(now_ms)
      kill -CONT "$MPID" ;;
    promotion-during-debug-sleep)
      redis-cli -p "$M" DEBUG SLEEP 3 >/dev/null & local sl=$!
      wait_for "slow" state_is "$M" slow
      t0=$(now_ms); redis-cli -p "$R" REPLICAOF NO ONE >/dev/null; t1=$(now_ms); [[ $DEBUG == 1 ]] && topology >&2; wait_for "$1" master_r; t2=$(now_ms)
      wait "$sl" ;;
    promotion-while-master-busy)
      redis-cli -p "$M" EVAL "while true do end" 0 >/dev/null 2>&1 & local ev=$!
      wait_for "busy" state_is "$M" busy
      t0=$(now_ms); redis-cli -p "$R" REPLICAOF NO ONE >/dev/null; t1=$(now_ms); [[ $DEBUG == 1 ]] && topology >&2; wait_for "$1" master_r; t2=$(now_ms)
      redis-cli -p "$PROXY" SCRIPT KILL >/dev/null; wait "$ev" || true ;;
  esac
  echo "$((t2 - t1))/$((t1 - t0))"
  [[ $DEBUG == 1 ]] && topology >&2
  return 0
}
detect_rows=()
for name in $CHANGES; do
  results=()
  for _ in $(seq "$TRIALS"); do
    restore
    results+=("$(detect "$name")")
  done
  restore
  sorted=$(printf '%s\n' "${results[@]}" | sort -n | tr '\n' ' ')
  detect_rows+=("| $name | ${sorted% } |")
  log "$name: $sorted ms"
done

echo
echo "Stalls (portcullis $(basename "$BIN"), probe interval 500 ms, timeout 500 ms, down_after 10 s):"
echo
echo "| scenario | Redis directly | through portcullis |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "Detection of a real role change over $TRIALS trials, sorted: ms from the REPLICAOF reply to /topology"
echo "showing the change / ms the REPLICAOF itself took (target <= 1000 = interval + timeout):"
echo
echo "| change | ms |"
echo "|---|---|"
printf '%s\n' "${detect_rows[@]}"
