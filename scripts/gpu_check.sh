#!/usr/bin/env bash
# The one prepared check on a lent GPU machine (one device call, under 8 minutes): unpack the GPU
# bundle that `make gpu-bundle` wrote (.gpu-bundle/, carried), install its wheels beside the
# machine's Python, put its libraries and the machine's CUDA 13 libraries on the loader path, and run
# scripts/gpu_check.py, which writes its figures to $OUT (gpu_check.json, servers.log) and prints a
# line per result. Without a visible GPU (the rehearsal here) the GPU steps print SKIP lines and
# the CPU parts run. docs/gpu.md says how to call it.
#
# usage: scripts/gpu_check.sh [BUNDLE_DIR]      (default: .gpu-bundle)
#   PYTHON         the Python 3.12 to run (default: /opt/torch/.venv/bin/python3 where it exists, else python3)
#   OUT            where the figures go (default: $OUT, else ./gpu-check-out)
#   SCRATCH        where the bundle is unpacked (default: a new temporary folder)
#   CUDA_LIB_DIRS  folders holding libcudart.so.13, libcublas.so.13, libcurand.so.10 (default: searched)
#   GPU_CHECK_KEEP_LIBS=1  use every carried library, also those the machine has (the rehearsal)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=$(cd "${1:-$REPO/.gpu-bundle}" && pwd) || { echo "[gpu_check] no bundle: run make gpu-bundle" >&2; exit 2; }
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
SCRATCH=${SCRATCH:-$(mktemp -d /tmp/caffe-gpu.XXXXXX)}
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3; [ -x /opt/torch/.venv/bin/python3 ] && PYTHON=/opt/torch/.venv/bin/python3
fi
log() { echo "[gpu_check] $*"; }
start=$SECONDS

log "unpacking $BUNDLE into $SCRATCH"
tar xJf "$BUNDLE/caffe-gpu-bundle.tar.xz" -C "$SCRATCH" || exit 1
cat "$SCRATCH/MANIFEST.txt" | sed -n '1,6p'

# Carried system libraries the machine has itself: use the machine's (newer on Ubuntu 24.04), except
# those Caffe was built against (Boost, glog, gflags, protobuf, HDF5, OpenBLAS), always carried.
if [ "${GPU_CHECK_KEEP_LIBS:-0}" != 1 ]; then
  for f in "$SCRATCH"/lib/*; do
    n=$(basename "$f")
    case "$n" in libboost_*|libglog*|libgflags*|libprotobuf*|libhdf5*|libopenblas*|libgfortran*|libquadmath*) continue ;; esac
    if ldconfig -p | awk '{print $1}' | grep -qxF "$n"; then rm -f "$f"; fi
  done
fi
log "carried libraries in use: $(ls "$SCRATCH/lib" | tr '\n' ' ')"

"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SCRATCH/site" "$SCRATCH"/wheels/*.whl || { log "installing the carried wheels failed"; exit 1; }

if [ -z "${CUDA_LIB_DIRS:-}" ]; then
  roots="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/nvidia /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib"
  CUDA_LIB_DIRS=$(for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
      find $roots -name "$lib" 2>/dev/null | head -1; done | xargs -r -n1 dirname | awk '!seen[$0]++' | paste -sd: -)
fi
[ -n "$CUDA_LIB_DIRS" ] || log "no CUDA 13 libraries found (libcudart.so.13, libcublas.so.13, libcurand.so.10): pycaffe cannot load"
log "CUDA libraries from: $CUDA_LIB_DIRS"
export LD_LIBRARY_PATH="$SCRATCH/caffe:$SCRATCH/lib:$CUDA_LIB_DIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$SCRATCH/site:$SCRATCH:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader
else
  log "no GPU visible (nvidia-smi): the GPU steps will print SKIP lines"
fi
missing=$(ldd "$SCRATCH/caffe/_caffe.so" | grep "not found")
[ -z "$missing" ] || { log "unresolved libraries:"; echo "$missing"; exit 1; }

cd "$REPO"
timeout "${GPU_CHECK_TIMEOUT_S:-420}" "$PYTHON" "$REPO/scripts/gpu_check.py" --out "$OUT" --refs "$SCRATCH/refs"
rc=$?
log "finished in $((SECONDS - start)) s (rc $rc); figures in $OUT/gpu_check.json"
exit $rc
