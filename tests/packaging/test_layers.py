"""The package layers hold (pyproject.toml, [tool.importlinter]; `make test` runs the same check
first): caffeserve > caffe_local > caffe_operator | caffe_gateway > inference_server > caffe_http,
no import upward, none between the operator and the gateway; and inside inference_server, commands >
grpc > serving (the request path) > loading (model loading)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from caffe_testing import REPO


def test_no_package_imports_one_above_it_or_beside_it():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout
