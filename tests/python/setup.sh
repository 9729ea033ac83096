#!/usr/bin/env bash
# Creates target/python-env with the Python client's packages; prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/../.."
ENV="$PWD/target/python-env"
if [ ! -x "$ENV/bin/python" ]; then
  if ! python3 -m venv "$ENV" >/dev/null 2>&1; then
    rm -rf "$ENV"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    $SUDO apt-get install -y -qq python3 python3-venv >/dev/null 2>&1 || {
      $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3 python3-venv >/dev/null; }
    python3 -m venv "$ENV"
  fi
fi
"$ENV/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt >&2
echo "$ENV/bin/python"
