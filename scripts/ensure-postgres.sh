#!/usr/bin/env bash
# Makes sure the PostgreSQL server binaries (initdb, postgres), psql and pgbench
# are installed, which the tests, `make demo` and the benchmarks start. As root it
# installs Debian's postgresql package; otherwise it says what to install.
set -euo pipefail

have_server() {
  local dir
  if [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ] && [ -x "$PG_BINDIR/postgres" ]; then return 0; fi
  if command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then return 0; fi
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then return 0; fi
  done
  command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1
}

if have_server && command -v psql >/dev/null 2>&1 && command -v pgbench >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL server binaries, psql or pgbench not found: installing Debian's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q postgresql postgresql-contrib >&2
  # The package may start a cluster of its own; the tests start their own and need
  # nothing from it.
  if have_server && command -v psql >/dev/null 2>&1; then exit 0; fi
  echo "apt-get install postgresql did not provide initdb/postgres/psql" >&2
  exit 1
fi

cat >&2 <<'MSG'
rolegate's tests need the PostgreSQL server binaries (initdb, postgres), psql and pgbench.
Install them, then run make again:
  Debian/Ubuntu:  sudo apt-get install postgresql postgresql-contrib
  Fedora/RHEL:    sudo dnf install postgresql-server postgresql-contrib
  macOS:          brew install postgresql@17
If the binaries are in an unusual place, set PG_BINDIR to their directory.
MSG
exit 1
