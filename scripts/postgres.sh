#!/usr/bin/env bash
# A private PostgreSQL server for tests and for trying cluster mode: installs PostgreSQL
# (Debian package postgresql) when missing, then runs initdb and the server as a non-root user
# on a private port and data directory, listening on 127.0.0.1 only.
#
#   scripts/postgres.sh start DIR [PORT]   # prints the connection string on stdout
#   scripts/postgres.sh stop DIR
#
# DIR holds the cluster (DIR/data) and its log (DIR/log); it takes TCP only (no socket). Authentication is
# "trust" on loopback: for throwaway test and dev clusters only, never for production.
# As root the server runs as the user "postgres" (made by the Debian package); otherwise as
# the calling user. That user must be able to enter DIR: when root's DIR is out of its reach
# (a checkout under a home directory of mode 700), the cluster lives in
# /var/tmp/keyfront-postgres-<hash of DIR>/ instead, and DIR/data is a symbolic link to it.
set -euo pipefail

usage() {
  echo "usage: $0 start DIR [PORT] | stop DIR" >&2
  exit 2
}
[ $# -ge 2 ] || usage
ACTION=$1
DIR=$2
PORT=${3:-55432}

pg_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$found" ] && [ -x "$found/pg_ctl" ] && echo "$found"
}

install_postgres() {
  echo "scripts/postgres.sh: installing postgresql" >&2
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else
      echo "scripts/postgres.sh: not root and no sudo; run: apt-get install -y postgresql" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! $sudo apt-get install -y -qq postgresql >/dev/null 2>&1; then
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq postgresql >/dev/null
  fi
}

# Runs a command as the server's user.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

case "$ACTION" in
  start)
    BIN=$(pg_bin || true)
    if [ -z "$BIN" ]; then
      install_postgres
      BIN=$(pg_bin || true)
      if [ -z "$BIN" ]; then
        echo "scripts/postgres.sh: PostgreSQL is still missing after installing" >&2
        exit 1
      fi
    fi
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    HOME_DIR=$DIR
    if [ "$(id -u)" -eq 0 ]; then
      id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
      chown postgres "$DIR"
      if ! runuser -u postgres -- test -x "$DIR" -a -w "$DIR" 2>/dev/null; then
        # A directory above DIR is closed to "postgres" (mode 700 home directories are).
        HOME_DIR=/var/tmp/keyfront-postgres-$(printf '%s' "$DIR" | sha256sum | cut -c1-16)
        if [ ! -L "$DIR/data" ]; then
          rm -rf "$HOME_DIR" "$DIR/data"
        fi
        mkdir -p "$HOME_DIR"
        chown postgres "$HOME_DIR"
        chmod 700 "$HOME_DIR"
        ln -sfn "$HOME_DIR/data" "$DIR/data"
        echo "scripts/postgres.sh: the user postgres cannot enter $DIR; the cluster lives in $HOME_DIR (linked from $DIR/data)" >&2
      fi
    fi
    if [ ! -f "$HOME_DIR/data/PG_VERSION" ]; then
      as_owner "$BIN/initdb" -D "$HOME_DIR/data" -U postgres --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 || {
        cat "$DIR/initdb.log" >&2
        echo "scripts/postgres.sh: initdb failed in $HOME_DIR/data as user $(as_owner id -un); that user must be able to enter and write every directory on the way" >&2
        exit 1
      }
    fi
    if ! as_owner "$BIN/pg_ctl" -D "$HOME_DIR/data" status >/dev/null 2>&1; then
      as_owner "$BIN/pg_ctl" -D "$HOME_DIR/data" -l "$HOME_DIR/log" -w -t 60 start \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories= -c max_connections=300 -c fsync=on" \
        >/dev/null || {
        tail -n 30 "$HOME_DIR/log" >&2 || true
        echo "scripts/postgres.sh: PostgreSQL did not start on 127.0.0.1:$PORT (its log is above: $HOME_DIR/log)" >&2
        exit 1
      }
    fi
    echo "host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
    ;;
  stop)
    BIN=$(pg_bin || true)
    [ -n "$BIN" ] || exit 0
    [ -f "$DIR/data/PG_VERSION" ] || exit 0
    # DIR/data may be a link to a cluster kept where the user postgres can reach it.
    DATA=$(readlink -f "$DIR/data")
    as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
    ;;
  *)
    usage
    ;;
esac
