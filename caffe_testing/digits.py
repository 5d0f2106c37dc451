"""The digits example's data helpers (examples/digits/data.py), loaded by path under a unique name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DIGITS_DIR = Path(__file__).resolve().parent.parent / "examples" / "digits"
_spec = importlib.util.spec_from_file_location("digits_example_data", DIGITS_DIR / "data.py")
assert _spec is not None and _spec.loader is not None, DIGITS_DIR / "data.py"
digits_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits_data)
