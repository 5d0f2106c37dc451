#!/usr/bin/env bash
# Install the Debian packages listed in scripts/system/debian-packages.txt that are missing (idempotent).
#
# usage: scripts/system/setup_system.sh [--print]     --print: only list the packages, one per line
set -euo pipefail
LIST="$(dirname "$0")/debian-packages.txt"
packages=$(sed 's/#.*//' "$LIST" | awk 'NF {print $1}')
if [ "${1:-}" = "--print" ]; then echo "$packages"; exit 0; fi
need=""
for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
[ -z "$need" ] && exit 0
echo "[setup_system] installing Debian packages:$need" >&2
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $need >/dev/null
