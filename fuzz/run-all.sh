#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 120), one at a time, one
# worker: fuzz/run-all.sh [SECONDS] [TARGET...]. Needs the nightly toolchain
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
    rm -rf /dev/shm/klon-fuzz-*
done
exit $failed
