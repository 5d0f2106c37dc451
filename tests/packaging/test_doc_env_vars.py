"""Every environment variable of ours that the docs, comments, chart or scripts name is one the code reads.

Ours: names that start `CAFFESERVE_` or `CAFFE_SERVING_` (third-party ones such as AWS_* or
OPENBLAS_NUM_THREADS are read by their libraries). Named: anywhere in a checked-in text file outside
tests/ (tests set variables for the code, and some name missing ones on purpose). Read, found in the code
itself rather than by the name appearing somewhere, so that a stale comment does not count:
- Python: the name as a string literal that is a call's first argument (`os.environ.get("X")`,
  `os.getenv("X")`, `env.get("X")`, a helper like `_env_float("X", 1.0)`), a subscript (`environ["X"]`)
  or the left side of `in`;
- shell (scripts, Makefile): `$X` or `${X...}`;
- nested settings: `CAFFESERVE__A__B` is read by inference_server/config.py (`_env_overrides`, `_merge`):
  after the prefix, each `__`-separated part, lower-cased, names a field of `ServerConfig` (its snake_case
  name, or its camelCase alias), then a field of that field's model, and so on; a part below a plain
  dict is free. So `CAFFESERVE__LIMITS__MAX_REQUEST_BYTES` is `limits.max_request_bytes`.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import types
import typing

import pydantic
import pytest

from caffe_testing import REPO
from inference_server.config import ENV_PREFIX, ServerConfig

OURS = re.compile(r"\b(?:CAFFESERVE|CAFFE_SERVING)_[A-Z0-9_]*[A-Z0-9]\b")
SHELL_READ = re.compile(r"\$\{?((?:CAFFESERVE|CAFFE_SERVING)_[A-Z0-9_]*[A-Z0-9])\b")
TEXT = (".md", ".py", ".sh", ".yaml", ".yml", ".tpl", ".txt", ".toml", ".json")


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def is_text(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.endswith(TEXT) or name == "Makefile" or name.startswith("Dockerfile")


def python_reads(source: str) -> set[str]:
    """The names of ours this Python source reads (module docstring)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args:
            candidates = [node.args[0]]
        elif isinstance(node, ast.Subscript):
            candidates = [node.slice]
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In):
            candidates = [node.left]
        else:
            continue
        found |= {c.value for c in candidates if isinstance(c, ast.Constant) and isinstance(c.value, str)
                  and OURS.fullmatch(c.value)}
    return found


@functools.cache
def code_reads() -> frozenset[str]:
    reads = set()
    for path in tracked():
        if path.endswith(".py"):
            reads |= python_reads((REPO / path).read_text())
        elif path.endswith(".sh") or path.rsplit("/", 1)[-1] == "Makefile":
            reads |= set(SHELL_READ.findall((REPO / path).read_text()))
    return frozenset(reads)


def _models(annotation: object) -> list[type[pydantic.BaseModel]]:
    """The pydantic models an annotation allows (`Limits`, `Limits | None`, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models(a)]
    return []


def is_setting(name: str) -> bool:
    """Whether `CAFFESERVE__A__B...` names a field of the server config (module docstring)."""
    parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
    model: type[pydantic.BaseModel] | None = ServerConfig
    for part in parts:
        if model is None:
            return True  # below a plain dict (e.g. parameters): any key
        field = next((f for n, f in model.model_fields.items()
                      if part in (n, (f.alias or "").lower())), None)
        if field is None:
            return False
        models = _models(field.annotation)
        model = models[0] if models else None
    return bool(parts)


def unread(text: str, reads: frozenset[str]) -> set[str]:
    return {n for n in OURS.findall(text) if n not in reads and not (n.startswith(ENV_PREFIX) and is_setting(n))}


def test_every_variable_named_outside_the_tests_is_read_by_the_code():
    reads = code_reads()
    stale = {}
    for path in tracked():
        if path.startswith("tests/") or not is_text(path):
            continue
        names = unread((REPO / path).read_text(errors="replace"), reads)
        if names:
            stale[path] = sorted(names)
    assert not stale, f"named but read by no code (the code reads {sorted(reads)}): {stale}"


@pytest.mark.parametrize("name, read", [
    ("CAFFESERVE_NETWORK_POLICY_FROM", True),  # reconcile.OperatorConfig.from_env
    ("CAFFESERVE_NETWORK_POLICY", False),  # what reconcile.py's opening comment used to say
    ("CAFFE_SERVING_CACHE", True),  # scripts/caffe/build_caffe.sh
    ("CAFFESERVE__DEVICE__KIND", True),
    ("CAFFESERVE__LIMITS__MAX_REQUEST_BYTES", True),
    ("CAFFESERVE__LIMITS__MAXREQUESTBYTES", True),  # the camelCase alias, lower-cased
    ("CAFFESERVE__DEVICE__COLOUR", False),
    ("CAFFESERVE__NO_SUCH_SETTING", False),
])
def test_the_check_tells_read_from_unread(name, read):
    assert (not unread(f"set `{name}=1`", code_reads())) is read
