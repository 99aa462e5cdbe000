#!/usr/bin/env bash
# Replay the incident portcullis answers (docs: /work/shared/DESIGN.md "Why it exists"),
# on this machine, loopback only, and check that the proxy behaves as documented.
#
#   bash scripts/incident-demo.sh
#
# A "victim" Redis (the app's session store) and an "attacker" Redis (the bot's master)
# run on free loopback ports; portcullis (release build) runs in front of the victim.
#   1. an app write through the proxy works;
#   2. the attack sent THROUGH the proxy (SLAVEOF <attacker>) is refused with -NOPERM;
#   3. the same attack sent DIRECTLY to the exposed Redis succeeds: the victim replicates
#      from the attacker (and a full resync wipes its data, as in the incident);
#   4. writes through the proxy now fail fast with -MASTERDOWN (not READONLY), the hijack
#      is in the metrics, /topology, /readyz and an ERROR log line;
#   5. portcullis restarted with [protection] auto_heal = true turns the victim back into
#      a master within about two probe intervals; a second attack is healed the same way.
# Exits 0 when every step behaved as described, 1 otherwise (it doubles as a smoke test).
#
# Needs redis-server, redis-cli and cargo (or PORTCULLIS_BIN=path/to/portcullis to skip
# the build); curl is used when present, else bash's /dev/tcp. Stops only the processes
# it started, by pid.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
probe_interval_ms=500   # portcullis's default [probe] interval, also set in the step-5 config
startup_deadline_s=10

if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
note() { printf '   %s\n' "$*"; }
show() { sed 's/^/   | /'; }

for tool in redis-server redis-cli; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "incident-demo: $tool is required (apt-get install redis-server)" >&2
        exit 1
    }
done

workdir="$(mktemp -d -t portcullis-incident.XXXXXX)"
victim_pid=""
attacker_pid=""
proxy_pid=""
proxy_log=""

stop_pid() {
    local pid="$1"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}

# shellcheck disable=SC2317  # reached through the EXIT trap
cleanup() {
    local status=$?
    stop_pid "$proxy_pid"
    stop_pid "$victim_pid"
    stop_pid "$attacker_pid"
    if ((status != 0)) && [[ -n "$proxy_log" && -f "$proxy_log" ]]; then
        echo "--- last lines of the proxy log ($proxy_log) ---" >&2
        tail -n 30 "$proxy_log" >&2 || true
    fi
    rm -rf "$workdir"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}

pass() { printf '   ok: %s\n' "$*"; }

# A loopback TCP port nobody listens on (and that we have not handed out yet).
taken_ports=" "
free_port() {
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 30000))
        [[ "$taken_ports" == *" $port "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            taken_ports+="$port "
            echo "$port"
            return 0
        fi
    done
    fail "no free loopback port found"
}

# HTTP GET on the admin port: prints "<status>\n<body>".
http_get() {
    local path="$1"
    if command -v curl >/dev/null 2>&1; then
        curl -s -m 2 -w '\n%{http_code}' "http://127.0.0.1:$admin_port$path" |
            awk '{ lines[NR] = $0 } END { print lines[NR]; for (i = 1; i < NR; i++) print lines[i] }'
        return
    fi
    (
        exec 3<>"/dev/tcp/127.0.0.1/$admin_port" || exit 1
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
        local status_line body_started=0 line
        IFS= read -r -t 2 status_line <&3 || exit 1
        status_line="${status_line%$'\r'}"
        echo "${status_line#* }" | cut -d' ' -f1
        while IFS= read -r -t 2 line <&3 || [[ -n "$line" ]]; do
            line="${line%$'\r'}"
            if ((body_started)); then echo "$line"; elif [[ -z "$line" ]]; then body_started=1; fi
        done
    ) 2>/dev/null
}
http_status() { http_get "$1" | head -n 1; }
http_body() { http_get "$1" | tail -n +2; }

# Wait until "$@" succeeds, at most $deadline_s seconds.
wait_for() {
    local deadline_s="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + deadline_s))
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${deadline_s}s waiting for: $what"
        sleep 0.05
    done
}

now_ms() { date +%s%3N; }

role_of() { redis-cli -h 127.0.0.1 -p "$1" ROLE 2>/dev/null | head -n 1; }
is_master() { [[ "$(role_of "$1")" == "master" ]]; }
is_replica() { [[ "$(role_of "$1")" == "slave" ]]; }
answers_ping() { [[ "$(redis-cli -h 127.0.0.1 -p "$1" PING 2>/dev/null)" == "PONG" ]]; }
proxy_ready() { [[ "$(http_status /readyz)" == "200" ]]; }
metric_is() { http_body /metrics | grep -E "^$1(\{[^}]*\})? " | grep -q -E " $2\$"; }
proxy() { redis-cli -h 127.0.0.1 -p "$proxy_port" "$@" 2>&1; }

start_redis() {
    local name="$1" port="$2"
    mkdir -p "$workdir/$name"
    # repl-diskless-sync-delay 0: serve a replica's full resync at once (default: wait 5 s).
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --repl-diskless-sync-delay 0 --dir "$workdir/$name" --daemonize no \
        >"$workdir/$name.log" 2>&1 &
    echo $!
}

start_proxy() {
    proxy_log="$workdir/portcullis-$1.log"
    shift
    NO_COLOR=1 "$proxy_bin" "$@" >"$proxy_log" 2>&1 &
    proxy_pid=$!
    wait_for "$startup_deadline_s" "portcullis /readyz = 200" proxy_ready
}

stop_proxy() {
    kill -TERM "$proxy_pid"
    local status=0
    wait "$proxy_pid" || status=$?
    proxy_pid=""
    ((status == 0)) || fail "portcullis exited $status after SIGTERM (expected a drain and exit 0)"
    pass "portcullis drained and exited 0 on SIGTERM"
}

# ---------------------------------------------------------------------------------------
say "Setup"
if [[ -n "${PORTCULLIS_BIN:-}" ]]; then
    proxy_bin="$PORTCULLIS_BIN"
else
    note "building portcullis (cargo build --release --locked) ..."
    (cd "$repo_root" && cargo build --release --locked --quiet)
    proxy_bin="${CARGO_TARGET_DIR:-$repo_root/target}/release/portcullis"
fi
[[ -x "$proxy_bin" ]] || fail "no portcullis binary at $proxy_bin"

victim_port="$(free_port)"
attacker_port="$(free_port)"
proxy_port="$(free_port)"
admin_port="$(free_port)"

victim_pid="$(start_redis victim "$victim_port")"
attacker_pid="$(start_redis attacker "$attacker_port")"
wait_for "$startup_deadline_s" "victim redis PING" answers_ping "$victim_port"
wait_for "$startup_deadline_s" "attacker redis PING" answers_ping "$attacker_port"
redis-cli -p "$attacker_port" SET planted-by-attacker 1 >/dev/null
note "victim redis   127.0.0.1:$victim_port (pid $victim_pid)   <- the app's session store, exposed"
note "attacker redis 127.0.0.1:$attacker_port (pid $attacker_pid)   <- the bot's 'master'"

start_proxy first --listen "127.0.0.1:$proxy_port" --backend "127.0.0.1:$victim_port" \
    --admin-listen "127.0.0.1:$admin_port"
note "portcullis     127.0.0.1:$proxy_port -> victim, admin http://127.0.0.1:$admin_port (pid $proxy_pid), auto_heal off"

# ---------------------------------------------------------------------------------------
say "1. The app writes its session through portcullis"
out="$(proxy SET session:42 alice)"
echo "redis-cli -p $proxy_port SET session:42 alice -> $out" | show
[[ "$out" == "OK" ]] || fail "write through the proxy: expected OK, got: $out"
[[ "$(redis-cli -p "$victim_port" GET session:42)" == "alice" ]] || fail "the write did not reach the victim"
pass "write accepted and stored on the victim"

# ---------------------------------------------------------------------------------------
say "2. The bot's kit, sent through portcullis"
for cmd in "SLAVEOF 127.0.0.1 $attacker_port" "REPLICAOF 127.0.0.1 $attacker_port" \
    "CONFIG SET dbfilename exp.so" "MODULE LOAD /tmp/exp.so"; do
    # shellcheck disable=SC2086  # split the command into words on purpose
    out="$(proxy $cmd)"
    echo "redis-cli -p $proxy_port $cmd -> $out" | show
    [[ "$out" == NOPERM* ]] || fail "expected -NOPERM for '$cmd', got: $out"
done
is_master "$victim_port" || fail "victim is no longer master after refused commands"
pass "all refused with NOPERM; victim still: $(role_of "$victim_port")"
http_body /metrics | grep -E '^portcullis_refused_commands_total' | show

# ---------------------------------------------------------------------------------------
say "3. The same attack sent straight to the exposed Redis (what happened on ECS)"
out="$(redis-cli -p "$victim_port" SLAVEOF 127.0.0.1 "$attacker_port")"
echo "redis-cli -p $victim_port SLAVEOF 127.0.0.1 $attacker_port -> $out" | show
[[ "$out" == "OK" ]] || fail "direct SLAVEOF: expected OK, got: $out"
wait_for 5 "victim reports role slave" is_replica "$victim_port"
redis-cli -p "$victim_port" INFO replication | grep -E '^(role|master_host|master_port|master_link_status):' | tr -d '\r' | show
wait_for 5 "victim finished its full resync from the attacker" \
    bash -c "[[ \"\$(redis-cli -p $victim_port GET planted-by-attacker)\" == 1 ]]"
note "the full resync replaced the victim's data with the attacker's:"
echo "GET session:42 -> '$(redis-cli -p "$victim_port" GET session:42)' (gone), GET planted-by-attacker -> '$(redis-cli -p "$victim_port" GET planted-by-attacker)'" | show
out="$(redis-cli -p "$victim_port" SET session:43 bob 2>&1)"
echo "a write sent directly to the victim -> $out" | show
[[ "$out" == READONLY* ]] || fail "direct write to the hijacked victim: expected READONLY, got: $out"
note "^ that READONLY is all the app saw in the incident"

# ---------------------------------------------------------------------------------------
say "4. What the app and the operators see through portcullis"
wait_for 5 "portcullis_backend_hijacked = 1" metric_is portcullis_backend_hijacked 1
started="$(now_ms)"
out="$(proxy SET session:43 bob)"
elapsed=$(($(now_ms) - started))
echo "redis-cli -p $proxy_port SET session:43 bob -> $out   (${elapsed} ms)" | show
[[ "$out" == MASTERDOWN* ]] || fail "write through the proxy to a hijacked backend: expected MASTERDOWN, got: $out"
[[ "$out" != *READONLY* ]] || fail "the proxy passed READONLY on"
pass "write refused with MASTERDOWN (after the configured failover wait), never READONLY"
status="$(http_status /readyz)"
echo "GET /readyz -> $status $(http_body /readyz | head -n 1)" | show
[[ "$status" == "503" ]] || fail "/readyz: expected 503 with no confirmed master, got $status"
note "metrics:"
http_body /metrics |
    grep -E '^portcullis_(hijack_detections_total|backend_hijacked|backend_role|role_changes_total|no_master_errors_total)' |
    show
metric_is portcullis_hijack_detections_total 1 || fail "portcullis_hijack_detections_total is not 1"
metric_is 'portcullis_backend_role\{[^}]*role="master"[^}]*\}' 0 || fail "backend_role{role=master} is not 0"
note "GET /topology:"
http_body /topology | show
http_body /topology | grep -q '"hijacked": true' || fail "/topology does not report the hijack"
note "proxy log:"
grep HIJACK "$proxy_log" | show || fail "no HIJACK line in the proxy log"
grep HIJACK "$proxy_log" | grep -q ERROR || fail "the HIJACK log line is not at ERROR level"

# ---------------------------------------------------------------------------------------
say "5. Restart portcullis with [protection] auto_heal = true"
stop_proxy
heal_config="$workdir/portcullis-heal.toml"
cat >"$heal_config" <<EOF
listen = "127.0.0.1:$proxy_port"

[admin]
listen = "127.0.0.1:$admin_port"

[[backends]]
address = "127.0.0.1:$victim_port"
name = "victim"

[probe]
interval = "${probe_interval_ms}ms"

[protection]
auto_heal = true
EOF
show <"$heal_config"
is_replica "$victim_port" || fail "victim should still be the attacker's replica before the restart"
started="$(now_ms)"
NO_COLOR=1 "$proxy_bin" --config "$heal_config" >"$workdir/portcullis-heal.log" 2>&1 &
proxy_pid=$!
proxy_log="$workdir/portcullis-heal.log"
wait_for "$startup_deadline_s" "victim healed back to master" is_master "$victim_port"
elapsed=$(($(now_ms) - started))
note "victim is master again ${elapsed} ms after the proxy started (probe interval ${probe_interval_ms} ms)"
redis-cli -p "$victim_port" INFO replication | grep -E '^role:' | tr -d '\r' | show
grep -E 'HIJACK|auto-heal' "$proxy_log" | show
grep -q 'auto-heal: hijacked backend healed' "$proxy_log" || fail "no auto-heal log line"
wait_for "$startup_deadline_s" "portcullis /readyz = 200" proxy_ready
out="$(proxy SET session:44 carol)"
echo "redis-cli -p $proxy_port SET session:44 carol -> $out" | show
[[ "$out" == "OK" ]] || fail "write after healing: expected OK, got: $out"
pass "writes flow again"

say "5b. The bot comes back the next day: healed again, live"
out="$(redis-cli -p "$victim_port" SLAVEOF 127.0.0.1 "$attacker_port")"
started="$(now_ms)"
echo "redis-cli -p $victim_port SLAVEOF 127.0.0.1 $attacker_port -> $out" | show
# Wait until portcullis has noticed the attack, then until it has undone it.
wait_for 5 "second hijack detected" metric_is portcullis_hijack_detections_total 2
wait_for 5 "victim healed back to master" is_master "$victim_port"
elapsed=$(($(now_ms) - started))
heal_budget_ms=$((2 * probe_interval_ms + 500))
note "healed ${elapsed} ms after the attack (budget: 2 probe intervals + probe timeout = ${heal_budget_ms} ms)"
((elapsed <= heal_budget_ms + 500)) || fail "healing took ${elapsed} ms"
out="$(proxy SET session:45 dave)"
echo "redis-cli -p $proxy_port SET session:45 dave -> $out" | show
[[ "$out" == "OK" ]] || fail "write after the second heal: expected OK, got: $out"
http_body /metrics | grep -E '^portcullis_(hijack_detections_total|auto_heals_total|backend_hijacked)' | show
metric_is portcullis_auto_heals_total 2 || fail "portcullis_auto_heals_total is not 2"
stop_proxy

say "PASS: refused through the proxy, visible when done around it, healed when allowed to"
note "(healing restores writes, not the data the attacker's full resync erased: keep Redis"
note " reachable only by the proxy, see config/README.md)"
