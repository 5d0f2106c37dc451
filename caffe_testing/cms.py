"""CaffeModelServices in the emulated cluster, for the operator tests: a CR, waiting for its
children and its Ready condition, its events, and the parts of the controllers the emulator does
not run (the kubelet's Deployment status, the EndpointSlice controller's slices), played by hand.
"""

from __future__ import annotations

from typing import Any

from caffe_operator import manifests
from caffe_testing.cluster import CMS, CONFIGMAPS, DEPLOYMENTS, EVENTS, SERVICES, Cluster, OperatorProcess

HASH = manifests.CONFIG_HASH_ANNOTATION
ENDPOINTSLICES = "discovery.k8s.io/v1/endpointslices"


def cms(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": {"pvc": {"claimName": "models", "path": "digits"}},
        "model": {"prototxt": "deploy.prototxt", "weights": "digits.caffemodel"},
    }
    body.update(spec)
    return {"apiVersion": "caffeserving.io/v1alpha1", "kind": "CaffeModelService",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def eventually(op: OperatorProcess, fn, what: str, timeout: float = 20.0):
    try:
        return Cluster.wait_for(fn, timeout=timeout, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- operator log (tail) ---\n{op.logs()[-4000:]}") from None


def children(cluster: Cluster, ns: str, name: str) -> tuple[dict | None, dict | None, dict | None]:
    return (cluster.get_object(CONFIGMAPS, ns, f"{name}-config"),
            cluster.get_object(DEPLOYMENTS, ns, f"{name}-predictor"),
            cluster.get_object(SERVICES, ns, f"{name}-predictor"))


def wait_children(cluster: Cluster, op: OperatorProcess, ns: str, name: str):
    return eventually(op, lambda: all(children(cluster, ns, name)) and children(cluster, ns, name),
                      f"children of {ns}/{name}")


def ready(cr: dict | None) -> dict:
    for c in ((cr or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            return c
    return {}


def wait_ready(cluster: Cluster, op: OperatorProcess, ns: str, name: str, **expected: Any) -> dict:
    """Until the CR's Ready condition has the expected fields (status=..., reason=...); returns the CR."""
    def check():
        cr = cluster.get_object(CMS, ns, name)
        cond = ready(cr)
        return cr if cond and all(cond.get(k) == v for k, v in expected.items()) else None
    return eventually(op, check, f"{ns}/{name} Ready {expected}")


def events(cluster: Cluster, ns: str, name: str) -> list[tuple[str, str, str]]:
    return [(e["type"], e["reason"], e["message"]) for e in cluster.list_objects(EVENTS, ns)
            if e["involvedObject"]["name"] == name]


def play_kubelet(cluster: Cluster, ns: str, name: str, ready_: int, total: int | None = None,
                 conditions: list[dict] | None = None) -> None:
    """Stand-in for the Deployment controller and kubelets: report `ready_` ready pods."""
    dep = cluster.get_object(DEPLOYMENTS, ns, f"{name}-predictor")
    assert dep is not None, f"no Deployment {ns}/{name}-predictor to play the kubelet for"
    total = dep["spec"]["replicas"] if total is None else total
    status = {"observedGeneration": dep["metadata"]["generation"], "replicas": total, "updatedReplicas": total,
              "readyReplicas": ready_, "availableReplicas": ready_}
    if conditions is not None:
        status["conditions"] = conditions
    cluster.patch(DEPLOYMENTS, ns, f"{name}-predictor", {"status": status}, sub="status")


def pod_hash(dep: dict) -> str:
    return dep["spec"]["template"]["metadata"]["annotations"][HASH]


def endpoint_slice(service: str, port: int, endpoints: list[dict], name: str | None = None,
                   namespace: str = "ns", port_name: str = "http") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service}-x7k2p", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4", "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
            "endpoints": endpoints}


def endpoint(address: str, ready_: bool | None, pod: str | None = None, terminating: bool = False) -> dict:
    ep: dict = {"addresses": [address], "conditions": {"terminating": terminating}}
    if ready_ is not None:
        ep["conditions"]["ready"] = ready_
    if pod:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "ns"}
    return ep
