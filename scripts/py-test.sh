#!/usr/bin/env bash
# Run the redis-py compatibility suite (tests/python) against the proxy binary.
#
#   bash scripts/py-test.sh [pytest args]
#
# PORTCULLIS_BIN picks the binary (default target/debug/portcullis, or under $CARGO_TARGET_DIR;
# built with `cargo build` if missing).
# The virtualenv lives in .venv (gitignored) and is reused between runs.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="$repo_root/.venv"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

default_bin="${CARGO_TARGET_DIR:-target}/debug/portcullis"
export PORTCULLIS_BIN="${PORTCULLIS_BIN:-$default_bin}"
if [[ ! -x "$PORTCULLIS_BIN" ]]; then
    if [[ "$PORTCULLIS_BIN" == "$default_bin" ]]; then
        cargo build
    else
        echo "py-test: PORTCULLIS_BIN=$PORTCULLIS_BIN is not an executable file" >&2
        exit 1
    fi
fi

status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python "$@" || status=$?
exit "$status"
