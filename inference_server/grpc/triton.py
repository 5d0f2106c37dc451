"""Triton's statistics and model-configuration answers over gRPC, from the JSON that REST answers with.

One source per fact: `stats.ModelStats.as_json` and `stats.model_config` build Triton's JSON (REST's
`/stats` and `/config`); here that same JSON becomes the gRPC message (protobuf's JSON mapping: the
field names, and enum values by name, are Triton's in both). The gateway uses it too, for the sums
it computes over a model's replicas.
"""

from __future__ import annotations

from google.protobuf import json_format

from . import messages as pb


def statistics_response(model_stats: list[dict]) -> bytes:
    """A serialized ModelStatisticsResponse from REST's `model_stats` list."""
    resp = pb.ModelStatisticsResponse()
    for s in model_stats:
        json_format.ParseDict(s, resp.model_stats.add(), ignore_unknown_fields=True)
    return resp.SerializeToString()


def config_response(config: dict) -> bytes:
    """A serialized ModelConfigResponse from REST's `/config` JSON. Triton's versions are integers:
    a version that is not one (e.g. "v2") leaves `version_policy` out rather than failing."""
    config = dict(config)
    policy = (config.get("version_policy") or {}).get("specific", {}).get("versions", [])
    if not all(str(v).isdecimal() for v in policy):
        config.pop("version_policy", None)
    resp = pb.ModelConfigResponse()
    json_format.ParseDict(config, resp.config, ignore_unknown_fields=True)
    return resp.SerializeToString()
