#!/usr/bin/env bash
# Build real pycaffe (BVLC Caffe at 9b89154, CPU-only, from the PyPI sdist brocolli-caffe) and
# install it into a venv. The build is cached outside the repo (CAFFE_SERVING_CACHE, default
# ~/.cache/caffe-serving), keyed by sdist version, Python version, BUILD_LEVEL and a hash of the
# source patches, so only the first setup on a machine pays the ~5 minutes of compiling.
# Bump BUILD_LEVEL whenever build() changes what it compiles.
#
# A cached build must never hide a build that can no longer run from scratch: the build records
# which Debian packages provided the headers it compiled against, and every install (cached or not)
# checks that each of them is in scripts/debian-packages.txt. A package installed by hand that the
# list lacks fails here, on the developer's machine, not first on a new user's.
#
# usage: scripts/install_pycaffe.sh VENV_DIR
set -euo pipefail

VENV=${1:?usage: install_pycaffe.sh VENV_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
PY="$VENV/bin/python"
SDIST_VERSION=9.0.2
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
CACHE_ROOT=${CAFFE_SERVING_CACHE:-$HOME/.cache/caffe-serving}
BUILD_LEVEL=2
PATCHES=$(cat "$HERE/patch_caffe_sources.py" "$HERE/patch_pycaffe_gil.py" | sha256sum | cut -c1-10)
CACHE="$CACHE_ROOT/pycaffe-brocolli-$SDIST_VERSION-py$PYVER-b$BUILD_LEVEL-$PATCHES"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

log() { echo "[install_pycaffe] $*" >&2; }

record_build_debs() {
  # The headers under /usr the compiler read (its depfiles), mapped to the packages that own them.
  local build=$1 out=$2
  # The compiler toolchain's own headers (libc, libstdc++, kernel headers) come with gcc, not the list.
  find "$build" -name '*.d' -print0 | xargs -0 cat | tr ' \\' '\n\n' | grep '^/usr/' | sort -u \
    | xargs -r realpath -e 2>/dev/null | sort -u | xargs -r dpkg -S 2>/dev/null \
    | cut -d: -f1 | tr ',' '\n' | awk 'NF {print $1}' | sort -u \
    | grep -v -x -e 'libc6-dev' -e 'linux-libc-dev' -e 'libstdc++-[0-9]*-dev' -e 'libgcc-[0-9]*-dev' \
    > "$out" || true
  [ -s "$out" ] || { log "could not read which Debian packages the build used"; exit 1; }
}

make_with_progress() {
  # make prints "[ NN%]" lines; show one every 30 s instead of minutes of silence.
  local dir=$1 logf=$2 last=0 pct
  (cd "$dir" && make -j"$(nproc)" pycaffe >"$logf" 2>&1) &
  local pid=$! start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    if (( SECONDS - last >= 30 )); then
      last=$SECONDS
      pct=$(grep -o '^\[ *[0-9]*%\]' "$logf" | tail -1 | tr -d '[] ' || true)
      log "compiling Caffe: ${pct:-0%} after $((SECONDS - start)) s"
    fi
  done
  wait "$pid"
}

build() {
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building pycaffe from brocolli-caffe==$SDIST_VERSION in $work (about 5 minutes on 2 cores)"
  "$PY" -m pip download -q --no-deps --no-binary :all: "brocolli-caffe==$SDIST_VERSION" -d "$work"
  tar xzf "$work/brocolli-caffe-$SDIST_VERSION.tar.gz" -C "$work"
  local src="$work/brocolli-caffe-$SDIST_VERSION"
  "$PY" "$HERE/patch_caffe_sources.py" "$src"
  # Its CMake links -lboost_python, -lhdf5, -lhdf5_hl from $ANACONDA_HOME/lib: give it a folder of links.
  local shim="$work/shim"; mkdir -p "$shim/lib"
  ln -s "/usr/lib/x86_64-linux-gnu/libboost_python${PYVER/./}.so" "$shim/lib/libboost_python.so"
  ln -s /usr/lib/x86_64-linux-gnu/hdf5/serial/libhdf5.so "$shim/lib/libhdf5.so"
  ln -s /usr/lib/x86_64-linux-gnu/hdf5/serial/libhdf5_hl.so "$shim/lib/libhdf5_hl.so"
  local pyinc npinc
  pyinc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  npinc=$("$PY" -c 'import numpy; print(numpy.get_include())')
  mkdir -p "$src/build"
  (cd "$src/build" && cmake .. -DCPU_ONLY=ON -DBLAS=Open -DBUILD_python=ON -DBUILD_docs=OFF \
      -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=OFF -DUSE_HDF5=OFF \
      -DANACONDA_HOME="$shim" -DPYTHON_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_FLAGS="-I$pyinc -I$npinc -I/usr/include/hdf5/serial -std=c++14" >"$work/cmake.log" 2>&1) \
    || { tail -40 "$work/cmake.log"; log "cmake failed"; exit 1; }
  make_with_progress "$src/build" "$work/make.log" \
    || { tail -60 "$work/make.log"; log "make failed"; exit 1; }
  local stage="$CACHE.tmp"; rm -rf "$stage"; mkdir -p "$stage"
  record_build_debs "$src/build" "$stage/build-debs.txt"
  cp -r "$src/python/caffe" "$stage/caffe"
  rm -rf "$stage/caffe/test" "$stage/caffe/_caffe.cpp"
  rm -f "$stage/caffe/_caffe.so"
  cp "$(readlink -f "$src/build/lib/_caffe.so")" "$stage/caffe/_caffe.so"
  rm -rf "$CACHE"; mv "$stage" "$CACHE"
  log "cached build at $CACHE ($(du -sh "$CACHE" | cut -f1))"
}

BUILD_ID=$(basename "$CACHE")
bash "$HERE/setup_system.sh"   # the runtime libraries are needed even when the build is cached
if [ "$(cat "$SITE/caffe/BUILD_ID" 2>/dev/null)" = "$BUILD_ID" ] && "$PY" -c 'import caffe._caffe' 2>/dev/null; then
  bash "$HERE/check_build_debs.sh" "$CACHE/build-debs.txt"
  log "pycaffe $BUILD_ID already installed in $VENV"
  exit 0
fi
if [ ! -f "$CACHE/caffe/_caffe.so" ] || [ ! -f "$CACHE/build-debs.txt" ]; then
  "$PY" -m pip install -q 'numpy<2'
  build
fi
bash "$HERE/check_build_debs.sh" "$CACHE/build-debs.txt"
"$PY" -m pip install -q 'numpy<2' six 'protobuf>=3.20' scikit-image scipy
rm -rf "$SITE/caffe"
cp -r "$CACHE/caffe" "$SITE/caffe"
"$PY" "$HERE/patch_pycaffe_io.py" "$SITE/caffe"
echo "$BUILD_ID" > "$SITE/caffe/BUILD_ID"
"$PY" -c 'import caffe; caffe.set_mode_cpu(); print("[install_pycaffe] pycaffe OK:", caffe.__file__)'
