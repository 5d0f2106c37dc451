"""Local mode's models: a CaffeModelService manifest read as server configs for this machine.

The manifest is validated by the operator's own types (caffe_operator.api) and each model's
config is the operator's (manifests.server_config) with this machine's folder in place of
/models; where that folder is, per `spec.source`, is described in caffe_local/main.py.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from caffe_operator.api import API_VERSION, KIND, InvalidSpec, parse_spec
from caffe_operator.manifests import server_config
from inference_server.commands.fetch import FetchError, fetch
from inference_server.commands.s3 import S3Options


class LocalError(Exception):
    """Something local mode cannot run; the message says what and how to fix it. `exit_code` follows
    the README's convention: 2 (the default) for what the user must change (the manifest, a file it
    names, a port), 1 for what failed at run time (a download, a replica that never became ready)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class LocalAutoscaling:
    """spec.autoscaling, as local mode uses it (see autoscale.py)."""

    min_replicas: int
    max_replicas: int
    target: int
    cold_start_s: float
    scale_down_delay_s: float


@dataclass
class LocalModel:
    name: str
    replicas: int
    config_yaml: str  # the `caffeserve serve` config, with this machine's file paths
    startup_timeout_s: float
    grpc: bool = True  # spec.runtime.grpc.enabled: each replica serves gRPC on a port of its own
    variant: str = "primary"  # or "canary" (spec.canary)
    traffic_percent: int = 100
    version: str | None = None
    autoscaling: LocalAutoscaling | None = None
    # a pool: one many-model server (`serve --model-repository`) serving the models named in `serves`
    repository: Path | None = None
    serves: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.variant)

    @property
    def label(self) -> str:
        return self.name if self.variant == "primary" else f"{self.name}-{self.variant}"


def load_manifest(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as e:
        raise LocalError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LocalError(f"{path} is not valid YAML: {e}") from None
    if not all(isinstance(d, dict) for d in docs):
        raise LocalError(f"{path}: every document must be a Kubernetes object (a mapping)")
    return docs


def _files_dir(name: str, spec, manifest: Path, docs: list[dict], pvc_root: Path | None, cache_dir: Path,
               tmp: Path) -> Path:
    """The local folder that plays /models for this model (the rules: caffe_local/main.py's docstring)."""
    src = spec.source
    if src.pvc is not None:
        root = (pvc_root or manifest.parent).resolve()
        claim = root / src.pvc.claim_name
        base = claim if claim.is_dir() else root
        return base / src.pvc.path.strip("/") if src.pvc.path.strip("/") else base
    if src.downloaded:
        dest = cache_dir / name
        s3 = _s3_options(name, src.s3, manifest, docs) if src.s3 is not None else None
        for f in spec.model_files():
            try:
                got = fetch(f.url, f.path(str(dest)), f.sha256, s3=s3)
            except FetchError as e:
                raise LocalError(f"{name}: model.{f.role}: {e}", exit_code=1) from None
            print(f"{name}: {f.local_name} {'downloaded' if got.downloaded else 'cached'} "
                  f"({got.size} bytes, sha256 {got.sha256[:12]}…)", flush=True)
        return dest
    cm_name = src.config_map.name
    cm = next((d for d in docs if d.get("kind") == "ConfigMap" and (d.get("metadata") or {}).get("name") == cm_name),
              None)
    if cm is None:
        raise LocalError(f"{name}: source.configMap {cm_name!r} is not in {manifest}; "
                         "add the ConfigMap to the same file (separated by ---)")
    dest = tmp / f"configmap-{cm_name}"
    dest.mkdir(parents=True, exist_ok=True)
    for key, text in (cm.get("data") or {}).items():
        (dest / key).write_text(text)
    for key, b64 in (cm.get("binaryData") or {}).items():
        (dest / key).write_bytes(base64.b64decode(b64))
    return dest


def _s3_options(name: str, s3, manifest: Path, docs: list[dict]) -> S3Options:
    """source.s3 as fetch options: its endpoint and region, and the credentials of its secretRef,
    read from a Secret in the same file (as the pod's envFrom would); without one, the environment's."""
    credentials = None
    if s3.secret_ref is not None:
        secret = next((d for d in docs if d.get("kind") == "Secret"
                       and (d.get("metadata") or {}).get("name") == s3.secret_ref.name), None)
        if secret is not None:
            credentials = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            credentials.update(secret.get("stringData") or {})
        else:
            print(f"{name}: Secret {s3.secret_ref.name!r} is not in {manifest}; using this machine's AWS credentials",
                  flush=True)
    return S3Options(endpoint=s3.endpoint, region=s3.region, credentials=credentials)


def local_models(manifest: Path, pvc_root: Path | None, cache_dir: Path, tmp: Path,
                 device: str | None = None, replicas: int | None = None) -> list[LocalModel]:
    """Every CaffeModelService in the file, as server configs for this machine."""
    docs = load_manifest(manifest)
    services = [d for d in docs if d.get("kind") == KIND]
    if not services:
        raise LocalError(f"{manifest} has no {KIND} (apiVersion {API_VERSION})")
    out = []
    for doc in services:
        if doc.get("apiVersion") != API_VERSION:
            raise LocalError(f"{manifest}: apiVersion {doc.get('apiVersion')!r}; expected {API_VERSION}")
        name = (doc.get("metadata") or {}).get("name") or ""
        try:
            spec = parse_spec(name, doc.get("spec"))
        except InvalidSpec as e:
            raise LocalError(f"{manifest}: {KIND} {name!r}: {e}") from None
        variants = [("primary", spec)] + ([("canary", spec.canary_spec())] if spec.canary is not None else [])
        canary_percent = spec.canary.traffic_percent if spec.canary is not None else 0
        for variant, vspec in variants:
            files = _files_dir(name if variant == "primary" else f"{name}-{variant}", vspec, manifest, docs,
                               pvc_root, cache_dir, tmp)
            for f in vspec.model_files():
                if not (files / f.local_name).is_file():
                    hint = " (the pvc rule: see `caffeserve up --help`)" if vspec.source.pvc is not None else ""
                    where = "model" if variant == "primary" else f"{variant}.model"
                    raise LocalError(f"{name}: {where}.{f.role} {f.local_name!r} not found in {files}{hint}")
            cfg = server_config(name, vspec, model_dir=str(files))
            if device is not None:
                cfg = cfg.model_copy(update={"device": cfg.device.model_copy(update={"kind": device})})
            data = cfg.model_dump(by_alias=True, exclude_none=True, mode="json")
            auto = vspec.autoscaling
            count = vspec.replicas if replicas is None or variant != "primary" else replicas
            out.append(LocalModel(
                name, count, yaml.safe_dump(data, sort_keys=False), float(vspec.runtime.startup_timeout_seconds),
                vspec.runtime.grpc.enabled, variant=variant, version=vspec.model.version,
                traffic_percent=canary_percent if variant == "canary" else 100 - canary_percent,
                autoscaling=None if auto is None else LocalAutoscaling(
                    auto.min_replicas, auto.max_replicas, auto.target, float(auto.cold_start_timeout_seconds),
                    float(auto.scale_down_delay_seconds)),
            ))
    names = [m.name for m in out if m.variant == "primary"]
    if len(set(names)) != len(names):
        raise LocalError(f"{manifest}: two {KIND}s share a name")
    return out


def pooled(models: list[LocalModel], repository: Path, replicas: int = 1) -> LocalModel:
    """Every model as one pool: a repository folder (`repository/NAME/server.yaml`, each the config its own
    replicas would run) served by `replicas` many-model servers. A canary needs replicas of its own: refused."""
    canaries = [m.name for m in models if m.variant != "primary"]
    if canaries:
        raise LocalError(f"--pool: {', '.join(canaries)} has a canary, which needs replicas of its own; run it "
                         "without --pool")
    for m in models:
        folder = repository / m.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "server.yaml").write_text(m.config_yaml)
        if m.autoscaling is not None:
            print(f"{m.name}: spec.autoscaling does not apply in a pool (the pool's servers hold every model)",
                  flush=True)
    return LocalModel("pool", replicas, "", sum(m.startup_timeout_s for m in models), any(m.grpc for m in models),
                      repository=repository, serves=tuple(m.name for m in models))


def default_cache_dir() -> Path:
    """Where source.url files are downloaded: the project's one cache folder, `models` in it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caffe-serving" / "models"
