#!/usr/bin/env bash
# Debian packages the tests and benchmarks use beyond pycaffe's own (install_pycaffe.sh has those).
set -euo pipefail
need=""
for p in wrk; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
[ -z "$need" ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $need >/dev/null
