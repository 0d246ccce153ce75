#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the storage tests.
#
#   bash .ci/postgres.sh start   # prints "ADMIN_URL DATA_FOLDER" (nothing when no server could start)
#   bash .ci/postgres.sh stop DATA_FOLDER
#
# start: installs Debian's postgresql package when it is missing, creates a cluster in a temporary folder, starts it
# on a free port (trust authentication, loopback only). Without a server the PostgreSQL tests skip, saying so.
# Progress and errors go to stderr.
set -uo pipefail
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
run=()
user=$(id -un)
if [ "$(id -u)" = 0 ]; then
  run=(runuser -u postgres --)
  user=postgres
fi
case ${1:-start} in
  stop)
    [ -n "${2:-}" ] && "${run[@]}" "$(pg_bin)/pg_ctl" -D "$2/db" -m immediate stop >&2 2>&1
    exit 0 ;;
  start) ;;
  *) echo "usage: $0 start | stop DATA_FOLDER" >&2; exit 2 ;;
esac
if [ -z "$(pg_bin)" ] && command -v apt-get >/dev/null; then
  echo "installing postgresql from Debian's packages" >&2
  { apt-get install -y -q postgresql || { apt-get update -q && apt-get install -y -q postgresql; }; } >&2 2>&1
fi
bin=$(pg_bin)
if [ -z "$bin" ] || { [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; }; then
  echo "postgresql is not available: its tests will skip" >&2
  exit 0
fi
data=$(mktemp -d /tmp/ltri-pg.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres "$data"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if "${run[@]}" "$bin/initdb" -D "$data/db" -A trust -U "$user" >&2 2>&1 \
   && "${run[@]}" "$bin/pg_ctl" -D "$data/db" -o "-p $port -k $data -c listen_addresses=127.0.0.1" \
        -l "$data/log" -w start >&2 2>&1; then
  echo "postgresql+psycopg://$user@127.0.0.1:$port/postgres $data"
else
  echo "postgresql did not start (log: $data/log): its tests will skip" >&2
fi
