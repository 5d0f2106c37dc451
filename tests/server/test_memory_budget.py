"""The memory budget's decisions and messages, and what a load call's parameters may carry (pure functions;
the servers' own answers are in test_repository.py)."""

from __future__ import annotations

import pytest

from inference_server.errors import BadRequest, grpc_status_name
from inference_server.serving.memory import (
    ESTIMATE_EXTRA_MAX,
    ESTIMATE_FACTOR,
    ESTIMATE_FLOOR,
    InsufficientMemory,
    MemoryBudget,
    estimate_bytes,
)
from inference_server.serving.repository import config_parameter, index_ready_only

MiB = 2**20


def test_a_load_past_the_budget_is_a_507_naming_what_it_needs_and_what_is_held():
    budget = MemoryBudget(host=100 * MiB)
    budget.check("a", host_used=60 * MiB, host_more=40 * MiB)  # exactly full fits
    with pytest.raises(InsufficientMemory) as e:
        budget.check("big", host_used=60 * MiB, host_more=41 * MiB, measured=True)
    assert e.value.status_code == 507 and grpc_status_name(507) == "RESOURCE_EXHAUSTED"
    assert e.value.message == ("model 'big' does not fit in this server's memory budget: it needs 41.0 MiB (measured), "
                               "loaded models hold 60.0 MiB of 100.0 MiB (--memory-bytes); unload a model or load it "
                               "on another server")
    MemoryBudget().check("any", host_used=10**12, host_more=10**12)  # no budget: no limit


def test_the_gpu_budget_is_its_own():
    budget = MemoryBudget(host=None, gpu=8 * MiB)
    budget.check("a", 0, 10**9, gpu_used=4 * MiB, gpu_more=4 * MiB, device_id=0)
    with pytest.raises(InsufficientMemory, match="does not fit in GPU 0's memory budget: it needs 5.0 MiB"):
        budget.check("b", 0, 0, gpu_used=4 * MiB, gpu_more=5 * MiB, device_id=0)


def test_the_estimate_is_the_weights_size_times_the_factor_per_instance(tmp_path):
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(b"\0" * (10 * MiB))
    assert estimate_bytes(str(weights), 2) == int(10 * MiB * ESTIMATE_FACTOR) * 2
    big = tmp_path / "big.caffemodel"
    with open(big, "wb") as f:  # sparse: 400 MiB of weights, the extra over them bounded
        f.truncate(400 * MiB)
    assert estimate_bytes(str(big), 1) == 400 * MiB + ESTIMATE_EXTRA_MAX
    tiny = tmp_path / "tiny.caffemodel"
    tiny.write_bytes(b"\0" * 100)
    assert estimate_bytes(str(tiny), 1) == ESTIMATE_FLOOR


def test_what_a_load_call_may_carry():
    assert config_parameter({}) is None
    assert config_parameter({"config": ""}) is None
    assert config_parameter({"config": '{"instances": 2}'}) == {"instances": 2}  # Triton's: a JSON string
    assert config_parameter({"config": {"instances": 2}}) == {"instances": 2}  # an object is taken too
    for params, words in (({"config": "[1]"}, "must be a JSON object"),
                          ({"config": "{"}, "not valid JSON"),
                          ({"file:1/model.caffemodel": b"x"}, "files in a load call are not supported"),
                          ({"replicas": 2}, "unknown load parameter(s) replicas")):
        with pytest.raises(BadRequest, match=words.replace("(", r"\(").replace(")", r"\)")):
            config_parameter(params)
    assert index_ready_only(b"") is False and index_ready_only(b'{"ready": true}') is True
    with pytest.raises(BadRequest, match="'ready' must be true or false"):
        index_ready_only(b'{"ready": "yes"}')
