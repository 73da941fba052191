#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries (initdb, pg_ctl) are installed: the store tests start a
# private server of their own in a temporary folder (tests/pg_server.py), never the machine's.
# Installs Debian's postgresql package when they are missing; says nothing when they are there.
set -euo pipefail

have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; }

if ! have_pg; then
  bash "$(dirname "$0")/apt-install.sh" PostgreSQL postgresql
fi
have_pg || { echo "edgeloop: PostgreSQL's initdb still missing after the install" >&2; exit 1; }
