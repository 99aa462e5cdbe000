#!/usr/bin/env bash
# Start portcullis locally in front of a Redis on 127.0.0.1:6379.
#
#   bash scripts/run-local.sh [extra portcullis flags]
#
# If nothing answers PING on 127.0.0.1:6379, a redis-server is started there (installed
# with apt-get first when missing and we are root); it is stopped again, by pid, when the
# proxy exits. The proxy listens on 127.0.0.1:6380.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

redis_host=127.0.0.1
redis_port=6379
proxy_listen=127.0.0.1:6380
startup_deadline_s=10

redis_pid=""
redis_log=""

# shellcheck disable=SC2317  # only reached through the EXIT trap
cleanup() {
    if [[ -n "$redis_pid" ]] && kill -0 "$redis_pid" 2>/dev/null; then
        echo "run-local: stopping redis-server (pid $redis_pid)" >&2
        kill "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    if [[ -n "$redis_log" ]]; then
        rm -f "$redis_log"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# PING on one short-lived connection: redis-cli when present, else bash's /dev/tcp.
redis_answers() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(redis-cli -h "$redis_host" -p "$redis_port" PING 2>/dev/null)" == "PONG" ]]
        return
    fi
    (
        exec 3<>"/dev/tcp/$redis_host/$redis_port" || exit 1
        printf 'PING\r\n' >&3
        reply=""
        IFS= read -r -t 1 reply <&3 || true
        [[ "$reply" == "+PONG"* ]]
    ) 2>/dev/null
}

if redis_answers; then
    echo "run-local: using the Redis already answering on $redis_host:$redis_port" >&2
else
    if ! command -v redis-server >/dev/null 2>&1; then
        if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            echo "run-local: installing redis-server with apt-get" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
        else
            echo "run-local: redis-server is not installed; install it (e.g. 'sudo apt-get install redis-server'," >&2
            echo "           'brew install redis') or start a Redis on $redis_host:$redis_port, then rerun." >&2
            exit 1
        fi
    fi
    redis_log="$(mktemp -t portcullis-redis.XXXXXX.log)"
    redis_dir="$(dirname "$redis_log")"
    redis-server --bind "$redis_host" --port "$redis_port" --save '' --appendonly no \
        --daemonize no --dir "$redis_dir" >"$redis_log" 2>&1 &
    redis_pid=$!
    echo "run-local: started redis-server on $redis_host:$redis_port (pid $redis_pid, log $redis_log)" >&2

    deadline=$((SECONDS + startup_deadline_s))
    until redis_answers; do
        if ! kill -0 "$redis_pid" 2>/dev/null; then
            echo "run-local: redis-server exited; its log:" >&2
            cat "$redis_log" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "run-local: redis-server did not answer PING within ${startup_deadline_s}s; its log:" >&2
            cat "$redis_log" >&2
            exit 1
        fi
        sleep 0.1
    done
fi

cargo build --release
proxy_bin="${CARGO_TARGET_DIR:-target}/release/portcullis"

echo "run-local: portcullis on $proxy_listen -> $redis_host:$redis_port; try: redis-cli -p 6380 PING" >&2
if [[ -z "$redis_pid" ]]; then
    # Nothing of ours to clean up: the proxy takes over this process.
    exec "$proxy_bin" --listen "$proxy_listen" --backend "$redis_host:$redis_port" "$@"
fi

# We started a redis-server, so this shell stays to stop it when the proxy exits. The proxy
# runs as a child; INT/TERM sent to this script are passed on to it (it drains and exits).
"$proxy_bin" --listen "$proxy_listen" --backend "$redis_host:$redis_port" "$@" &
proxy_pid=$!
trap 'kill -s INT "$proxy_pid" 2>/dev/null || true' INT
trap 'kill -s TERM "$proxy_pid" 2>/dev/null || true' TERM
while :; do
    status=0
    wait "$proxy_pid" || status=$?
    # A trapped signal interrupts `wait`; go on waiting while the proxy drains.
    kill -0 "$proxy_pid" 2>/dev/null || break
done
exit "$status"
