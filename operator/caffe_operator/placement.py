"""Which pool pods hold which models: first-fit-decreasing bin packing by memory. Pure.

Inputs are what the operator read: each ready pod's budget and what it holds now, each model's
wanted copies and memory (measured by a pod after a load, an estimate before). The result is the
whole desired placement; the operator then loads and unloads to reach it.

Rules, in order:
1. Stay put: a copy already on a live pod stays there (a reload costs seconds and a p99 spike),
   up to the copies wanted; surplus copies leave the fullest pods first.
2. Then first-fit-decreasing: the biggest model first, each missing copy on the first pod (by name)
   with room that does not hold it yet. Two copies never share a pod (a copy is for availability).
3. A copy that fits nowhere is left out and the model is reported with why (the largest free
   space it would need, and the pods' free space): the CR's "Unschedulable" condition.
Pods that are gone or not ready hold nothing: their models are placed again elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PodSlot:
    """A pool pod: its name, memory budget for models, and the models it holds now."""

    name: str
    budget_bytes: int
    holds: frozenset[str] = frozenset()
    ready: bool = True


@dataclass(frozen=True)
class ModelDemand:
    """A model of the pool: copies wanted and the memory one copy takes."""

    name: str
    copies: int
    memory_bytes: int


@dataclass
class Placement:
    """model → pods holding it (sorted), and model → why copies are missing."""

    pods: dict[str, list[str]] = field(default_factory=dict)
    unschedulable: dict[str, str] = field(default_factory=dict)

    def by_pod(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for model, pods in self.pods.items():
            for p in pods:
                out.setdefault(p, set()).add(model)
        return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def place(pods: Sequence[PodSlot], models: Sequence[ModelDemand]) -> Placement:
    """The desired placement of `models` on the ready `pods` (see the module's rules)."""
    live = sorted((p for p in pods if p.ready), key=lambda p: p.name)
    demand = {m.name: m for m in models}
    used: dict[str, int] = {p.name: 0 for p in live}
    holding: dict[str, list[str]] = {m.name: [] for m in models}

    # 1. keep what is loaded (biggest models first, so that an over-full pod keeps its big ones)
    for m in sorted(models, key=lambda m: (-m.memory_bytes, m.name)):
        for p in live:
            if m.name in p.holds and len(holding[m.name]) < m.copies:
                holding[m.name].append(p.name)
                used[p.name] += m.memory_bytes

    # 2. first-fit-decreasing for the missing copies
    out = Placement()
    budget = {p.name: p.budget_bytes for p in live}
    for m in sorted(models, key=lambda m: (-m.memory_bytes, m.name)):
        for p in live:
            if len(holding[m.name]) >= m.copies:
                break
            if p.name in holding[m.name]:
                continue
            if used[p.name] + m.memory_bytes <= budget[p.name]:
                holding[m.name].append(p.name)
                used[p.name] += m.memory_bytes
        missing = m.copies - len(holding[m.name])
        if missing > 0:
            out.unschedulable[m.name] = _why(m, missing, live, used, budget, holding[m.name])
    out.pods = {name: sorted(ps) for name, ps in holding.items() if name in demand}
    return out


def _why(m: ModelDemand, missing: int, live: Sequence[PodSlot], used: Mapping[str, int],
         budget: Mapping[str, int], holding: Sequence[str]) -> str:
    have = f"{len(holding)} of {m.copies} copies placed"
    if not live:
        return f"{have}: the pool has no ready pod"
    if m.copies > len(live) and len(holding) == len(live):
        return f"{have}: the pool has {len(live)} ready pods and a pod holds one copy; add pods or lower replicas"
    free = ", ".join(f"{p.name} {_mib(max(budget[p.name] - used[p.name], 0))}"
                     for p in live if p.name not in holding)
    return f"{have}: one copy needs {_mib(m.memory_bytes)} and no other pod has that much free ({free})"
