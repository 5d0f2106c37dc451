#!/usr/bin/env bash
# `make gpu-bundle`: everything a lent GPU machine lacks to run the CUDA pycaffe and our server, in
# .gpu-bundle/ (ignored by git; carried by the device tool, at most 64 MiB with the working tree),
# for scripts/gpu/gpu_check.sh. The lent machine (its README: KINDS.md) runs Ubuntu 24.04's Python 3.12
# with numpy 2, PyTorch's CUDA 13 libraries (libcudart, libcublas, libcurand) and no Boost, glog,
# gflags or protobuf; nothing can be fetched there. So the bundle holds, xz-compressed:
#   caffe/   pycaffe for Python 3.12, built against numpy 2 headers (works with numpy 2.x), with
#            the CUDA libcaffe (sm_90 + PTX) and Boost.Python for 3.12 beside _caffe.so
#   lib/     the shared libraries Caffe needs that are not glibc, libstdc++ or CUDA's, copied from
#            this machine (Boost, glog, gflags, protobuf, HDF5, OpenBLAS and what they link)
#   wheels/  cp312 wheels of what the server and the check's gRPC client need that the lent machine
#            lacks, computed from pyproject.toml by scripts/gpu/gpu_wheels.py (its dependencies' closure
#            for Python 3.12, at the versions our venv runs, less scripts/gpu/lent-gpu-packages.txt)
#   refs/    the CPU build's answers on the digits net, for the GPU build to be compared against
# Python 3.12 here: $PYTHON312, else python3.12 on PATH, else pyenv's (Debian 12 has only 3.11;
# PyPI has no CPython interpreters to install). Its venv (numpy 2, scipy, scikit-image, like the
# lent machine's) lives in the build cache; the rehearsal runs in it.
#
# usage: scripts/gpu/gpu_bundle.sh      (calls scripts/gpu/cuda_build.sh for Python 3.12; cached after the first time)
#   PROJECT_PY: the project venv's Python (default .venv/bin/python); PYTHON312: see above
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE_ROOT=${CAFFE_SERVING_CACHE:-$HOME/.cache/caffe-serving}
PROJECT_PY=${PROJECT_PY:-$REPO/.venv/bin/python}
OUTDIR="$REPO/.gpu-bundle"
LIMIT_MIB=64
log() { echo "[gpu_bundle] $*" >&2; }

find_python312() {
  local c
  for c in "${PYTHON312:-}" python3.12 /usr/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  log "no Python 3.12 here: set PYTHON312. The lent GPU machine's Python is 3.12, and pycaffe's extension"
  log "must be compiled against its headers; Debian 12 ships only 3.11 and PyPI has no interpreter to install."
  return 1
}

# The lent machine's packages that the server, pycaffe and the check reach (scripts/gpu/gpu_wheels.py lent):
# the rehearsal's venv has those and no more, at the lent machine's version where KINDS.md gives one.
LENT_REQUIREMENTS=$("$PROJECT_PY" "$HERE/gpu_wheels.py" lent | tr '\n' ' ')
PY312=$(find_python312)
VENV="$CACHE_ROOT/venv-py3.12-lent-$(echo "$LENT_REQUIREMENTS" | sha256sum | cut -c1-8)"
if [ ! -f "$VENV/.done" ]; then
  log "making a Python 3.12 venv like the lent machine's at $VENV"
  rm -rf "$VENV"; "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $LENT_REQUIREMENTS
  touch "$VENV/.done"
fi

if [ -n "${GPU_BUNDLE_BUILD:-}" ]; then   # an existing CUDA build folder with py3.12/ (skips cuda_build.sh)
  BUILD=$GPU_BUNDLE_BUILD
else
  BUILD=$(bash "$HERE/cuda_build.sh" --python "$PROJECT_PY" --python "$VENV/bin/python" | tail -1)
fi
CUDA_LIB=$(readlink -f "$REPO/.caffe-cuda/cuda")/lib
ln -sfn "$VENV" "$REPO/.caffe-cuda/py312-venv"   # the rehearsal's Python (make gpu-rehearsal)

STAGE=$(mktemp -d); trap 'rm -rf "$STAGE"' EXIT
cp -r "$BUILD/py3.12/caffe" "$STAGE/caffe"
"$VENV/bin/python" "$HERE/../caffe/apply_patches.py" installed "$STAGE/caffe" >&2

# Runtime libraries: what _caffe.so and libcaffe link, less glibc, the C++ runtime and CUDA's.
mkdir -p "$STAGE/lib"
LD_LIBRARY_PATH="$STAGE/caffe:$CUDA_LIB" ldd "$STAGE/caffe/_caffe.so" "$STAGE/caffe/libcaffe.so.1.0.0" \
  | awk '/=> \// {print $1, $3}' | sort -u | while read -r name path; do
    case "$name" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libresolv.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) continue ;;
      libcudart.so*|libcublas.so*|libcublasLt.so*|libcurand.so*) continue ;;   # the machine's CUDA 13
      libcaffe.so*|libboost_python3*) continue ;;                              # in caffe/ already
    esac
    cp -L "$path" "$STAGE/lib/$name"
  done
strip --strip-unneeded "$STAGE"/lib/*.so* "$STAGE"/caffe/*.so* 2>/dev/null || true

# Wheels: what the lent machine lacks, from pyproject (scripts/gpu/gpu_wheels.py), at the versions our venv runs.
mkdir -p "$STAGE/wheels"
pins=$("$PROJECT_PY" "$HERE/gpu_wheels.py" pins)
log "wheels: $(echo $pins)"
"$PROJECT_PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$STAGE/wheels" $pins >&2

# The CPU build's answers on digits (the project venv's pycaffe), for the GPU build to match.
mkdir -p "$STAGE/refs"
"$PROJECT_PY" - "$STAGE/refs/digits.npz" "$REPO/examples/digits" <<'EOF'
import sys
import numpy as np
import caffe
out, digits = sys.argv[1], sys.argv[2]
caffe.set_mode_cpu()
net = caffe.Net(f"{digits}/deploy.prototxt", caffe.TEST, weights=f"{digits}/digits.caffemodel")
x = (np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32) * 16).astype(np.float32)
net.blobs["data"].reshape(*x.shape); net.reshape(); net.blobs["data"].data[...] = x; net.forward()
names = list(net.blobs.keys())
np.savez(out, input=x, **{n: net.blobs[n].data.copy() for n in names[-2:]})
EOF

# Self-contained: with only the bundle and CUDA's libraries on the loader path, nothing else resolves
# outside glibc and the C++ runtime.
outside=$(LD_LIBRARY_PATH="$STAGE/caffe:$STAGE/lib:$CUDA_LIB" ldd "$STAGE/caffe/_caffe.so" "$STAGE/caffe/libcaffe.so.1.0.0" "$STAGE"/lib/*.so* \
  | awk '/=> \// {print $3}' | grep -v -e "^$STAGE" -e "^$CUDA_LIB" \
  | grep -v -E '/(libc|libm|libpthread|libdl|librt|libresolv|libstdc\+\+|libgcc_s)\.so' | sort -u || true)
[ -z "$outside" ] || { log "the bundle misses libraries: $outside"; exit 1; }

{ echo "caffe-serving GPU bundle, made $(date -u +%FT%TZ) by scripts/gpu/gpu_bundle.sh"
  echo "pycaffe: Python 3.12, numpy $("$VENV/bin/python" -c 'import numpy; print(numpy.__version__)') headers, $(basename "$BUILD")"
  sed 's/^/build: /' "$BUILD/BUILD_INFO"
  echo "libraries: $(ls "$STAGE/lib" | tr '\n' ' ')"
  echo "wheels: $(ls "$STAGE/wheels" | tr '\n' ' ')"
  echo "sizes (uncompressed): $(du -sh "$STAGE/caffe" | cut -f1) caffe, $(du -sh "$STAGE/lib" | cut -f1) lib, $(du -sh "$STAGE/wheels" | cut -f1) wheels"
} > "$STAGE/MANIFEST.txt"

rm -rf "$OUTDIR"; mkdir -p "$OUTDIR"
(cd "$STAGE" && tar cf - MANIFEST.txt caffe lib wheels refs | xz -T0 -6 > "$OUTDIR/caffe-gpu-bundle.tar.xz")
cp "$STAGE/MANIFEST.txt" "$OUTDIR/MANIFEST.txt"
bundle=$(( $(du -sb "$OUTDIR" | cut -f1) / 1048576 + 1 ))
tree=$(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print int(s / 1048576) + 1}')
echo "bundle: $(du -sh "$OUTDIR/caffe-gpu-bundle.tar.xz" | cut -f1) compressed; with the working tree (${tree} MiB) $((bundle + tree)) MiB travels" >> "$OUTDIR/MANIFEST.txt"
cat "$OUTDIR/MANIFEST.txt" >&2
if (( bundle + tree > LIMIT_MIB )); then
  log "the bundle and the working tree come to $((bundle + tree)) MiB: more than the $LIMIT_MIB MiB a device call carries"
  exit 1
fi
echo "$OUTDIR"
