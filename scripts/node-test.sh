#!/usr/bin/env bash
# node-redis (RESP3, client-side caching) and ioredis smoke tests through the proxy binary
# (tests/node). Installs the pinned packages from tests/node/package-lock.json with npm ci.
#
#   bash scripts/node-test.sh
#
# PORTCULLIS_BIN picks the binary (default target/debug/portcullis, built if missing).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "node-test: installing nodejs and npm" >&2
        apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    else
        echo "node-test: node and npm are required (apt-get install -y nodejs npm)" >&2
        exit 1
    fi
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if (( major < 20 )); then
    echo "node-test: node >= 20 is required by node-redis and ioredis (found $(node --version))" >&2
    exit 1
fi

default_bin="${CARGO_TARGET_DIR:-target}/debug/portcullis"
PORTCULLIS_BIN="${PORTCULLIS_BIN:-$default_bin}"
if [[ ! -x "$PORTCULLIS_BIN" ]]; then
    cargo build --locked
fi
export PORTCULLIS_BIN="$(cd "$(dirname "$PORTCULLIS_BIN")" && pwd)/$(basename "$PORTCULLIS_BIN")"

cd tests/node
npm ci --no-audit --no-fund --loglevel=error
node --test smoke.test.mjs
