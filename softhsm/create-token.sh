#!/usr/bin/env bash
# Creates a SoftHSM token non-interactively in DIR, with its own SOFTHSM2_CONF; never touches
# the system's default token directory.
#
#   softhsm/create-token.sh DIR LABEL
#
# Writes DIR/softhsm2.conf, DIR/tokens/, DIR/pin (user PIN, mode 600) and DIR/so-pin.
# Idempotent: if DIR already has a token with LABEL, it leaves it alone.
# Prints "created" or "exists" on stdout; callers export SOFTHSM2_CONF=DIR/softhsm2.conf.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 DIR LABEL" >&2
  exit 2
fi
DIR=$1
LABEL=$2
mkdir -p "$DIR/tokens"
DIR=$(cd "$DIR" && pwd)
CONF="$DIR/softhsm2.conf"

cat > "$CONF" <<CONF
# SoftHSM configuration for keyfront (made by softhsm/create-token.sh)
directories.tokendir = $DIR/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
slots.mechanisms = ALL
library.reset_on_fork = false
CONF

export SOFTHSM2_CONF="$CONF"
if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+$LABEL[[:space:]]*$"; then
  echo exists
  exit 0
fi

umask 077
random_pin() { od -An -N8 -tx1 /dev/urandom | tr -d ' \n'; }
[ -s "$DIR/pin" ] || random_pin > "$DIR/pin"
[ -s "$DIR/so-pin" ] || random_pin > "$DIR/so-pin"
chmod 600 "$DIR/pin" "$DIR/so-pin"

softhsm2-util --init-token --free --label "$LABEL" \
  --so-pin "$(cat "$DIR/so-pin")" --pin "$(cat "$DIR/pin")" >/dev/null
echo created
