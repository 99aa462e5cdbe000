#!/usr/bin/env bash
# Run every test: Rust unit + integration tests (real redis-server processes on loopback),
# the redis-py compatibility suite and the node-redis/ioredis smoke tests through the
# proxy binary.
#
#   bash scripts/test.sh
#
# Installs redis-server (Debian package) when missing and we are root. Python's venv
# for redis-py lives in .venv.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if ! command -v redis-server >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing redis-server" >&2
        apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
        # The package may start a system instance on 6379; tests never use it.
    else
        echo "test: redis-server is required (apt-get install -y redis-server)" >&2
        exit 1
    fi
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
fi

echo "== cargo test" >&2
cargo test --all-targets --locked
echo "== redis-py suite" >&2
cargo build --locked
bash scripts/py-test.sh
echo "== node-redis / ioredis smoke tests" >&2
bash scripts/node-test.sh
