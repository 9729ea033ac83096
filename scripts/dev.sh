#!/usr/bin/env bash
# Brings up a working keyfront on this machine: installs SoftHSM if missing, builds, then runs
# `keyfront dev`, which creates (once) a SoftHSM token with its own SOFTHSM2_CONF, the key
# ceremony, a dev CA with server and client certificates, a config, tenants acme and globex,
# and serves gRPC over TLS 1.3 on 127.0.0.1:7443. Running it again reuses what exists.
#   KEYFRONT_DEV_DIR   where everything lives (default .keyfront-dev)
#   extra arguments    passed to `keyfront dev` (e.g. --listen 127.0.0.1:7444); with
#                      --hsm kryoptic it builds Kryoptic (scripts/kryoptic.sh, once) and serves
#                      from a Kryoptic token instead of SoftHSM (use a --dir of its own)
set -euo pipefail
cd "$(dirname "$0")/.."

./softhsm/install.sh
if [ ! -x target/release/keyfront ]; then
  echo "scripts/dev.sh: building keyfront (release). The first build compiles every dependency: about 6 minutes on 2 cores once the crates are downloaded (measured), more on a slow network; later runs take seconds." >&2
fi
cargo build --release --locked
args=("$@")
if [[ " $* " == *" --hsm kryoptic "* || " $* " == *" --hsm=kryoptic "* ]] &&
  [[ " $* " != *" --hsm-module"* ]]; then
  args+=(--hsm-module "$(./scripts/kryoptic.sh module)")
fi
exec ./target/release/keyfront dev --dir "${KEYFRONT_DEV_DIR:-.keyfront-dev}" "${args[@]}"
