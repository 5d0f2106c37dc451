#!/usr/bin/env bash
# Compile Boost.Python for a Python the system has no Boost.Python for (Debian 12 ships it for 3.11
# only; the lent GPU machine's Python is 3.12), from Debian's own source package of the Boost that
# is installed (libboost-python-dev's version), with Debian's patches to Boost.Python applied: the
# same library as the system's, for another Python. The headers are the system's
# (/usr/include/boost). Cached in CAFFE_SERVING_CACHE; prints the path of the shared library.
#
# The source comes through apt (`apt-get source`, with a private deb-src list and package index,
# so the machine's apt configuration is untouched): 61 MB once, of which only libs/python is kept.
#
# usage: scripts/caffe/boost_python.sh PYTHON
set -euo pipefail
PY=${1:?usage: boost_python.sh PYTHON}
CACHE_ROOT=${CAFFE_SERVING_CACHE:-$HOME/.cache/caffe-serving}
log() { echo "[boost_python] $*" >&2; }

ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
src_pkg=$(dpkg-query -W -f='${source:Package}' libboost-python-dev 2>/dev/null || true)
[ -n "$src_pkg" ] || { log "libboost-python-dev is not installed (scripts/system/setup_system.sh has it)"; exit 1; }
# libboost-python-dev is a metapackage of libboost-pythonX.Y-dev, built from the source boostX.Y.
src_pkg=$(dpkg-query -W -f='${Depends}' libboost-python-dev | grep -o 'libboost-python[0-9.]*-dev' | head -1)
src_pkg=$(dpkg-query -W -f='${source:Package} ${source:Version}' "$src_pkg")
name=${src_pkg% *} version=${src_pkg#* }
lib="libboost_python$ver.so.${version%%+*}"
lib=${lib%%-*}
out="$CACHE_ROOT/boost-python-$name-$version-py$ver"
if [ -f "$out/$lib" ]; then echo "$out/$lib"; exit 0; fi

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
log "compiling Boost.Python ($name $version) for Python $ver from Debian's source (about 1 minute)"
mkdir -p "$work/lists/partial"
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
echo "deb-src http://deb.debian.org/debian $codename main" > "$work/sources.list"
apt_opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$work/lists" -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update -qq >&2
(cd "$work" && apt-get "${apt_opts[@]}" source -qq --download-only "$name=$version" >&2)
tar xJf "$work/${name}_${version%-*}.orig.tar.xz" -C "$work" --wildcards '*/libs/python/src/*' '*/libs/python/include/*'
top=$(find "$work" -maxdepth 3 -type d -path '*/libs/python' | head -1); top=${top%/libs/python}
tar xJf "$work/${name}_${version}.debian.tar.xz" -C "$work"
# Debian's patches that touch Boost.Python's sources, as the system library was built with them.
while read -r patch; do
  case "$patch" in ''|'#'*) continue ;; esac
  if grep -q '^+++ .*libs/python/' "$work/debian/patches/$patch"; then
    (cd "$top" && patch -p1 -s --forward < "$work/debian/patches/$patch" >&2) \
      || { log "Debian's patch $patch does not apply"; exit 1; }
  fi
done < "$work/debian/patches/series"

pyinc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
mkdir -p "$work/obj"
# Boost.Python's sources, less its numpy extension (Caffe does not use boost::python::numpy).
find "$top/libs/python/src" -name '*.cpp' -not -path '*/numpy/*' | sort > "$work/sources"
xargs -P "$(nproc)" -I{} sh -c 'f={}; o=$(echo "$f" | tr / _); exec nice -n "${CAFFE_BUILD_NICE:-0}" g++ -c -O2 -fPIC \
    -std=c++14 -DNDEBUG -DBOOST_PYTHON_SOURCE -DBOOST_PYTHON_DYNAMIC_LIB -I"$1" "$f" -o "$2/$o.o"' _ "$pyinc" "$work/obj" \
  < "$work/sources"
mkdir -p "$out.tmp"
g++ -shared -o "$out.tmp/$lib" -Wl,-soname,"$lib" "$work"/obj/*.o
ln -sf "$lib" "$out.tmp/libboost_python$ver.so"
rm -rf "$out"; mv "$out.tmp" "$out"
log "cached $out/$lib"
echo "$out/$lib"
