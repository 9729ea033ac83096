#!/usr/bin/env bash
# Runs the benchmarks (release build) against the bench SoftHSM token and writes their tables
# into docs/BENCHMARKS.md.
#
#   scripts/bench.sh              all three: throughput, scale, then cluster
#   scripts/bench.sh throughput   keyfront vs. the transport, HSM and crypto limits (~6 min)
#   scripts/bench.sh scale        100,000 tenants: creation, disk, startup, RSS, first requests,
#                                 Encrypt with 1/100/10,000 tenants active
#   scripts/bench.sh cluster      a cluster node on PostgreSQL vs. a single node: Encrypt at
#                                 c=64, CreateKey/RotateKey latency, the stale window (~2 min;
#                                 starts a private PostgreSQL in target/bench-postgres)
#
# Environment: KEYFRONT_BENCH_SECONDS (seconds per cell, default 3), KEYFRONT_BENCH_ROUNDS
# (default 3); throughput: KEYFRONT_BENCH_ONLY, KEYFRONT_BENCH_CONCURRENCY; scale:
# KEYFRONT_SCALE_TENANTS (default 100000), KEYFRONT_SCALE_REUSE=1 (keep the tenants of an
# earlier run of the same size in target/bench-scale).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-all}" in
  all) benches=(throughput scale cluster) ;;
  throughput|scale|cluster) benches=("$1") ;;
  *) echo "usage: $0 [throughput|scale|cluster]" >&2; exit 2 ;;
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
if [[ " ${benches[*]} " == *" cluster "* ]]; then
  BENCH_PG="$PWD/target/bench-postgres"
  ./scripts/postgres.sh stop "$BENCH_PG"
  rm -rf "$BENCH_PG"
  KEYFRONT_BENCH_POSTGRES_URL=$(./scripts/postgres.sh start "$BENCH_PG" 55441)
  export KEYFRONT_BENCH_POSTGRES_URL
  trap './scripts/postgres.sh stop "$BENCH_PG"' EXIT
fi
for bench in "${benches[@]}"; do
  cargo bench --locked --bench "$bench" -- --bench
done
