#!/usr/bin/env bash
# Runs the whole test suite: installs SoftHSM and PostgreSQL if missing, creates a throwaway
# SoftHSM token directory and starts a private PostgreSQL server (non-root, 127.0.0.1, a free
# port from 55432 up, data under target/; stopped at the end), then formatting and lint checks
# and every test (unit, SoftHSM and PostgreSQL integration, a 3-node cluster under faults,
# CLI), then the token suites again on Kryoptic (a second PKCS#11 token, scripts/kryoptic.sh) and
# on one pre-made token. Exits non-zero on any failure. With CI=true a missing SoftHSM or
# PostgreSQL fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ./softhsm/install.sh; then
  echo "scripts/test.sh: SoftHSM is required for the test suite" >&2
  exit 1
fi

TEST_HSM="$PWD/target/softhsm-test"
rm -rf "$TEST_HSM"
./softhsm/create-token.sh "$TEST_HSM" keyfront-test >/dev/null
export SOFTHSM2_CONF="$TEST_HSM/softhsm2.conf"
export KEYFRONT_TEST_PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so
TEST_PG="$PWD/target/postgres-test"
./scripts/postgres.sh stop "$TEST_PG"
rm -rf "$TEST_PG"
port=55432
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
  port=$((port + 1))
done
KEYFRONT_TEST_POSTGRES_URL=$(./scripts/postgres.sh start "$TEST_PG" "$port")
export KEYFRONT_TEST_POSTGRES_URL
# The cluster tests stop and start this server (tests/cluster.rs).
export KEYFRONT_TEST_POSTGRES_DIR="$TEST_PG" KEYFRONT_TEST_POSTGRES_PORT="$port"
trap './scripts/postgres.sh stop "$TEST_PG"' EXIT

# The partition test (tests/cluster.rs) puts a node in a network namespace: it needs root and
# `ip` (iproute2); without root it is skipped with a message. The signing tests (tests/grpc/purposes.rs)
# check signatures with the openssl command, which knows nothing of keyfront.
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "$(id -u)" -eq 0 ] && [ "${#missing[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

KEYFRONT_TEST_PYTHON=$(./tests/python/setup.sh)
export KEYFRONT_TEST_PYTHON
# The second token (issue 26): Kryoptic's module, built once and cached under target/kryoptic.
# tests/kryoptic.rs uses it directly; the token suites run on it at the end.
KEYFRONT_TEST_KRYOPTIC_MODULE=$(./scripts/kryoptic.sh module)
export KEYFRONT_TEST_KRYOPTIC_MODULE

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --locked --all-targets --quiet -- -D warnings
  cargo clippy --locked --all-targets --features test-hooks --quiet -- -D warnings
  cargo clippy --locked -p keyfront-client --all-targets --quiet -- -D warnings
fi
RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps --quiet
# The client library: unit tests and the examples in its docs (tests/client_crate.rs runs it
# against a real keyfront with the rest).
cargo test --locked -p keyfront-client
# test-hooks: the test clock (never in a release build).
cargo test --locked --all-targets --features test-hooks

# A second, independent token (issue 26): the HSM contract, the domain suite, key import and
# the gRPC suite again on Kryoptic (PKCS#11 3.x, built from crates.io by scripts/kryoptic.sh),
# each suite with slots of its own. docs/TESTING.md, "Tokens".
for suite in hsm_contract kms_pkcs11 key_import grpc; do
  conf=$(./scripts/kryoptic.sh slots "target/kryoptic-test/$suite" 96)
  echo "scripts/test.sh: $suite on Kryoptic"
  env -u SOFTHSM2_CONF KRYOPTIC_CONF="$conf" KEYFRONT_TEST_PKCS11_MODULE="$KEYFRONT_TEST_KRYOPTIC_MODULE" \
    cargo test --locked --features test-hooks --test "$suite"
done

# One pre-made token, as on a real HSM partition where tests may not initialise tokens: each
# test wipes it and takes it alone; a test that needs two tokens is skipped.
PREMADE="$PWD/target/softhsm-premade"
rm -rf "$PREMADE"
./softhsm/create-token.sh "$PREMADE" keyfront-premade >/dev/null
for suite in hsm_contract kms_pkcs11 key_import; do
  echo "scripts/test.sh: $suite on one pre-made token"
  SOFTHSM2_CONF="$PREMADE/softhsm2.conf" KEYFRONT_TEST_TOKEN_LABEL=keyfront-premade \
    KEYFRONT_TEST_TOKEN_PIN="$(cat "$PREMADE/pin")" \
    cargo test --locked --features test-hooks --test "$suite"
done
