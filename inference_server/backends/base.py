"""The backend interface every engine implements.

A backend instance is created and used by exactly one worker thread (Caffe's mode and device
are per thread), so implementations need no locking. Arrays in and out are float32 numpy
arrays in the net's own layout (N, C, H, W...), keyed by blob name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class BlobInfo:
    name: str
    shape: tuple[int, ...]  # including the batch dimension as the net declares it


@dataclass
class NetDescription:
    inputs: list[BlobInfo]
    outputs: list[BlobInfo]
    layer_types: list[str] = field(default_factory=list)
    # what the backend wants clients/metadata to know (chosen backend, reason, parity...)
    parameters: dict[str, object] = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def describe(self) -> NetDescription:
        """Inputs, outputs and layer types of the loaded net."""

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run one forward pass on a batch; returns the requested output blobs (owned copies)."""
