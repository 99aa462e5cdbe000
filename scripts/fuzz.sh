#!/usr/bin/env bash
# Fuzz the two parsers of untrusted bytes (RequestParser, ReplyScanner) with cargo-fuzz.
#
#   scripts/fuzz.sh [seconds-per-target]     (default 60)
#
# Not part of CI. Needs no nightly toolchain: cargo-fuzz's -Zsanitizer=address build runs on
# the stable toolchain with RUSTC_BOOTSTRAP=1 (the sanitizer runtimes ship with stable's
# rust-std on x86_64 Linux). Builds with debug assertions (-a), so integer overflow panics.
# One job, one worker: the machine has 2 cores.
#
# Seeds: fuzz/corpus/<target>/ (committed, read-only here). New inputs go to
# fuzz/target/corpus/<target>/ and crashes to fuzz/artifacts/<target>/ (both git-ignored).
# Exits non-zero if any target crashed (panic, sanitizer report, leak, OOM or timeout).
set -uo pipefail

secs="${1:-60}"
max_len=65536
targets=(request_parser reply_scanner)

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 2

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 2
fi

export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz)

echo "== building fuzz targets (ASan, debug assertions)"
"${fuzz[@]}" build -a || exit 2

status=0
for t in "${targets[@]}"; do
    work="fuzz/target/corpus/$t"
    art="fuzz/artifacts/$t"
    log="fuzz/target/logs/$t.log"
    mkdir -p "$work" "$art" "$(dirname "$log")"
    before="$(ls -1 "$art" | wc -l)"
    echo "== $t: ${secs}s, max_len $max_len"
    "${fuzz[@]}" run -a "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len="$max_len" -timeout=10 \
        -malloc_limit_mb=256 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$log" | tail -n 2
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log"
    after="$(ls -1 "$art" | wc -l)"
    if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
        status=1
        echo "!! $t: CRASH (exit $rc), log: $log"
        grep -E -m 20 "panicked at|ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)|SUMMARY|Test unit written" "$log"
        for f in $(ls -1t "$art" | head -n 5); do
            echo "-- $art/$f:"
            head -c 512 "$art/$f" | od -c | head -n 20
            echo "   minimize: RUSTC_BOOTSTRAP=1 cargo fuzz tmin -a $t $art/$f"
        done
    else
        echo "ok $t: no crash"
    fi
done
exit "$status"
