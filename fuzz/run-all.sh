#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 120), one at a time, one
# worker: fuzz/run-all.sh [SECONDS] [TARGET...]; two may run side by side.
# Needs the nightly toolchain
# and cargo-fuzz (cargo install cargo-fuzz). Each run starts from
# fuzz/seeds/<target> plus what earlier runs found (fuzz/corpus/<target>,
# not committed); crashes land in fuzz/artifacts/<target>/. libFuzzer's last
# status line (execs, cov, ft) is printed and the logs kept in
# fuzz/logs/<target>.log.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-120}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
cargo +nightly fuzz build -O || exit 1
mkdir -p logs
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t"
    echo "== $t: ${secs}s"
    # -max_len: the seeds are real images up to 2 MiB; mutations of larger
    # inputs are slower but reach the readers' deeper tables.
    if ! cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len=2200000 -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 >"logs/$t.log" 2>&1; then
        echo "   FAILED (crash, timeout or OOM): see fuzz/logs/$t.log and fuzz/artifacts/$t/"
        failed=1
    fi
    grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "logs/$t.log" | tail -1
    grep -E '^stat::number_of_executed_units' "logs/$t.log"
    # Scratch of runs that ended (each names its pid): two scripts may run
    # side by side, each one target at a time.
    for d in /dev/shm/klon-fuzz-*; do
        [ -e "$d" ] || continue
        kill -0 "${d##*-}" 2>/dev/null || rm -rf "$d"
    done
done
exit $failed
