#!/usr/bin/env bash
# Runs the benchmarks (release build) against the bench SoftHSM token and writes their tables
# into docs/BENCHMARKS.md.
#
#   scripts/bench.sh              both: throughput, then scale
#   scripts/bench.sh throughput   keyfront vs. the transport, HSM and crypto limits (~6 min)
#   scripts/bench.sh scale        100,000 tenants: creation, disk, startup, RSS, first requests,
#                                 Encrypt with 1/100/10,000 tenants active
#
# Environment: KEYFRONT_BENCH_SECONDS (seconds per cell, default 3), KEYFRONT_BENCH_ROUNDS
# (default 3); throughput: KEYFRONT_BENCH_ONLY, KEYFRONT_BENCH_CONCURRENCY; scale:
# KEYFRONT_SCALE_TENANTS (default 100000), KEYFRONT_SCALE_REUSE=1 (keep the tenants of an
# earlier run of the same size in target/bench-scale).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-all}" in
  all) benches=(throughput scale) ;;
  throughput|scale) benches=("$1") ;;
  *) echo "usage: $0 [throughput|scale]" >&2; exit 2 ;;
esac
./softhsm/install.sh
HSM="$PWD/target/bench-hsm"
if [ -z "${KEYFRONT_SCALE_REUSE:-}" ]; then
  rm -rf "$HSM"
fi
./softhsm/create-token.sh "$HSM" keyfront-bench >/dev/null
export SOFTHSM2_CONF="$HSM/softhsm2.conf"
export KEYFRONT_BENCH_PIN_FILE="$HSM/pin"
export RUST_LOG=${RUST_LOG:-warn}
for bench in "${benches[@]}"; do
  cargo bench --locked --bench "$bench" -- --bench
done
