"""The one forward pass both peers run: the same work per request as our server's pycaffe backend.

Imported by kserve_model.py (its own folder is on sys.path) and mlserver_runtime.py (servers.py
puts this folder on MLServer's PYTHONPATH); it needs only numpy.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def forward(net, inputs: Iterable[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Copy each input into its blob (reshaping the net when a shape changes), run one forward pass."""
    for name, x in inputs:
        x = x.astype(np.float32, copy=False)
        blob = net.blobs[name]
        if blob.data.shape != x.shape:
            blob.reshape(*x.shape)
            net.reshape()
        blob.data[...] = x
    return net.forward()
