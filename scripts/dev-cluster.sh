#!/usr/bin/env bash
# A local 3-node keyfront cluster on PostgreSQL, for trying cluster mode: installs SoftHSM and
# PostgreSQL if missing, starts a private PostgreSQL (non-root, 127.0.0.1, port 55439, data in
# DIR/postgres; stopped when this script ends), builds, then runs `keyfront dev --nodes 3`:
# the dev token, CA and tenants as `keyfront dev` makes them, one config and one token copy
# per node in DIR/node-<i>, nodes on 127.0.0.1:7443, :7444 and :7445.
#   KEYFRONT_DEV_DIR   where everything lives (default .keyfront-cluster)
#   extra arguments    passed to `keyfront dev` (e.g. --nodes 5)
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${KEYFRONT_DEV_DIR:-.keyfront-cluster}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
./softhsm/install.sh
cargo build --release --locked --quiet
./scripts/postgres.sh stop "$DIR/postgres"
KEYFRONT_DEV_POSTGRES_URL=$(./scripts/postgres.sh start "$DIR/postgres" 55439)
export KEYFRONT_DEV_POSTGRES_URL
trap './scripts/postgres.sh stop "$DIR/postgres"' EXIT
./target/release/keyfront dev --dir "$DIR" --nodes 3 "$@"
