"""The CaffeServingPool API: a set of GPU pods running the many-model server, shared by the
CaffeModelServices that name it in `spec.pool`.

Why a CR of its own (not pool fields on the chart, not a field of each model): a pool has its own
lifecycle, size and GPU settings, and many models point at one; a CR gives it a status (its pods,
what each holds, memory used), `kubectl get csp`, a scale subresource, RBAC per namespace and
ownership of its pods' Deployment. The chart can still render pools from values (`pools:`).

One source of truth, as for CaffeModelService: the operator validates with these types and
`caffeserve crd --kind CaffeServingPool` prints crds/caffeservingpools.yaml from them.

GPU sharing (`spec.gpu.sharing`) picks the extended resource the cluster's device plugin offers:
  whole        nvidia.com/gpu: COUNT                 (NVIDIA device plugin, default settings)
  timeSlicing  nvidia.com/gpu.shared: COUNT          (device plugin sharing.timeSlicing with renameByDefault)
  mig          nvidia.com/mig-PROFILE: COUNT         (GPU operator, mig.strategy mixed)
  hami         nvidia.com/gpu: COUNT, nvidia.com/gpumem: MiB, nvidia.com/gpucores: PERCENT (HAMi's device plugin)
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from caffe_operator.api import (
    _DNS_LABEL,
    _DNS_SUBDOMAIN,
    Condition,
    InvalidSpec,
    LocalObjectReference,
)
from inference_server.config import CamelModel, format_validation_error

POOL_KIND = "CaffeServingPool"
POOL_PLURAL = "caffeservingpools"
POOL_SINGULAR = "caffeservingpool"
POOL_SHORT_NAMES = ["csp"]
MAX_POOL_NAME_LENGTH = 47  # "{name}-pool" plus a ReplicaSet's and pod's suffixes stay valid names

_QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
_MIG_PROFILE = r"^[0-9]+g\.[0-9]+gb(\+me)?$"
_ANY_OBJECT: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
_UNITS = {None: 1, "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(value: str) -> int:
    """A memory quantity ("10Gi", "512M", "1048576") in bytes."""
    m = re.match(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$", value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a memory quantity (e.g. 10Gi, 512Mi)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class GpuSharing(StrEnum):
    whole = "whole"
    time_slicing = "timeSlicing"
    mig = "mig"
    hami = "hami"


class PoolGpu(CamelModel):
    """Which GPU resource each pool pod asks for: a whole GPU, a time-sliced share, a MIG slice, or a
    HAMi slice of memory and cores. The device plugin must offer it (docs/kubernetes.md)."""

    sharing: GpuSharing = Field(
        default=GpuSharing.whole,
        description="whole: nvidia.com/gpu; timeSlicing: nvidia.com/gpu.shared (the device plugin's "
        "sharing.timeSlicing with renameByDefault); mig: nvidia.com/mig-PROFILE (mig.strategy mixed); "
        "hami: nvidia.com/gpu with nvidia.com/gpumem and nvidia.com/gpucores (HAMi).",
    )
    count: int = Field(default=1, ge=1, le=16, description="How many of the resource each pod asks for.")
    mig_profile: str | None = Field(
        default=None, pattern=_MIG_PROFILE, description="With sharing mig: the MIG profile, e.g. 1g.10gb, 3g.40gb.",
    )
    memory_mib: int | None = Field(
        default=None, ge=1, alias="memoryMiB", le=1 << 22,
        description="With sharing hami: device memory per GPU in MiB (nvidia.com/gpumem).",
    )
    cores_percent: int | None = Field(
        default=None, ge=1, le=100,
        description="With sharing hami: share of each GPU's cores in percent (nvidia.com/gpucores).",
    )

    @model_validator(mode="after")
    def _fits_mode(self) -> PoolGpu:
        if self.sharing == GpuSharing.mig and not self.mig_profile:
            raise ValueError("gpu.sharing mig needs gpu.migProfile (e.g. 1g.10gb)")
        if self.sharing != GpuSharing.mig and self.mig_profile:
            raise ValueError(f"gpu.migProfile is set but gpu.sharing is {self.sharing}: set sharing: mig")
        if self.sharing != GpuSharing.hami and (self.memory_mib or self.cores_percent):
            raise ValueError(f"gpu.memoryMiB and gpu.coresPercent need gpu.sharing hami (it is {self.sharing})")
        if self.sharing == GpuSharing.hami and not (self.memory_mib or self.cores_percent):
            raise ValueError("gpu.sharing hami needs gpu.memoryMiB or gpu.coresPercent (else ask for whole GPUs)")
        return self

    def resources(self) -> dict[str, int]:
        """The container's extended-resource limits."""
        if self.sharing == GpuSharing.time_slicing:
            return {"nvidia.com/gpu.shared": self.count}
        if self.sharing == GpuSharing.mig:
            return {f"nvidia.com/mig-{self.mig_profile}": self.count}
        out = {"nvidia.com/gpu": self.count}
        if self.sharing == GpuSharing.hami:
            if self.memory_mib:
                out["nvidia.com/gpumem"] = self.memory_mib
            if self.cores_percent:
                out["nvidia.com/gpucores"] = self.cores_percent
        return out

    def device_memory_bytes(self) -> int | None:
        """The device memory the resource itself bounds (a MIG slice, a HAMi limit); None for a whole
        or time-sliced GPU (the server measures the GPU's free memory)."""
        if self.sharing == GpuSharing.hami and self.memory_mib:
            return self.memory_mib * 2**20
        if self.sharing == GpuSharing.mig and self.mig_profile:
            gb = int(re.match(r"^[0-9]+g\.([0-9]+)gb", self.mig_profile).group(1))  # type: ignore[union-attr]
            return gb * 10**9
        return None


class CaffeServingPoolSpec(CamelModel):
    """What the user wants: `replicas` pods of the many-model server, each with `modelMemory` for models."""

    replicas: int = Field(default=1, ge=0, le=1000, description="Pods in the pool.")
    device: Literal["gpu", "cpu"] = Field(
        default="gpu",
        description="gpu: each pod asks for the resource spec.gpu names; cpu: no GPU (tests, CPU nodes).",
    )
    gpu: PoolGpu = Field(default_factory=PoolGpu, description="The GPU resource of each pod (with device gpu).")
    model_memory: str | None = Field(
        default=None, pattern=_QUANTITY,
        description="Memory each pod gives its models (a quantity, e.g. 8Gi): the placement's budget per pod and "
        "the server's own budget (a load past it is refused). Default: the GPU slice's memory (mig, hami); "
        "required otherwise.",
    )
    default_model_memory: str = Field(
        default="256Mi", pattern=_QUANTITY,
        description="What a model is assumed to take before a pod has measured it, unless the model's "
        "spec.resources.requests.memory says.",
    )
    model_claims: list[str] = Field(
        default_factory=list, max_length=16,
        json_schema_extra={"items": {"type": "string", "pattern": _DNS_SUBDOMAIN, "maxLength": 253}},
        description="PersistentVolumeClaims mounted read-only in every pod at /models/CLAIM: a model of the pool "
        "reads its files from one of them (its source.pvc.claimName).",
    )
    image: str | None = Field(default=None, min_length=1, description="Server image. Default: the operator's.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy of the server container. Default: Kubernetes' default."
    )
    resources: dict[str, Any] | None = Field(
        default=None, json_schema_extra=_ANY_OBJECT,
        description="ResourceRequirements of the server container (cpu, memory); the GPU comes from spec.gpu.",
    )
    node_selector: dict[str, str] | None = Field(default=None, description="Node labels the pods must match.")
    tolerations: list[dict[str, Any]] | None = Field(
        default=None,
        json_schema_extra={"items": {"type": "object", "description": "A Kubernetes Toleration.", **_ANY_OBJECT}},
        description="Tolerations of the pods. With device gpu, one for the nvidia.com/gpu taint is added.",
    )
    runtime_class_name: str | None = Field(
        default=None, pattern=_DNS_SUBDOMAIN, description="RuntimeClass (e.g. nvidia)."
    )
    priority_class_name: str | None = Field(default=None, pattern=_DNS_SUBDOMAIN, description="PriorityClass.")
    image_pull_secrets: list[LocalObjectReference] | None = Field(default=None, description="Image pull Secrets.")
    startup_timeout_seconds: int = Field(
        default=300, ge=10, le=86400, description="How long a pod's server may take to start (its startup probe)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> CaffeServingPoolSpec:
        if self.device == "gpu" and self.model_memory is None and self.gpu.device_memory_bytes() is None:
            raise ValueError("modelMemory is required unless gpu.sharing is mig or hami (whose slice bounds it)")
        if self.device == "cpu" and self.model_memory is None:
            raise ValueError("modelMemory is required with device cpu")
        if self.model_memory is not None and quantity_bytes(self.model_memory) < 2**20:
            raise ValueError(f"modelMemory {self.model_memory} is below 1Mi: write a unit (e.g. 8Gi)")
        for where in ((self.resources or {}).get("limits") or {}, (self.resources or {}).get("requests") or {}):
            if any(k.startswith("nvidia.com/") for k in where):
                raise ValueError("resources must not name nvidia.com/ resources: spec.gpu decides them")
        if len(set(self.model_claims)) != len(self.model_claims):
            raise ValueError("modelClaims lists a claim twice")
        return self

    @property
    def budget_bytes(self) -> int:
        """Memory per pod for models: spec.modelMemory, else the GPU slice's."""
        if self.model_memory is not None:
            return quantity_bytes(self.model_memory)
        found = self.gpu.device_memory_bytes()
        assert found is not None  # _consistent
        return found


class PoolPodStatus(CamelModel):
    """One pod of the pool and what it holds."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    name: str = Field(description="The pod.")
    ready: bool = Field(description="Whether its server answers ready.")
    models: list[str] = Field(default_factory=list, description="Models it holds (loaded).")
    memory_bytes: int = Field(default=0, description="Memory its models take (measured, or estimated before a load).")
    budget_bytes: int = Field(default=0, description="Memory it gives models (spec.modelMemory).")


class CaffeServingPoolStatus(CamelModel):
    """What the operator observed. Written by the operator only."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    observed_generation: int | None = Field(default=None, description="The metadata.generation last reconciled.")
    conditions: list[Condition] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Ready: every pod ready and every model of the pool placed.",
    )
    replicas: int | None = Field(default=None, description="Pods that exist.")
    ready_replicas: int | None = Field(default=None, description="Pods that are ready.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    models: int | None = Field(default=None, description="Models that name this pool.")
    unschedulable: list[str] | None = Field(default=None, description="Models that fit on no pod.")
    pods: list[PoolPodStatus] | None = Field(default=None, description="Each pod and the models it holds.")


def parse_pool_spec(name: str, spec: dict[str, Any] | None) -> CaffeServingPoolSpec:
    """Validate a pool's name and spec, raising InvalidSpec with a readable message."""
    if len(name) > MAX_POOL_NAME_LENGTH or not re.match(_DNS_LABEL, name):
        raise InvalidSpec(f"metadata.name {name!r} must be a DNS label of at most {MAX_POOL_NAME_LENGTH} characters")
    try:
        return CaffeServingPoolSpec.model_validate(spec or {})
    except ValidationError as e:
        raise InvalidSpec(format_validation_error(e, prefix="spec.")) from None

