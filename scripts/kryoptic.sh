#!/usr/bin/env bash
# Kryoptic: a PKCS#11 3.x software token written in Rust (latchset/kryoptic, on crates.io), the
# second, independent token keyfront's tests run on (docs/TESTING.md, "Tokens").
#
#   scripts/kryoptic.sh module          builds the module once (cached under target/kryoptic/)
#                                       and prints its path
#   scripts/kryoptic.sh slots DIR N     writes DIR/kryoptic.conf with N empty slots, one sqlite
#                                       file each in DIR (any old ones removed), prints its path
#
# Kryoptic never adds a free slot by itself, so every token a test initialises needs a slot
# provisioned here. It is built with its `minimal` features and OpenSSL linked dynamically:
# Debian 12's OpenSSL 3.0 (its default features want 3.2). Building needs libclang-dev,
# libssl-dev, libsqlite3-dev and pkg-config, installed here when missing and run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.5.4
ROOT="$PWD/target/kryoptic"

install_build_deps() {
  local missing=()
  dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
  dpkg -s libsqlite3-dev >/dev/null 2>&1 || missing+=(libsqlite3-dev)
  dpkg -s pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/kryoptic.sh: needs ${missing[*]} (apt-get install them, or run as root)" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

module() {
  local built="$ROOT/src/target/release/libkryoptic_pkcs11.so"
  if [ -f "$built" ] && [ -f "$ROOT/src/.version-$VERSION" ]; then
    echo "$built"
    return 0
  fi
  install_build_deps
  # The crate's source as cargo downloads it: a throwaway manifest that depends on it, then
  # its manifest path from `cargo metadata`.
  local fetch="$ROOT/fetch"
  mkdir -p "$fetch/src"
  cat > "$fetch/Cargo.toml" <<TOML
[package]
name = "kryoptic-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
kryoptic = { version = "=$VERSION", default-features = false }

[workspace]
TOML
  : > "$fetch/src/lib.rs"
  local manifest
  manifest=$(cargo metadata --quiet --format-version 1 --manifest-path "$fetch/Cargo.toml" |
    grep -o "\"manifest_path\":\"[^\"]*/kryoptic-$VERSION/Cargo.toml\"" | head -1 |
    sed 's/^"manifest_path":"//; s/"$//')
  if [ -z "$manifest" ]; then
    echo "scripts/kryoptic.sh: could not download kryoptic $VERSION from crates.io" >&2
    return 1
  fi
  rm -rf "$ROOT/src"
  cp -r "$(dirname "$manifest")" "$ROOT/src"
  chmod -R u+w "$ROOT/src"
  # A workspace of its own: target/ is inside keyfront's.
  printf '\n[workspace]\n' >> "$ROOT/src/Cargo.toml"
  echo "scripts/kryoptic.sh: building Kryoptic $VERSION (about 2 minutes on 2 cores)" >&2
  # Its own Cargo.lock, as released.
  (cd "$ROOT/src" && cargo build --release --locked --quiet --no-default-features \
    --features minimal,kryoptic-lib/dynamic)
  touch "$ROOT/src/.version-$VERSION"
  echo "$built"
}

slots() {
  local dir=$1 count=$2
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  rm -f "$dir"/slot-*.sql "$dir"/slot-*.sql-*
  {
    echo "# Kryoptic slots for keyfront (made by scripts/kryoptic.sh): each an empty token store"
    for i in $(seq 1 "$count"); do
      printf '\n[[slots]]\nslot = %d\ndbtype = "sqlite"\ndbargs = "%s/slot-%d.sql"\n' "$i" "$dir" "$i"
    done
  } > "$dir/kryoptic.conf"
  echo "$dir/kryoptic.conf"
}

case "${1:-}" in
  module) module ;;
  slots)
    [ $# -eq 3 ] || { echo "usage: $0 slots DIR N" >&2; exit 2; }
    slots "$2" "$3"
    ;;
  *)
    echo "usage: $0 module | slots DIR N" >&2
    exit 2
    ;;
esac
