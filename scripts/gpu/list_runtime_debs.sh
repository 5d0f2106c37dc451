#!/usr/bin/env bash
# Print the Debian/Ubuntu packages that hold the shared libraries FILE... link against, one per
# line: what a runtime image must install for a library built in a -dev image of the same release
# (Dockerfile.caffe-gpu uses it, so no package name is guessed per release). Libraries under
# /usr/local/cuda are left out: the CUDA runtime base image has them.
#
# usage: scripts/gpu/list_runtime_debs.sh FILE...
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: list_runtime_debs.sh FILE..." >&2; exit 2; }
missing=$(ldd "$@" | grep "not found" || true)
[ -z "$missing" ] || { echo "list_runtime_debs: unresolved libraries:" >&2; echo "$missing" >&2; exit 1; }
ldd "$@" | awk '/=> \// {print $3}' | sort -u | grep -v '^/usr/local/cuda' \
  | while read -r lib; do
      # dpkg registers a file under the path its package ships; try the resolved path and the
      # /usr-merged one (libc and friends are registered under /lib).
      real=$(readlink -f "$lib")
      for candidate in "$real" "$lib" "${real#/usr}" "${lib#/usr}"; do
        if pkg=$(dpkg -S "$candidate" 2>/dev/null); then echo "${pkg%%:*}"; break; fi
      done
    done | sort -u
