"""Traffic tests' helpers: a closed-loop load on a gateway, and digits manifests with autoscaling
or a canary (the canary is the same digits files under another model version, so a response's
`model_version` says which variant answered it)."""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import yaml

from caffe_testing.digits import DIGITS_DIR
from caffe_testing.gateway import infer_payload
from caffe_testing.servers import http

SERVICE = DIGITS_DIR / "service.yaml"
BODY = orjson.dumps(infer_payload(0))


def digits_manifest(**spec) -> dict:
    """examples/digits/service.yaml with `spec` fields replaced (None removes a field)."""
    doc = yaml.safe_load(SERVICE.read_text())
    for key, value in spec.items():
        if value is None:
            doc["spec"].pop(key, None)
        else:
            doc["spec"][key] = value
    return doc


def canary_of(doc: dict, version: str, percent: int, replicas: int = 1) -> dict:
    """A canary of the manifest's own model files, under model version `version`."""
    model = copy.deepcopy(doc["spec"]["model"])
    model["version"] = version
    return {"model": model, "trafficPercent": percent, "replicas": replicas}


def write_manifest(path: Path, doc: dict) -> None:
    """Write a manifest for `caffeserve up` to pick up (atomically: it polls the file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)


def infer(url: str, path: str = "/v2/models/digits/infer", timeout: float = 120) -> tuple[int, str, dict]:
    """(status, model_version answered or "", headers)."""
    status, headers, body = http("POST", url + path, BODY, {"Content-Type": "application/json"}, timeout=timeout)
    version = ""
    if status == 200:
        version = str(orjson.loads(body).get("model_version", ""))
    return status, version, dict(headers)


class ClosedLoad:
    """`clients` threads, each sending the next request when its last is answered, until stopped.
    Records every outcome: (time sent, seconds, status, model version)."""

    def __init__(self, url: str, clients: int, path: str = "/v2/models/digits/infer"):
        self.url, self.path = url, path
        self.clients = clients
        self.results: list[tuple[float, float, int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                status, version, _ = infer(self.url, self.path)
            except OSError as e:  # a connection error is a lost request too
                self.errors.append(repr(e))
                status, version = 0, ""
            self.results.append((t0, time.monotonic() - t0, status, version))

    def start(self) -> ClosedLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> ClosedLoad:
        self._stop.set()
        for t in self._threads:
            t.join(150)
        return self

    def statuses(self) -> Counter:
        return Counter(r[2] for r in self.results)

    def versions(self, since: float = 0.0) -> Counter:
        return Counter(r[3] for r in self.results if r[0] >= since)

    def __enter__(self) -> ClosedLoad:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
