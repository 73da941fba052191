#!/usr/bin/env bash
# apt-install.sh WHAT PACKAGE...: install Debian packages the way every ensure-*.sh script does
# (sudo when not root, quiet, non-interactive). WHAT names them in the messages. Exits 1 with one
# line when this machine has no apt-get.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: apt-install.sh WHAT PACKAGE..." >&2; exit 2; }
what="$1"; shift
if ! command -v apt-get >/dev/null 2>&1; then
  echo "edgeloop: no apt-get here: install $what by hand (Debian packages: $*)" >&2
  exit 1
fi
echo "edgeloop: installing $what (Debian packages $*)"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
