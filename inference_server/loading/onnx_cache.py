"""Where converted graphs and their verdicts are kept: this machine's cache, and one the next pod finds.

The local cache is CAFFESERVE_CACHE_DIR (default ~/.cache/caffe-serving/onnx; a temporary folder where it
cannot be written). The shared cache is `onnxCache.sharedDir` in the server config (a volume every pod of
a model mounts: the chart's `modelCache` value), else the model's own folder (`.caffeserve-onnx/` beside the
prototxt) where it can be written, unless `onnxCache.modelFolder` is false. A new pod on a node with an
empty local cache finds the graph and its verdict there and skips the conversion.

Both hold the same file names, keyed the same way: the graph `KEY.onnx` (KEY: the sha256 of the prototxt,
the weights, the served shapes and outputs, the converter version) and its verdict
`KEY.VKEY16.verdict.json` (VKEY: the ONNX Runtime version, the device, the tolerance, the parity inputs and
this machine's CPUs; selection.py). A verdict counts only for the graph bytes it judged (their sha256). So
a pod on another kind of machine finds the graph but not a verdict for its own key: it gates and times the
shared graph (parity depends on ONNX Runtime's kernels for the device, speed on the CPUs), without converting.
Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..hashing import file_sha256

log = logging.getLogger("caffeserve.backends")

DEFAULT_CACHE_DIR = "~/.cache/caffe-serving/onnx"
CACHE_FORMAT = "2"  # 2: the graph carries the logits outputs, a verdict file sits beside it
MODEL_FOLDER_CACHE = ".caffeserve-onnx"


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("CAFFESERVE_CACHE_DIR") or DEFAULT_CACHE_DIR))


def cache_key(prototxt: Path, weights: Path, input_shapes: dict, converter_version: str,
              outputs: list[str] | None = None) -> str:
    h = hashlib.sha256()
    parts = [file_sha256(prototxt), file_sha256(weights), json.dumps(sorted(input_shapes.items())), converter_version,
             CACHE_FORMAT]
    if outputs is not None:  # the served blobs are the graph's outputs
        parts.append(json.dumps(outputs))
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def writable_cache_dir() -> Path:
    """The configured cache folder, or a temporary one where it cannot be written (read-only root filesystem)."""
    d = cache_dir()
    if _writable(d):
        return d
    fallback = Path(tempfile.gettempdir()) / "caffe-serving-onnx"
    log.warning("ONNX cache %s is not writable; using %s", d, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def shared_dir(cfg) -> Path | None:
    """The cache the next pod finds: `onnxCache.sharedDir`, else the model's folder (where allowed), else None."""
    oc = cfg.onnx_cache
    if oc.shared_dir:
        return cfg.path(oc.shared_dir)
    if oc.model_folder:
        return cfg.path(cfg.model.prototxt).parent / MODEL_FOLDER_CACHE
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def read_verdict(path: Path, key: str) -> dict | None:
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and verdict.get("key") == key else None


def write_atomically(path: Path, write) -> bool:
    """`write(tmp_path)` then rename onto `path`; False (logged) where the folder cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
        return True
    except OSError as e:  # a file that cannot be kept costs the next load the work again, nothing else
        log.warning("could not write %s: %s", path, e)
        return False
    finally:
        if tmp.exists():
            tmp.unlink()


def write_verdict(path: Path, verdict: dict) -> bool:
    text = json.dumps(verdict, indent=1, sort_keys=True)
    return write_atomically(path, lambda tmp: tmp.write_text(text))


@dataclass
class CachedGraph:
    """The converted graph's file and its verdict, as found at load in the local or the shared cache."""

    key: str  # the graph's cache key (model files, served shapes and outputs, converter)
    path: Path  # the graph file to gate or serve: where a verdict (or the graph alone) was found, else local
    local: Path  # the local cache folder: a fresh conversion and every verdict are written there first
    shared: Path | None  # the cache the next pod finds (published to after a verdict), if any
    verdict_key: str  # what the verdict depends on beyond the graph (selection.verdict_key)
    fields: dict
    verdict: dict | None  # the recorded verdict, where its key matches
    graph_sha: str | None  # the sha256 of `path`'s bytes, where the file exists
    found_in: str = "none"  # "local", "shared" or "none": where the verdict (or the graph) was found

    @property
    def verdict_name(self) -> str:
        return f"{self.key}.{self.verdict_key[:16]}.verdict.json"

    @property
    def graph_name(self) -> str:
        return f"{self.key}.onnx"

    @classmethod
    def find(cls, cfg, key: str, fields: dict, vkey: str) -> CachedGraph:
        """A folder holding a verdict for this key and the graph bytes it judged wins (local first); else the
        first folder holding the graph; else nothing found (the local path, to convert into)."""
        local = writable_cache_dir()
        shared = shared_dir(cfg)
        folders = [("local", local)] + ([("shared", shared)] if shared is not None and shared != local else [])
        found = cls(key, local / f"{key}.onnx", local, shared, vkey, fields, None, None)
        graph_only: tuple[str, Path, str, dict | None] | None = None
        for where, folder in folders:
            path = folder / found.graph_name
            sha = file_sha256(path) if path.is_file() else None
            verdict = read_verdict(folder / found.verdict_name, vkey)
            if verdict is not None and (verdict.get("conversion_problem") or sha == verdict.get("onnx_sha256")):
                found.path, found.verdict, found.graph_sha, found.found_in = path, verdict, sha, where
                return found
            if sha is not None and graph_only is None:  # a verdict beside it is for other bytes: it says so
                graph_only = (where, path, sha, verdict)
        if graph_only is not None:
            found.found_in, found.path, found.graph_sha, found.verdict = graph_only
        return found

    def converting(self) -> Path:
        """Where a fresh conversion goes (the local cache), now the graph this verdict is about."""
        self.path, self.graph_sha = self.local / self.graph_name, None
        return self.path

    def record(self, publish: bool = True, **findings) -> Path:
        """Write the verdict locally and (with `publish`) publish the graph and the verdict to the shared cache;
        the local verdict file's path."""
        verdict = {"key": self.verdict_key, "fields": self.fields, **findings}
        path = self.local / self.verdict_name
        write_verdict(path, verdict)
        if publish:
            publish_files(self.shared, self.local, self.path, verdict)
        return path


def publish_files(shared: Path | None, local: Path, graph: Path | None, verdict: dict | None) -> None:
    """Copy the graph `KEY.onnx` (where it exists and the shared one differs) and then the verdict (unless None)
    to the shared cache;
    a cache that cannot be written is skipped with a log line (the next pod converts again, nothing else)."""
    if shared is None or shared == local or graph is None or not _writable(shared):
        return
    target = shared / graph.name
    if target != graph and graph.is_file():
        sha = (verdict or {}).get("onnx_sha256") or file_sha256(graph)
        if not (target.is_file() and file_sha256(target) == sha):
            if not write_atomically(target, lambda tmp: shutil.copyfile(graph, tmp)):
                return
    if verdict is not None and write_verdict(shared / f"{graph.stem}.{verdict['key'][:16]}.verdict.json", verdict):
        log.info("ONNX verdict and graph stored in the shared cache %s", shared)
