"""Kubernetes Events on a CaffeModelService, posted with the operator's own client.

Not `kopf.event`: it finds kopf's per-object event queue in a context variable that only kopf's
handlers have, so from the periodic resync or a follow-up look (reconcile.py) it raises
LookupError and the event is lost. The body is what kopf posts (core v1 Event, one per
occurrence); posting is best effort: a failure is logged and never fails a reconcile.
API access: `create` on core `events`.
"""

from __future__ import annotations

import datetime
import logging
import socket
from collections.abc import Mapping
from typing import Any

from caffe_operator.kube import ApiError, KubeClient, collection_path

MAX_MESSAGE_CHARS = 1024  # the API server refuses longer messages on events with a reportingComponent
NAME_PREFIX = "caffe-serving-"


def _shorten(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    half = (MAX_MESSAGE_CHARS - 3) // 2
    return f"{message[:half]}...{message[-(MAX_MESSAGE_CHARS - 3 - half):]}"


def event_body(obj: Mapping[str, Any], type_: str, reason: str, message: str, *, component: str,
               instance: str, now: datetime.datetime | None = None) -> dict[str, Any]:
    """A core v1 Event about `obj` (which must carry apiVersion, kind and metadata)."""
    meta = obj["metadata"]
    when = (now or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    ref = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"], "namespace": meta["namespace"]}
    if meta.get("uid"):
        ref["uid"] = meta["uid"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"namespace": meta["namespace"], "generateName": NAME_PREFIX},
        "involvedObject": ref,
        "type": type_,
        "reason": reason,
        "message": _shorten(message),
        "action": "Reconcile",
        "reportingComponent": component,
        "reportingInstance": instance,
        "source": {"component": component},  # the "From" column of `kubectl describe`
        "firstTimestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lastTimestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "count": 1,
    }


class EventPoster:
    """Posts Events through a KubeClient as `component` (instance: this host, i.e. the pod name)."""

    def __init__(self, client: KubeClient, component: str, logger: logging.Logger | None = None) -> None:
        self.client = client
        self.component = component
        self.instance = socket.gethostname()
        self.logger = logger or logging.getLogger(__name__)

    async def __call__(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        body = event_body(obj, type_, reason, message, component=self.component, instance=self.instance)
        try:
            await self.client.request("POST", collection_path("v1", "events", body["metadata"]["namespace"]), body)
        except ApiError as e:
            self.logger.warning(f"could not post event {type_} {reason} on {obj['metadata']['name']}: {e}")
