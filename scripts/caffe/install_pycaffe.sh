#!/usr/bin/env bash
# Install real pycaffe (BVLC Caffe at 9b89154 from the PyPI sdist brocolli-caffe) into a venv: the
# CPU build (every setup), or with --cuda the CUDA build (Dockerfile.caffe-gpu). Both are built by
# scripts/caffe/build_caffe.sh, the one Caffe build, which caches them outside the repo
# (CAFFE_SERVING_CACHE, default ~/.cache/caffe-serving), so only the first setup on a machine pays
# the compiling, and checks, cached or not, that every Debian package whose headers the build read
# is in scripts/system/debian-packages.txt. The installed package gets its install-time patches
# (apply_patches.py installed) on every run: they are cheap and need no rebuild.
#
# usage: scripts/caffe/install_pycaffe.sh VENV_DIR [--cuda CUDA_ROOT [--arch "90"] [--ptx "90"]]
set -euo pipefail

VENV=${1:?usage: install_pycaffe.sh VENV_DIR [--cuda CUDA_ROOT [--arch A] [--ptx P]]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
PY="$VENV/bin/python"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
log() { echo "[install_pycaffe] $*" >&2; }

"$PY" -m pip install -q 'numpy<2'   # the build compiles against its headers
CACHE=$(bash "$HERE/build_caffe.sh" "$@" --python "$PY" | tail -1)
PACKAGE="$CACHE/caffe"   # CPU: one package; CUDA: one per Python, beside the shared libcaffe
[ $# -eq 0 ] || PACKAGE="$CACHE/py$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/caffe"
BUILD_ID=$(basename "$CACHE")
if [ "$(cat "$SITE/caffe/BUILD_ID" 2>/dev/null)" = "$BUILD_ID" ] && "$PY" -c 'import caffe._caffe' 2>/dev/null; then
  "$PY" "$HERE/apply_patches.py" installed "$SITE/caffe" >&2
  log "pycaffe $BUILD_ID already installed in $VENV"
  exit 0
fi
"$PY" -m pip install -q 'numpy<2' six 'protobuf>=3.20' scikit-image scipy
rm -rf "$SITE/caffe"
cp -r "$PACKAGE" "$SITE/caffe"
"$PY" "$HERE/apply_patches.py" installed "$SITE/caffe"
echo "$BUILD_ID" > "$SITE/caffe/BUILD_ID"
"$PY" -c 'import caffe; caffe.set_mode_cpu(); print("[install_pycaffe] pycaffe OK:", caffe.__file__)'
