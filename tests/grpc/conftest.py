"""Fixtures shared by the gRPC tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tmp_model_dir(tmp_path_factory, request) -> Path:
    """One folder per test module for the nets, weights and server configs it writes."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
