#!/usr/bin/env bash
# Installs SoftHSM 2 (Debian package softhsm2) and OpenSC (pkcs11-tool) when missing.
# With CI=true, failing to install is an error; otherwise it is too (there is no useful
# keyfront without an HSM), but the message says how to install by hand.
set -euo pipefail

MODULE=/usr/lib/softhsm/libsofthsm2.so

have_all() {
  [ -e "$MODULE" ] && command -v softhsm2-util >/dev/null 2>&1 && command -v pkcs11-tool >/dev/null 2>&1
}

if have_all; then
  exit 0
fi

echo "softhsm/install.sh: installing softhsm2 and opensc" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "softhsm/install.sh: not root and no sudo; run: apt-get install -y softhsm2 opensc" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq softhsm2 opensc >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq softhsm2 opensc >/dev/null
fi

if ! have_all; then
  echo "softhsm/install.sh: SoftHSM is still missing after installing (looked for $MODULE)" >&2
  exit 1
fi
