"""Settings for every test process and every server it starts."""

from __future__ import annotations

import os

# `backend: auto` publishes converted graphs to the model's own folder by default (onnxCache.modelFolder):
# tests serve the checked-in examples, and one test's verdict must not be found by the next run's "empty
# cache". Tests of that behaviour turn it back on for their own servers.
os.environ.setdefault("CAFFESERVE__ONNX_CACHE__MODEL_FOLDER", "false")
