#!/usr/bin/env bash
# Fail when a build compiled against a Debian package that scripts/system/debian-packages.txt does not
# install (directly or as a dependency of a listed package): a fresh machine would not have it.
# A package installed by hand hid libgtest-dev this way once; this check runs on every setup.
#
# usage: scripts/system/check_build_debs.sh USED_PACKAGES_FILE     (one package per line, as the build recorded)
set -euo pipefail
USED=${1:?usage: check_build_debs.sh USED_PACKAGES_FILE}
HERE=$(cd "$(dirname "$0")" && pwd)
listed=$(bash "$HERE/setup_system.sh" --print)
# What apt installs with the listed packages counts as installed by the list.
deps=$(apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts --no-breaks \
         --no-replaces --no-enhances $listed 2>/dev/null | grep -v '^ ' | tr -d '<>' || true)
allowed=$(printf '%s\n%s\n' "$listed" "$deps" | sed 's/:.*//' | sort -u)
missing=""
for p in $(cat "$USED"); do
  grep -qx "${p%%:*}" <<<"$allowed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[check_build_debs] the build compiled against Debian packages that scripts/system/debian-packages.txt does not install:$missing" >&2
  echo "[check_build_debs] a fresh machine would not have them: add them to the list" >&2
  exit 1
fi
