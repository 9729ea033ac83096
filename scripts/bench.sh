#!/usr/bin/env bash
# Runs the throughput benchmark (release build) against a fresh SoftHSM token and writes the
# table into docs/BENCHMARKS.md. KEYFRONT_BENCH_SECONDS sets the seconds per cell (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
./softhsm/install.sh
HSM="$PWD/target/bench-hsm"
rm -rf "$HSM"
./softhsm/create-token.sh "$HSM" keyfront-bench >/dev/null
export SOFTHSM2_CONF="$HSM/softhsm2.conf"
export KEYFRONT_BENCH_PIN_FILE="$HSM/pin"
export RUST_LOG=${RUST_LOG:-warn}
exec cargo bench --locked --bench throughput -- "$@"
