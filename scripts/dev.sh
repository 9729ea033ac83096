#!/usr/bin/env bash
# Brings up a working keyfront on this machine: installs SoftHSM if missing, creates a dev
# token and config under .keyfront-dev/ (or $KEYFRONT_DEV_DIR), runs the key ceremony once,
# then runs `keyfront selfcheck` against real SoftHSM. Running it again reuses what exists.
# (`keyfront serve` arrives with the gRPC service; until then selfcheck is what runs.)
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${KEYFRONT_DEV_DIR:-.keyfront-dev}
LABEL=keyfront-dev

./softhsm/install.sh
cargo build --release --locked --quiet

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
./softhsm/create-token.sh "$DIR/hsm" "$LABEL" >/dev/null
export SOFTHSM2_CONF="$DIR/hsm/softhsm2.conf"

if [ ! -f "$DIR/keyfront.toml" ]; then
  cat > "$DIR/keyfront.toml" <<TOML
# keyfront dev configuration (made by scripts/dev.sh); see config.example.toml for every key.
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "$LABEL"
pin_file = "hsm/pin"

[storage]
data_dir = "data"
TOML
fi

status=0
./target/release/keyfront init --config "$DIR/keyfront.toml" 2>"$DIR/init.log" || status=$?
if [ "$status" -eq 3 ]; then
  echo "dev token $LABEL: already initialized (keys kept)"
elif [ "$status" -ne 0 ]; then
  cat "$DIR/init.log" >&2
  exit "$status"
fi
echo
exec ./target/release/keyfront selfcheck --config "$DIR/keyfront.toml"
