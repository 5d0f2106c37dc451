"""A server's models: the ones it may load, the ones it holds, and loading and unloading them.

The models come from a repository folder (`--model-repository DIR`: each model a folder `DIR/NAME/` with
its `server.yaml` and files, as Triton lays out a repository) or from one config file (`--config FILE`, a
repository of one). Triton's control modes: `none` loads every model at start and refuses load and unload
calls; `explicit` loads the `--load-model` names at start (`*`: all) and takes load and unload calls.

Loads run in a worker thread, one at a time (so that each model's memory is measured alone), while the
event loop keeps serving the other models. A load is checked against the memory budget twice: estimated
from the weights before anything is read, measured before the model turns ready. An unload stops new
requests for the model (503, not run: a gateway may send them to another replica), waits for its
requests in flight, then stops its workers and hands the freed memory back to the kernel.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from ..config import ConfigError, ServerConfig, parse_config
from ..errors import BadRequest, Conflict, InferenceError, NotFound
from .dataplane import DataPlane, Model
from .memory import MemoryBudget, ModelMemory, estimate_bytes, release_freed_memory, rss_bytes, warm_imports
from .metrics import MetricFamilies, ServerMetrics

if TYPE_CHECKING:
    from .tracing import ServerTracing

log = logging.getLogger(__name__)

CONTROL_MODES = ("none", "explicit")
CONFIG_FILE = "server.yaml"
# Triton's index states: a failed or unloaded model is UNAVAILABLE, its reason says why
INDEX_STATES = {"loading": "LOADING", "ready": "READY", "failed": "UNAVAILABLE", "unloading": "UNLOADING"}
NOT_LOADED = "not loaded"


class Repository:
    """Where models come from and what the DataPlane holds of them; every load and unload goes through here."""

    def __init__(self, plane: DataPlane, families: MetricFamilies, *, root: Path | None = None,
                 single: Path | None = None, reread: Callable[[], ServerConfig] | None = None, mode: str = "none",
                 budget: MemoryBudget | None = None, tracing: ServerTracing | None = None):
        """`root`: a folder of model folders; or `single`, one model's config file or folder, `reread()`
        reading it again for a load call."""
        if (root is None) == (single is None or reread is None):
            raise ValueError("a repository is a folder of models, or one model's config and how to read it")
        self.plane, self.families = plane, families
        self.root, self.single, self.reread = root, single, reread
        self.tracing = tracing  # given to every model loaded (None: tracing off)
        self.mode = mode
        self.budget = budget or MemoryBudget()
        if self.budget.host is not None:
            families.budget.labels(memory="host").set(self.budget.host)
        self._load_lock = threading.Lock()  # one load at a time: each model's RSS growth is its own
        self._busy: set[str] = set()  # names with a load or unload under way (event loop only)
        # the event loop requests run on (commands/serve.py sets it once listening): a model's `auto` switch
        # happens there (serving/switch.py)
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- what the repository holds
    def names(self) -> list[str]:
        """The models this server may load."""
        if self.root is None:
            return [self._single_name()]
        try:
            return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file())
        except OSError:
            return []

    def _single_name(self) -> str:
        single = next(iter(self.plane.models.values()), None)
        if single is not None:
            return single.name
        return next(iter(self.plane.absent), "")

    def read_config(self, name: str, override: dict | None = None) -> ServerConfig:
        """The config of model `name`: its `server.yaml`, or `override` (a load call's `parameters.config`,
        relative paths resolving against the model's folder). NotFound, or BadRequest naming the field."""
        try:
            if self.root is None:
                assert self.single is not None and self.reread is not None
                if name != self._single_name():
                    raise NotFound(f"model '{name}' is not in this server's repository (it serves "
                                   f"'{self._single_name()}' from {self.single})")
                base = self.single.resolve() if self.single.is_dir() else self.single.resolve().parent
                cfg = self.reread() if override is None else parse_config({"name": name, **override}, str(base))
            else:
                folder = self.root / name
                if override is None:
                    if "/" in name or name.startswith(".") or not (folder / CONFIG_FILE).is_file():
                        raise NotFound(f"model '{name}' is not in the repository {self.root} (no {name}/{CONFIG_FILE})")
                    data = yaml.safe_load((folder / CONFIG_FILE).read_text())
                    if not isinstance(data, dict):
                        raise BadRequest(f"{folder / CONFIG_FILE} must be a YAML mapping")
                    override = data
                cfg = parse_config({"name": name, **override}, str(folder.resolve()))
        except ConfigError as e:
            raise BadRequest(f"model '{name}': {e}") from None
        except (OSError, yaml.YAMLError) as e:
            raise BadRequest(f"model '{name}': cannot read its config: {e}") from None
        if cfg.name != name:
            raise BadRequest(f"model '{name}': its config names the model '{cfg.name}'; a model's config must carry "
                             "its own name (or none)")
        return cfg

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every model with its version, state and the reason for that state."""
        plane = self.plane
        out = []
        for name in sorted({*self.names(), *plane.models, *plane.absent}):
            m = plane.models.get(name)
            if m is not None:
                entry = {"name": name, "version": m.version, "state": INDEX_STATES.get(m.state, m.state.upper()),
                         "reason": m.error or ""}
            else:
                version, reason = plane.absent.get(name, ("", NOT_LOADED))
                entry = {"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason}
            if not ready_only or entry["state"] == "READY":
                out.append(entry)
        return out

    # --- loading
    def new_model(self, cfg: ServerConfig) -> Model:
        return self.adopt(Model(cfg, ServerMetrics(cfg.name, cfg.version, self.families)))

    def adopt(self, model: Model) -> Model:
        """`model`'s measured memory is checked against the budget before it turns ready; it is traced as
        the server is."""
        model.admit = lambda mem: self._admit(model, mem)
        model.memory_lock = self._load_lock
        model.tracing = self.tracing
        return model

    def _held(self, but: Model | None = None) -> tuple[int, int]:
        """Host and GPU bytes the models held now have (each as measured at its load)."""
        host = gpu = 0
        for m in self.plane.models.values():
            if m is not but and m.state in ("ready", "unloading"):
                host += m.memory.host_bytes
                gpu += m.memory.gpu_bytes or 0
        return host, gpu

    def _check_estimate(self, model: Model) -> None:
        cfg = model.cfg
        est = estimate_bytes(str(cfg.path(cfg.model.weights)), cfg.instances)
        model.memory.estimate_bytes = est
        host, gpu = self._held()
        gpu_model = cfg.device.kind == "gpu"
        try:
            self.budget.check(model.name, host, est, gpu, est if gpu_model else 0,
                              cfg.device.id if gpu_model else None)
        finally:
            if gpu_model and self.budget.gpu is not None:
                self.families.budget.labels(memory="gpu").set(self.budget.gpu)

    def _admit(self, model: Model, mem: ModelMemory) -> None:
        host, gpu = self._held(but=model)
        gpu_model = model.cfg.device.kind == "gpu"
        self.budget.check(model.name, host, mem.host_bytes, gpu, mem.gpu_bytes or 0,
                          model.cfg.device.id if gpu_model else None, measured=True)

    def load_blocking(self, model: Model) -> None:
        """Load `model` in this (worker) thread, after the loads before it."""
        with self._load_lock:
            warm_imports(model.cfg.backend)
            try:
                self._check_estimate(model)
            except InferenceError as e:
                model.state, model.error, model.failure = "failed", e.message, e
                log.error("model %s was not loaded: %s", model.name, e.message)
                return
            model.loop = self.loop
            model.load()

    def load_at_start(self, names: list[str]) -> None:
        """The start-up loads (a worker thread): each model in turn; the server is ready when they are done.
        A model that fails keeps its message (readiness of that model, the index); the others load."""
        try:
            for name in names:
                model = self.plane.models.get(name)
                if model is None:
                    try:
                        model = self.new_model(self.read_config(name))
                    except InferenceError as e:
                        self.plane.absent[name] = ("", e.message)
                        log.error("model %s was not loaded: %s", name, e.message)
                        continue
                    self.plane.models[name] = model
                    self.plane.absent.pop(name, None)
                self.load_blocking(model)
        finally:
            self.plane.starting = False

    def start_names(self, load_models: list[str]) -> list[str]:
        """What loads at start: every model (mode none), else the `--load-model` names (`*`: every model)."""
        names = self.names()
        if self.mode == "none" or "*" in load_models:
            return names
        return list(dict.fromkeys(load_models))

    def _check_mode(self, call: str) -> None:
        if self.mode != "explicit":
            raise Conflict(f"model {call} is not allowed: this server's model control mode is '{self.mode}' (it "
                           "loads its models at start); start it with --model-control-mode explicit to load and "
                           "unload models through the repository API")

    async def load(self, name: str, override: dict | None = None) -> None:
        """Load (or reload) model `name`; returns once it is ready. A reload serves the old model until the
        new one is ready, then drains it. Raises the load's error (the others keep serving)."""
        self._check_mode("load")
        self.loop = self.loop or asyncio.get_running_loop()
        cfg = self.read_config(name, override)
        if name in self._busy:
            raise Conflict(f"model '{name}' is already being loaded or unloaded; retry once that has finished")
        self._busy.add(name)
        try:
            plane = self.plane
            old = plane.models.get(name)
            if old is not None and old.state != "ready":
                old = None  # a failed model is replaced at once
            model = self.new_model(cfg)
            if old is None:
                plane.models[name] = model  # the index says LOADING; requests get 503 "is loading"
                plane.absent.pop(name, None)
            await asyncio.to_thread(self.load_blocking, model)
            if model.state != "ready":
                raise model.failure or BadRequest(f"failed to load model '{name}': {model.error}")
            if old is not None:
                plane.models[name] = model  # new requests reach the new model; the old one drains
                await self._retire(old, replaced=True)
        finally:
            self._busy.discard(name)

    async def unload(self, name: str) -> None:
        """Unload model `name`: no new requests, the ones in flight finish, then its memory is freed.
        Unloading a model that is not loaded succeeds (as Triton's does)."""
        self._check_mode("unload")
        plane = self.plane
        m = plane.models.get(name)
        if m is None:
            if name in plane.absent or name in self.names():
                return
            raise NotFound(f"model '{name}' is not in this server's repository")
        if name in self._busy:
            raise Conflict(f"model '{name}' is already being loaded or unloaded; retry once that has finished")
        self._busy.add(name)
        try:
            await self._retire(m, replaced=False)
        finally:
            self._busy.discard(name)

    async def _retire(self, m: Model, replaced: bool) -> None:
        """Drain `m` (its requests in flight finish, within their deadline) and free it."""
        was = m.state
        m.state = "unloading"
        deadline = time.monotonic() + m.timeout + 1.0  # every request in flight ends by its own deadline
        while m.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if not replaced:
            self.plane.absent[m.name] = (m.version, "unloaded")
            self.plane.models.pop(m.name, None)
            m.metrics.ready.set(0)
            m.metrics.set_memory(0, 0 if m.memory.gpu_bytes is not None else None)
        before = rss_bytes()
        after = await asyncio.to_thread(_free, m)
        log.info("model %s version %s unloaded (%s): %.1f MiB returned to the system (held %.1f MiB at load)",
                 m.name, m.version, "replaced" if replaced else was, (before - after) / 2**20,
                 m.memory.host_bytes / 2**20)


def _free(m: Model) -> int:
    """Stop `m`'s workers, drop what references its Nets, and trim the heap; the RSS after."""
    m.close()
    m.executor = None  # type: ignore[assignment]
    gc.collect()
    release_freed_memory()
    return rss_bytes()


def load_parameters(body: bytes | bytearray) -> dict | None:
    """A REST load call's body → `config_parameter` of its `parameters`."""
    return config_parameter(_parameters(body))


def config_parameter(params: dict[str, Any]) -> dict | None:
    """The model config a load call carries (Triton's `parameters.config`, a JSON string of the model's
    server.yaml fields), or None. Files in the call (`file:…` parameters) are refused: this server reads a
    model's files from its repository folder or a volume."""
    files = [k for k in params if k.startswith("file:")]
    if files:
        raise BadRequest(f"files in a load call are not supported ({', '.join(files)}): put the model's files in "
                         "the repository folder (or a volume) and name their paths in parameters.config")
    unknown = [k for k in params if k != "config"]
    if unknown:
        raise BadRequest(f"unknown load parameter(s) {', '.join(unknown)}; a load takes parameters.config")
    config = params.get("config")
    if config is None or config == "":
        return None
    if isinstance(config, str | bytes):
        try:
            config = orjson.loads(config)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"parameters.config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise BadRequest("parameters.config must be a JSON object (a string holding one, as Triton sends it)")
    return config


def index_ready_only(body: bytes | bytearray) -> bool:
    """An index call's `ready` field (Triton: only the models ready to serve); an empty body means false."""
    data = _json_object(body, "repository index")
    ready = data.get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest("'ready' must be true or false")
    return ready


def _parameters(body: bytes | bytearray) -> dict[str, Any]:
    params = _json_object(body, "repository call").get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be a JSON object")
    return params


def _json_object(body: bytes | bytearray, what: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"malformed {what} body: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the {what} body must be a JSON object")
    return data
