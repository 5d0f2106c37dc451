#!/usr/bin/env bash
# Build Caffe from the PyPI sdist brocolli-caffe (BVLC Caffe at 9b89154, repackaged) with its own
# CMake: the one Caffe build of this project. scripts/caffe/install_pycaffe.sh (the CPU pycaffe of every
# setup, and Dockerfile.caffe-gpu's CUDA one) and scripts/gpu/cuda_build.sh (`make cuda-build`,
# `make gpu-bundle`) call it. Builds are cached in CAFFE_SERVING_CACHE (default ~/.cache/caffe-serving),
# keyed by build_key.py (a hash of the contents of this script, the source patches and what they add)
# and (CPU) the Python version or (CUDA) the CUDA version and GPU architectures; the last line printed is
# the cached build's folder. The sources are patched by apply_patches.py, the one patch entry point.
#
#   CPU:   build_caffe.sh --python PY
#          -> DIR/caffe: the pycaffe package (_caffe.so holds all of Caffe), DIR/build-debs.txt
#   CUDA:  build_caffe.sh --cuda CUDA_ROOT [--arch "90"] [--ptx "90"] --python PY [--python PY2 ...]
#          -> DIR/lib/libcaffe.so.1.0.0 (C++ and CUDA), DIR/pyX.Y/caffe: a pycaffe package per Python
#             (_caffe.so, libcaffe and, where the system has none, Boost.Python for that Python,
#             found through RUNPATH $ORIGIN), DIR/build-debs.txt, DIR/BUILD_INFO
#
# The CPU build has Caffe's Python layer (WITH_PYTHON_LAYER, as a define: the sdist's BUILD_python_layer
# option links CMake targets it never defines); the CUDA build has not: its libcaffe links no Python, so
# that one library serves a binding per Python version, and a net with a Python layer is refused there.
#
# CUDA_ROOT holds bin/nvcc, include/ and lib/ (a CUDA toolkit, or the nvidia/cu13 folder of the
# PyPI CUDA wheels). USE_CUDNN stays off: BVLC's cuDNN code predates cuDNN 8. A Python whose
# Boost.Python the system lacks (Debian 12 has it for 3.11 only) gets one compiled from Debian's
# source of the installed Boost (boost_python.sh). The Python must have numpy (its headers).
#
# A cached build must never hide a build that can no longer run from scratch: the build records
# which Debian packages provided the headers it compiled against, and every call (cached or not)
# checks that each of them is in scripts/system/debian-packages.txt.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SYSTEM="$HERE/../system"
SDIST_VERSION=9.0.2
CACHE_ROOT=${CAFFE_SERVING_CACHE:-$HOME/.cache/caffe-serving}

PYTHONS=() CUDA_ROOT="" ARCH="90" PTX="90"
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHONS+=("$2"); shift 2 ;;
    --cuda) CUDA_ROOT=$(cd "$2" && pwd); shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    --ptx) PTX=$2; shift 2 ;;
    *) echo "usage: build_caffe.sh [--cuda CUDA_ROOT [--arch '90'] [--ptx '90']] --python PY [--python PY ...]" >&2; exit 2 ;;
  esac
done
[ ${#PYTHONS[@]} -ge 1 ] || { echo "build_caffe.sh: --python is required" >&2; exit 2; }
PY=${PYTHONS[0]}

log() { echo "[build_caffe] $*" >&2; }
pyver() { "$1" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'; }
CUDA_FLAG=(); [ -z "$CUDA_ROOT" ] || CUDA_FLAG=(--cuda)

KEY=$("$PY" "$HERE/build_key.py" "${CUDA_FLAG[@]}")
if [ -z "$CUDA_ROOT" ]; then
  CACHE="$CACHE_ROOT/pycaffe-brocolli-$SDIST_VERSION-py$(pyver "$PY")-$KEY"
else
  [ -x "$CUDA_ROOT/bin/nvcc" ] || { log "no bin/nvcc under $CUDA_ROOT"; exit 1; }
  CUDA_VERSION=$("$CUDA_ROOT/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  CACHE="$CACHE_ROOT/caffe-cuda$CUDA_VERSION-brocolli-$SDIST_VERSION-sm${ARCH// /_}-ptx${PTX// /_}-$KEY"
fi

record_build_debs() {
  # The headers under /usr the compiler read (its depfiles), mapped to the packages that own them.
  local build=$1 out=$2
  find "$build" -name '*.d' -print0 | xargs -0 cat | tr ' \\' '\n\n' | grep '^/usr/' | sort -u \
    | xargs -r realpath -e 2>/dev/null | sort -u | xargs -r dpkg -S 2>/dev/null \
    | cut -d: -f1 | tr ',' '\n' | awk 'NF {print $1}' | sort -u \
    | grep -v -x -e 'libc6-dev' -e 'linux-libc-dev' -e 'libstdc++-[0-9]*-dev' -e 'libgcc-[0-9]*-dev' -e 'libpython3.*-dev' \
    > "$out" || true
  [ -s "$out" ] || { log "could not read the packages the build used"; exit 1; }
}

make_with_progress() {
  # make prints "[ NN%]" lines; show one every 30 s instead of minutes of silence.
  local dir=$1 target=$2 logf=$3 last=0 pct
  # -k: one failed build shows every file that does not compile, not only the first
  (cd "$dir" && nice -n "${CAFFE_BUILD_NICE:-0}" make -k -j"$(nproc)" "$target" >"$logf" 2>&1) &
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

fetch_source() {  # WORK -> prints the patched source folder
  local work=$1
  "$PY" -m pip download -q --no-deps --no-binary :all: "brocolli-caffe==$SDIST_VERSION" -d "$work" >&2
  tar xzf "$work/brocolli-caffe-$SDIST_VERSION.tar.gz" -C "$work"
  local src="$work/brocolli-caffe-$SDIST_VERSION"
  "$PY" "$HERE/apply_patches.py" source "$src" "${CUDA_FLAG[@]}" >&2
  echo "$src"
}

make_shim() {  # WORK BOOST_PYTHON_SO: its CMake links -lboost_python, -lhdf5, -lhdf5_hl from $ANACONDA_HOME/lib
  local shim="$1/shim"; mkdir -p "$shim/lib"
  ln -sf "$2" "$shim/lib/libboost_python.so"
  ln -sf /usr/lib/x86_64-linux-gnu/hdf5/serial/libhdf5.so "$shim/lib/libhdf5.so"
  ln -sf /usr/lib/x86_64-linux-gnu/hdf5/serial/libhdf5_hl.so "$shim/lib/libhdf5_hl.so"
  echo "$shim"
}

build_cpu() {
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building pycaffe from brocolli-caffe==$SDIST_VERSION in $work (about 5 minutes on 2 cores)"
  local src shim pyinc npinc
  src=$(fetch_source "$work")
  shim=$(make_shim "$work" "/usr/lib/x86_64-linux-gnu/libboost_python$(pyver "$PY" | tr -d .).so")
  pyinc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  npinc=$("$PY" -c 'import numpy; print(numpy.get_include())')
  mkdir -p "$src/build"
  (cd "$src/build" && cmake .. -DCPU_ONLY=ON -DBLAS=Open -DBUILD_python=ON -DBUILD_docs=OFF \
      -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=OFF -DUSE_HDF5=OFF \
      -DANACONDA_HOME="$shim" -DPYTHON_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_FLAGS="-I$pyinc -I$npinc -I/usr/include/hdf5/serial -std=c++14 -DWITH_PYTHON_LAYER" \
      >"$work/cmake.log" 2>&1) \
    || { tail -40 "$work/cmake.log" >&2; log "cmake failed"; exit 1; }
  make_with_progress "$src/build" pycaffe "$work/make.log" \
    || { tail -60 "$work/make.log" >&2; log "make failed"; exit 1; }
  local stage="$CACHE.tmp"; rm -rf "$stage"; mkdir -p "$stage"
  record_build_debs "$src/build" "$stage/build-debs.txt"
  cp -r "$src/python/caffe" "$stage/caffe"
  rm -rf "$stage/caffe/test" "$stage/caffe/_caffe.cpp"
  rm -f "$stage/caffe/_caffe.so"
  cp "$(readlink -f "$src/build/lib/_caffe.so")" "$stage/caffe/_caffe.so"
  rm -rf "$CACHE"; mv "$stage" "$CACHE"
  log "cached build at $CACHE ($(du -sh "$CACHE" | cut -f1))"
}

build_cuda() {
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building Caffe with CUDA $CUDA_VERSION (sm $ARCH, PTX $PTX) from brocolli-caffe==$SDIST_VERSION in $work" \
      "(about 15 minutes on 2 cores)"
  local src shim start=$SECONDS
  src=$(fetch_source "$work")
  shim=$(make_shim "$work" /nonexistent)  # libcaffe links no Python; the bindings come after
  mkdir -p "$src/build"
  (cd "$src/build" && cmake .. -DCPU_ONLY=OFF -DUSE_CUDNN=OFF -DUSE_NCCL=OFF -DBUILD_python=ON -DBUILD_docs=OFF \
      -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=OFF -DUSE_HDF5=OFF \
      -DANACONDA_HOME="$shim" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_FLAGS="-I/usr/include/hdf5/serial -std=c++14" \
      -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCUDA_USE_STATIC_CUDA_RUNTIME=OFF \
      -DCUDA_ARCH_NAME=Manual -DCUDA_ARCH_BIN="$ARCH" -DCUDA_ARCH_PTX="$PTX" \
      -DCUDA_NVCC_FLAGS="-std=c++17;-O3;-Xcompiler;-O2" \
      -DCMAKE_SHARED_LINKER_FLAGS="-Wl,--as-needed -Wl,--no-undefined" >"$work/cmake.log" 2>&1) \
    || { tail -40 "$work/cmake.log" >&2; log "cmake failed"; exit 1; }
  grep -q "CUDA detected: $CUDA_VERSION" "$work/cmake.log" \
    || { tail -40 "$work/cmake.log" >&2; log "cmake did not take the CUDA toolkit at $CUDA_ROOT"; exit 1; }
  make_with_progress "$src/build" caffe "$work/make.log" \
    || { grep -B3 -A12 -m3 'error' "$work/make.log" >&2 || tail -60 "$work/make.log" >&2
         log "make failed; the build folder is kept for a look: $work (log: $work/make.log)"; exit 1; }
  local stage="$CACHE.tmp"; rm -rf "$stage"; mkdir -p "$stage/lib" "$stage/include" "$stage/python"
  record_build_debs "$src/build" "$stage/build-debs.txt"
  cp -a "$src/build/lib/"libcaffe.so* "$stage/lib/"
  # What a binding for another Python needs later: the headers (the generated ones first) and
  # pycaffe's sources.
  cp -r "$src/include/caffe" "$stage/include/caffe"
  cp -r "$src/build/include/caffe/proto/." "$stage/include/caffe/proto/"
  rm -f "$stage/include/caffe/proto/"*.cc
  cp "$src/build/caffe_config.h" "$stage/include/" 2>/dev/null || true
  cp -r "$src/python/caffe" "$stage/python/caffe"
  rm -rf "$stage/python/caffe/test" "$stage/python/caffe/_caffe.so"
  mkdir -p "$stage/python/caffe/proto"
  touch "$stage/python/caffe/proto/__init__.py"
  cp "$src/build/include/caffe/proto/caffe_pb2.py" "$stage/python/caffe/proto/"
  { echo "sdist: brocolli-caffe==$SDIST_VERSION"; echo "cuda: $CUDA_VERSION ($CUDA_ROOT)"
    echo "arch: sm $ARCH, ptx $PTX"; echo "key: $KEY (build_key.py --cuda)"
    echo "built: $(date -u +%FT%TZ) in $((SECONDS - start)) s"; } > "$stage/BUILD_INFO"
  rm -rf "$CACHE"; mv "$stage" "$CACHE"
  log "cached build at $CACHE ($(du -sh "$CACHE" | cut -f1), $((SECONDS - start)) s)"
}

bind_python() {  # PY: compile pycaffe's _caffe.cpp for PY against the cached libcaffe -> $CACHE/pyX.Y/caffe
  local py=$1 ver tag out pyinc npinc bp bpdir
  ver=$(pyver "$py"); tag=${ver/./}
  out="$CACHE/py$ver"
  if [ -f "$out/caffe/_caffe.so" ]; then return 0; fi
  bp=/usr/lib/x86_64-linux-gnu/libboost_python$tag.so
  [ -e "$bp" ] || bp=$(bash "$HERE/boost_python.sh" "$py")
  bpdir=$(dirname "$bp")
  pyinc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  npinc=$("$py" -c 'import numpy; print(numpy.get_include())')
  log "binding pycaffe for Python $ver (numpy $("$py" -c 'import numpy; print(numpy.__version__)'))"
  local stage="$out.tmp"; rm -rf "$stage"; mkdir -p "$stage"
  cp -r "$CACHE/python/caffe" "$stage/caffe"
  rm -f "$stage/caffe/_caffe.cpp"
  nice -n "${CAFFE_BUILD_NICE:-0}" g++ -shared -fPIC -O2 -std=c++14 -DNDEBUG -DCAFFE_VERSION=1.0.0 \
      -I"$CACHE/include" -I"$CUDA_ROOT/include" -I/usr/include/hdf5/serial -I"$pyinc" -I"$npinc" \
      "$CACHE/python/caffe/_caffe.cpp" -o "$stage/caffe/_caffe.so" \
      -L"$CACHE/lib" -lcaffe -L"$bpdir" -l:"$(basename "$bp")" -lglog -lgflags -lprotobuf -lboost_system \
      -L"$CUDA_ROOT/lib" -lcudart -Wl,-rpath,'$ORIGIN' \
    || { log "compiling the pycaffe binding for Python $ver failed"; exit 1; }
  cp -a "$CACHE/lib/"libcaffe.so* "$stage/caffe/"
  # A Boost.Python that is not the system's travels inside the package (found through $ORIGIN).
  case "$bp" in /usr/lib/*) ;; *) cp "$(readlink -f "$bp")" "$stage/caffe/$(basename "$bp")" ;; esac
  rm -rf "$out"; mv "$stage" "$out"
}

bash "$SYSTEM/setup_system.sh"   # the build's Debian packages (and the runtime libraries when cached)
if [ -z "$CUDA_ROOT" ]; then
  [ ${#PYTHONS[@]} -eq 1 ] || { log "a CPU build takes one --python"; exit 2; }
  if [ ! -f "$CACHE/caffe/_caffe.so" ] || [ ! -f "$CACHE/build-debs.txt" ]; then build_cpu; fi
else
  if [ ! -f "$CACHE/lib/libcaffe.so.1.0.0" ] || [ ! -f "$CACHE/build-debs.txt" ]; then build_cuda; fi
  for p in "${PYTHONS[@]}"; do bind_python "$p"; done
fi
bash "$SYSTEM/check_build_debs.sh" "$CACHE/build-debs.txt"
echo "$CACHE"
