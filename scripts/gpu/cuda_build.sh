#!/usr/bin/env bash
# `make cuda-build`: Caffe with CUDA, compiled and linked on this machine (no GPU needed) with
# CUDA's compiler and libraries from PyPI (scripts/gpu/cuda-wheels.txt), by scripts/caffe/build_caffe.sh,
# the build the CPU pycaffe and the GPU image use too. Both the toolkit and the build are cached
# in CAFFE_SERVING_CACHE (default ~/.cache/caffe-serving); a second run takes seconds.
#
# Leaves .caffe-cuda/ in the repo (ignored by git): `build` -> the cached build (libcaffe and a
# pycaffe package per Python under pyX.Y/), `cuda` -> the toolkit (its lib/ holds libcudart,
# libcublas, libcurand), and `env`: `. .caffe-cuda/env` puts the CUDA pycaffe for the first
# --python first on PYTHONPATH and the CUDA libraries on the loader path. Loading it needs no GPU; Caffe's CPU mode runs, GPU mode needs a GPU.
#
# usage: scripts/gpu/cuda_build.sh [--python PY]...   (default: .venv/bin/python)
#   CAFFE_CUDA_ARCH (default "90") and CAFFE_CUDA_PTX (default "90"): the GPU architectures
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE_ROOT=${CAFFE_SERVING_CACHE:-$HOME/.cache/caffe-serving}
log() { echo "[cuda_build] $*" >&2; }

PYTHONS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHONS+=(--python "$2"); shift 2 ;;
    *) echo "usage: cuda_build.sh [--python PY]..." >&2; exit 2 ;;
  esac
done
[ ${#PYTHONS[@]} -gt 0 ] || PYTHONS=(--python "$REPO/.venv/bin/python")

# The toolkit: the pinned wheels, unpacked with pip --target into one folder of the cache.
WHEELS="$HERE/cuda-wheels.txt"
TOOLKIT="$CACHE_ROOT/cuda-toolkit-$(sed 's/#.*//' "$WHEELS" | awk 'NF' | sha256sum | cut -c1-12)"
CUDA_ROOT="$TOOLKIT/nvidia/cu13"
if [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
  log "installing CUDA's compiler and libraries from PyPI into $TOOLKIT (about 1 GB)"
  rm -rf "$TOOLKIT.tmp"
  python3 -m pip install -q --disable-pip-version-check --no-deps --no-compile --only-binary=:all: \
      --target "$TOOLKIT.tmp" -r "$WHEELS"
  # The wheels ship only versioned libraries; a link needs the plain names.
  for l in cudart cublas cublasLt curand; do
    so=$(cd "$TOOLKIT.tmp/nvidia/cu13/lib" && ls "lib$l.so."* | head -1)
    ln -sf "$so" "$TOOLKIT.tmp/nvidia/cu13/lib/lib$l.so"
  done
  rm -rf "$TOOLKIT"; mv "$TOOLKIT.tmp" "$TOOLKIT"
fi
"$CUDA_ROOT/bin/nvcc" --version | tail -2 >&2

start=$SECONDS
BUILD=$(bash "$HERE/../caffe/build_caffe.sh" --cuda "$CUDA_ROOT" --arch "${CAFFE_CUDA_ARCH:-90}" --ptx "${CAFFE_CUDA_PTX:-90}" \
        "${PYTHONS[@]}" | tail -1)

mkdir -p "$REPO/.caffe-cuda"
ln -sfn "$BUILD" "$REPO/.caffe-cuda/build"
ln -sfn "$CUDA_ROOT" "$REPO/.caffe-cuda/cuda"
PYV=$("${PYTHONS[1]}" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
cat > "$REPO/.caffe-cuda/env" <<EOF
# . .caffe-cuda/env: the CUDA pycaffe for Python $PYV first on PYTHONPATH, CUDA's libraries on the
# loader path (written by scripts/gpu/cuda_build.sh)
export PYTHONPATH="$BUILD/py$PYV\${PYTHONPATH:+:\$PYTHONPATH}"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
log "CUDA Caffe: $BUILD ($(du -sh "$BUILD/lib" | cut -f1) libcaffe; $((SECONDS - start)) s)"
ls -d "$BUILD"/py[0-9]*/caffe >&2
echo "$BUILD"
