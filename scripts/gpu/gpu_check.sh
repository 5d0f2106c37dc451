#!/usr/bin/env bash
# The one prepared check on a lent GPU machine (one device call, about 5 minutes at most): unpack the GPU
# bundle that `make gpu-bundle` wrote (.gpu-bundle/, carried), install its wheels beside the machine's
# Python, put its libraries (those the machine lacks) and the machine's CUDA 13 libraries on the loader
# path, and run scripts/gpu/gpu_check.py, which writes $OUT/gpu_check.json after every step, $OUT/steps.log
# and $OUT/servers.log, and prints a short summary last. Without a visible GPU (the rehearsal here) the
# GPU parts print SKIP or are rehearsed on the CPU. docs/gpu.md says how to call it.
#
# usage: scripts/gpu/gpu_check.sh [BUNDLE_DIR]      (default: .gpu-bundle)
#   PYTHON             the Python 3.12 to run (default: /opt/torch/.venv/bin/python3 where it exists, else python3)
#   OUT                where the figures go (default: $OUT, else ./gpu-check-out)
#   SCRATCH            where the bundle is unpacked (default: a new temporary folder, removed at the end)
#   CUDA_LIB_DIRS      folders holding libcudart.so.13, libcublas.so.13, libcurand.so.10 (default: searched)
#   GPU_CHECK_BUDGET_S the whole check's time, unpacking included (default 300); every external call has a timeout
#   GPU_CHECK_KEEP_LIBS=1  use every carried library, also those the machine has (default 0: the machine's)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUNDLE=$(cd "${1:-$REPO/.gpu-bundle}" 2>/dev/null && pwd) || { echo "[gpu_check] no bundle: run make gpu-bundle" >&2; exit 2; }
OUT=${OUT:-$REPO/gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET_S:-300}
mkdir -p "$OUT"
if [ -z "${SCRATCH:-}" ]; then SCRATCH=$(mktemp -d /tmp/caffe-gpu.XXXXXX); trap 'rm -rf "$SCRATCH"' EXIT; fi
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3; [ -x /opt/torch/.venv/bin/python3 ] && PYTHON=/opt/torch/.venv/bin/python3
fi
log() { echo "[gpu_check] $*"; }
start=$SECONDS

log "unpacking $BUNDLE into $SCRATCH"
timeout 90 tar xJf "$BUNDLE/caffe-gpu-bundle.tar.xz" -C "$SCRATCH" || { log "unpacking failed"; exit 1; }
sed -n '1,6p' "$SCRATCH/MANIFEST.txt"

# Carried system libraries the machine has itself: use the machine's (newer on Ubuntu 24.04), except
# those Caffe was built against (Boost, glog, gflags, protobuf, HDF5, OpenBLAS), always carried.
if [ "${GPU_CHECK_KEEP_LIBS:-0}" != 1 ]; then
  have=$(timeout 20 ldconfig -p 2>/dev/null | awk '{print $1}')
  for f in "$SCRATCH"/lib/*; do
    n=$(basename "$f")
    case "$n" in libboost_*|libglog*|libgflags*|libprotobuf*|libhdf5*|libopenblas*|libgfortran*|libquadmath*) continue ;; esac
    if grep -qxF "$n" <<<"$have"; then rm -f "$f"; fi
  done
fi
log "carried libraries in use: $(ls "$SCRATCH/lib" | tr '\n' ' ')"

timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SCRATCH/site" "$SCRATCH"/wheels/*.whl || { log "installing the carried wheels failed"; exit 1; }

if [ -z "${CUDA_LIB_DIRS:-}" ]; then
  roots="$(timeout 20 "$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/nvidia /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib"
  CUDA_LIB_DIRS=$(for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
      timeout 30 find $roots -name "$lib" 2>/dev/null | head -1; done | xargs -r -n1 dirname | awk '!seen[$0]++' | paste -sd: -)
fi
[ -n "$CUDA_LIB_DIRS" ] || log "no CUDA 13 libraries found (libcudart.so.13, libcublas.so.13, libcurand.so.10): pycaffe cannot load"
log "CUDA libraries from: $CUDA_LIB_DIRS"
export LD_LIBRARY_PATH="$SCRATCH/caffe:$SCRATCH/lib:$CUDA_LIB_DIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$SCRATCH/site:$SCRATCH:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 GLOG_minloglevel=${GLOG_minloglevel:-2} GPU_CHECK_WORK=$SCRATCH

if command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi -L; then
  timeout 15 nvidia-smi --query-gpu=driver_version,memory.total,memory.used --format=csv,noheader
else
  log "no GPU listed (nvidia-smi): the GPU parts will print SKIP or be rehearsed on the CPU"
fi
missing=$(timeout 30 ldd "$SCRATCH/caffe/_caffe.so" | grep "not found")
[ -z "$missing" ] || { log "unresolved libraries:"; echo "$missing"; exit 1; }

# The check gets what is left of the budget; `timeout` stops it (SIGTERM: it stops its step, writes its
# figures and its summary) 20 s after its budget, and kills it 15 s later. A SIGTERM to this script is
# passed on the same way.
left=$((BUDGET - (SECONDS - start) - 10))
(( left > 30 )) || left=30
cd "$REPO"
timeout -k 15 $((left + 20)) "$PYTHON" "$REPO/scripts/gpu/gpu_check.py" --out "$OUT" --refs "$SCRATCH/refs" --budget-s "$left" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM INT
wait $pid; rc=$?
while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done   # a trapped signal ends `wait` early
log "finished in $((SECONDS - start)) s of a ${BUDGET} s budget (rc $rc); figures in $OUT/gpu_check.json"
exit $rc
