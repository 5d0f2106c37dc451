# `make test` and `make demo` each set up everything they need on a fresh machine (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3.11
STAMP  := $(VENV)/.setup-done

.PHONY: setup kube test demo bench bench-compare clean crd cuda-build gpu-bundle gpu-rehearsal

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the Caffe build and the system packages: every file in their folders
SETUP_INPUTS := $(filter-out %/__pycache__,$(wildcard scripts/caffe/* scripts/caffe/caffe_forks/* scripts/system/*))

$(STAMP): $(PY) pyproject.toml $(SETUP_INPUTS)
	bash scripts/system/setup_system.sh
	bash scripts/caffe/install_pycaffe.sh $(VENV)
	$(PY) -m pip install -q -e '.[operator,onnx,demo,bench,s3,tracing,test]'
	$(PY) -m pip install -q --ignore-requires-python helm-sdkpy
	$(PY) -c "import caffe, caffeserve, caffe_local, caffe_operator, caffe_gateway, inference_server, caffe_http"
	touch $(STAMP)

# checkov (Kubernetes manifest scanner) in a venv of its own: its pins are not ours.
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install -q 'checkov==3.3.30'

# OpenCV 5 (tests/cli/test_export.py runs exported ONNX files with cv2.dnn) in a venv of its own: its wheels
# need numpy 2, pycaffe's build numpy 1.
OPENCV := .venv-opencv/bin/python
$(OPENCV):
	$(PYTHON) -m venv .venv-opencv
	.venv-opencv/bin/python -m pip install -q 'opencv-python-headless==5.1.0.95'

# The tests' Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler, etcd),
# built from Kubernetes' Go modules once per machine (~20 min on 2 cores), then answered from its cache.
kube:
	bash scripts/kube/build.sh >/dev/null

setup: $(STAMP) $(CHECKOV) $(OPENCV) kube

# the gates first (pyproject.toml: import layers [tool.importlinter], lint [tool.ruff], types [tool.mypy]),
# then every test
test: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -ra

demo: setup
	$(VENV)/bin/caffeserve demo examples/digits/service.yaml

crd: setup
	$(VENV)/bin/caffeserve crd > crds/caffemodelservices.yaml
	cp crds/caffemodelservices.yaml charts/caffe-serving/crds/caffemodelservices.yaml
	$(VENV)/bin/caffeserve crd --kind CaffeServingPool > crds/caffeservingpools.yaml
	cp crds/caffeservingpools.yaml charts/caffe-serving/crds/caffeservingpools.yaml

bench: setup
	$(PY) bench/server_overhead.py
	$(PY) bench/instances.py
	$(PY) bench/gateway.py
	$(PY) bench/backends.py

# ours vs KServe ModelServer and MLServer, each in its own venv (made by bench/setup_peers.sh)
bench-compare: setup
	bash bench/setup_peers.sh
	$(PY) bench/compare.py --no-setup

# Caffe with CUDA 13 (sm_90), compiled here from PyPI's CUDA wheels; no GPU needed (not part of `make test`).
cuda-build: setup
	bash scripts/gpu/cuda_build.sh --python $(PY)

# .gpu-bundle/: what a lent GPU machine lacks (pycaffe for its Python 3.12, libraries, wheels), for
# scripts/gpu/gpu_check.sh there; `make gpu-rehearsal` runs that check here, pruning the carried libraries
# as the lent machine does (its GPU parts SKIP or are rehearsed on the CPU), then records what it
# rehearsed in scripts/gpu/gpu-rehearsal.json (tests/packaging/test_gpu_wheels.py holds it to today's inputs).
gpu-bundle: cuda-build
	PROJECT_PY=$(abspath $(PY)) bash scripts/gpu/gpu_bundle.sh

gpu-rehearsal: gpu-bundle
	PYTHON=.caffe-cuda/py312-venv/bin/python CUDA_LIB_DIRS=$$(readlink -f .caffe-cuda/cuda)/lib GPU_CHECK_KEEP_LIBS=0 \
	  GPU_CHECK_BUDGET_S=$${GPU_CHECK_BUDGET_S:-600} OUT=$${OUT:-/tmp/gpu-rehearsal} bash scripts/gpu/gpu_check.sh .gpu-bundle
	$(PY) scripts/gpu/gpu_wheels.py stamp $${OUT:-/tmp/gpu-rehearsal}

clean:
	rm -rf $(VENV)
