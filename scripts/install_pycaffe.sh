#!/usr/bin/env bash
# Build real pycaffe (BVLC Caffe at 9b89154, CPU-only, from the PyPI sdist brocolli-caffe) and
# install it into a venv. The build is cached outside the repo, keyed by sdist version and
# Python version, so only the first setup on a machine pays the ~5 minutes of compiling.
#
# usage: scripts/install_pycaffe.sh VENV_DIR
set -euo pipefail

VENV=${1:?usage: install_pycaffe.sh VENV_DIR}
PY="$VENV/bin/python"
SDIST_VERSION=9.0.2
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
CACHE_ROOT=${CAFFE_SERVING_CACHE:-$HOME/.cache/caffe-serving}
# Bump PATCH_LEVEL whenever patch_sources changes: it is part of the cache key.
PATCH_LEVEL=nogil1
CACHE="$CACHE_ROOT/pycaffe-brocolli-$SDIST_VERSION-$PATCH_LEVEL-py$PYVER"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

log() { echo "[install_pycaffe] $*" >&2; }

BUILD_ID=$(basename "$CACHE")
if [ "$(cat "$SITE/caffe/BUILD_ID" 2>/dev/null)" = "$BUILD_ID" ] && "$PY" -c 'import caffe._caffe' 2>/dev/null; then
  log "pycaffe $BUILD_ID already installed in $VENV"
  exit 0
fi

DEBS="libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-python-dev \
libboost-regex-dev libprotobuf-dev protobuf-compiler libgoogle-glog-dev libgflags-dev libhdf5-dev \
libopenblas-dev cmake"

missing_debs() {
  local m=""
  for p in $DEBS; do dpkg -s "$p" >/dev/null 2>&1 || m="$m $p"; done
  echo "$m"
}

ensure_debs() {
  # The runtime libraries are needed even when the build is cached.
  local m; m=$(missing_debs)
  if [ -n "$m" ]; then
    log "installing Debian packages:$m"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $m >/dev/null
  fi
}

patch_sources() {
  # pycaffe's Net._forward holds the GIL for the whole forward pass, so Net copies in different
  # threads (`instances: N`) could not overlap: the patch (shared with Dockerfile.caffe-gpu) fixes that.
  "$PY" "$(dirname "$0")/patch_pycaffe_gil.py" "$1/python/caffe/_caffe.cpp"
}

build() {
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building pycaffe from brocolli-caffe==$SDIST_VERSION in $work (about 5 minutes on 2 cores)"
  "$PY" -m pip download -q --no-deps --no-binary :all: "brocolli-caffe==$SDIST_VERSION" -d "$work"
  tar xzf "$work/brocolli-caffe-$SDIST_VERSION.tar.gz" -C "$work"
  local src="$work/brocolli-caffe-$SDIST_VERSION"
  patch_sources "$src"
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
  (cd "$src/build" && make -j"$(nproc)" pycaffe >"$work/make.log" 2>&1) \
    || { tail -60 "$work/make.log"; log "make failed"; exit 1; }
  local stage="$CACHE.tmp"; rm -rf "$stage"; mkdir -p "$stage"
  cp -r "$src/python/caffe" "$stage/caffe"
  rm -rf "$stage/caffe/test" "$stage/caffe/_caffe.cpp"
  rm -f "$stage/caffe/_caffe.so"
  cp "$(readlink -f "$src/build/lib/_caffe.so")" "$stage/caffe/_caffe.so"
  rm -rf "$CACHE"; mv "$stage" "$CACHE"
  log "cached build at $CACHE"
}

ensure_debs
if [ ! -f "$CACHE/caffe/_caffe.so" ]; then
  "$PY" -m pip install -q 'numpy<2'
  build
fi
"$PY" -m pip install -q 'numpy<2' six 'protobuf>=3.20' scikit-image scipy
rm -rf "$SITE/caffe"
cp -r "$CACHE/caffe" "$SITE/caffe"
echo "$BUILD_ID" > "$SITE/caffe/BUILD_ID"
"$PY" -c 'import caffe; caffe.set_mode_cpu(); print("[install_pycaffe] pycaffe OK:", caffe.__file__)'
