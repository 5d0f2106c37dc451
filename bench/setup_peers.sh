#!/usr/bin/env bash
# Create the peer servers' venvs for bench/compare.py: KServe's ModelServer and MLServer, each in
# its own venv outside the repo so their dependencies never mix with ours. Each venv gets what
# `import caffe` needs (numpy<2, six, protobuf, scikit-image, scipy); pycaffe itself comes from the
# cached build on PYTHONPATH (compare.py sets it). Idempotent: a venv already set up is left alone.
#
# usage: bench/setup_peers.sh            (venvs under $BENCH_VENVS, default ~/.cache/caffe-serving/bench-venvs)
set -euo pipefail

PYTHON=${PYTHON:-python3.11}
ROOT=${BENCH_VENVS:-$HOME/.cache/caffe-serving/bench-venvs}
KSERVE_VERSION=0.21.0
MLSERVER_VERSION=1.7.1
CAFFE_DEPS=("numpy<2" six protobuf scikit-image scipy)

log() { echo "[setup_peers] $*" >&2; }

setup_venv() {
  local name=$1; shift
  local venv="$ROOT/$name" stamp="$ROOT/$name/.setup-done-$*"
  stamp=${stamp//[^A-Za-z0-9_.\/=-]/_}
  if [ -f "$stamp" ]; then
    log "$name: ready ($venv)"
    return
  fi
  log "$name: creating $venv with $*"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$@" "${CAFFE_DEPS[@]}"
  touch "$stamp"
  log "$name: installed $("$venv/bin/python" -m pip show "${1%%[=<>]*}" | sed -n 's/^Version: //p')"
}

mkdir -p "$ROOT"
setup_venv kserve "kserve==$KSERVE_VERSION"
# uvloop 0.22 broke MLServer 1.7.1's parallel inference workers ("There is no current event loop",
# SeldonIO/MLServer#2286, unreleased fix): keep the uvloop it was released with.
setup_venv mlserver "mlserver==$MLSERVER_VERSION" "uvloop<0.22"
echo "$ROOT"
