"""What comes back over HTTP is what pycaffe computes: outputs equal a direct Net.forward() (max |Δ| ≤ 1e-6).

The nets are built with NetSpec and seeded random weights so that every layer type a zoo model
uses appears at least once; the reference is a fresh `caffe.Net` in this process (nets.forward).
"""

from __future__ import annotations

import json

import caffe
import numpy as np
import pytest
from caffe import layers as L

from caffe_testing.nets import forward, save_net, zoo_net
from caffe_testing.servers import ServerProcess, http, http_json

TOL = 1e-6


def typed_net() -> caffe.NetSpec:
    """Three inputs whose config datatypes are FP64, INT32 and UINT8; `joined` shows their float32 values."""
    n = caffe.NetSpec()
    n.a = L.Input(shape=dict(dim=[1, 4]))
    n.b = L.Input(shape=dict(dim=[1, 4]))
    n.c = L.Input(shape=dict(dim=[1, 4]))
    n.joined = L.Concat(n.a, n.b, n.c, axis=1)  # an output: nothing consumes it
    n.mixed = L.Concat(n.a, n.b, n.c, axis=1)
    n.ip = L.InnerProduct(n.mixed, num_output=3)
    return n


@pytest.fixture(scope="module")
def zoo(tmp_model_dir):
    proto, weights = save_net(zoo_net(), tmp_model_dir, "zoo", seed=3)
    # pycaffe itself: this is the server's parity with a direct forward (ONNX Runtime has its own tests)
    cfg = {"name": "zoo", "backend": "pycaffe", "model": {"prototxt": str(proto), "weights": str(weights)}}
    with ServerProcess(cfg, tmp_model_dir) as server:
        yield server, proto, weights


def json_infer(url: str, model: str, inputs: list[dict], **extra) -> dict:
    status, body = http_json("POST", f"{url}/v2/models/{model}/infer", {"inputs": inputs, **extra})
    assert status == 200, body
    return body


def tensor(out: dict) -> np.ndarray:
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def assert_matches(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert set(got) == set(ref)
    for name, r in ref.items():
        assert got[name].shape == r.shape, name
        delta = float(np.abs(got[name] - r).max())
        assert delta <= TOL, f"{name}: max |Δ| {delta}"


def test_metadata_lists_every_output_with_caffe_ceil_rounded_pooling_shape(zoo):
    server, _, _ = zoo
    status, meta = http_json("GET", server.url + "/v2/models/zoo")
    assert status == 200
    assert meta["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 3, 15, 15]}]
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes == {"prob": [-1, 10], "feat": [-1, 5], "pooled": [-1, 3, 8, 8]}


def test_flat_fp32_json_equals_direct_forward_for_every_output(zoo):
    server, proto, weights = zoo
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 15, 15)).astype(np.float32)
    body = json_infer(server.url, "zoo", [{"name": "data", "shape": [1, 3, 15, 15], "datatype": "FP32",
                                            "data": x.ravel().tolist()}])
    assert body["model_name"] == "zoo" and body["model_version"] == "1"
    got = {o["name"]: tensor(o) for o in body["outputs"]}
    assert all(o["datatype"] == "FP32" for o in body["outputs"])
    assert_matches(got, forward(proto, weights, {"data": x}))
    assert got["prob"].sum() == pytest.approx(1.0, abs=1e-5)


def test_nested_data_with_batch_of_three_equals_direct_forward(zoo):
    server, proto, weights = zoo
    x = np.random.default_rng(1).normal(0, 1, (3, 3, 15, 15)).astype(np.float32)
    body = json_infer(server.url, "zoo", [{"name": "data", "shape": [3, 3, 15, 15], "datatype": "FP32",
                                            "data": x.tolist()}], id="req-7")
    assert body["id"] == "req-7"
    got = {o["name"]: tensor(o) for o in body["outputs"]}
    ref = forward(proto, weights, {"data": x})
    assert_matches(got, ref)
    assert got["pooled"].shape == (3, 3, 8, 8)
    # each item's result is its own: item 1 alone gives the same as item 1 in the batch
    single = forward(proto, weights, {"data": x[1:2]})
    assert np.abs(got["prob"][1:2] - single["prob"]).max() <= TOL


def test_a_batch_size_that_changes_between_requests_still_equals_direct_forward(zoo):
    """The CPU backend writes into input arrays it keeps between requests (backends/pycaffe.py): each
    reshape, to a larger batch and back, must leave every answer the Net's own."""
    server, proto, weights = zoo
    rng = np.random.default_rng(9)
    for batch in (1, 3, 1, 1, 2, 3, 3):
        x = rng.normal(0, 1, (batch, 3, 15, 15)).astype(np.float32)
        body = json_infer(server.url, "zoo", [{"name": "data", "shape": list(x.shape), "datatype": "FP32",
                                                "data": x.ravel().tolist()}])
        assert_matches({o["name"]: tensor(o) for o in body["outputs"]}, forward(proto, weights, {"data": x}))


def test_requested_outputs_return_only_those_in_request_order(zoo):
    server, proto, weights = zoo
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 15, 15)).astype(np.float32)
    body = json_infer(server.url, "zoo", [{"name": "data", "shape": [2, 3, 15, 15], "datatype": "FP32",
                                            "data": x.ravel().tolist()}],
                      outputs=[{"name": "feat"}, {"name": "prob"}])
    assert [o["name"] for o in body["outputs"]] == ["feat", "prob"]
    ref = forward(proto, weights, {"data": x})
    assert_matches({o["name"]: tensor(o) for o in body["outputs"]}, {k: ref[k] for k in ("feat", "prob")})


def binary_request(inputs: dict[str, np.ndarray], outputs: list[str], datatype: str = "FP32") -> tuple[bytes, dict]:
    """A request in the binary tensor data extension: JSON header, then each input's raw bytes."""
    header = {
        "inputs": [{"name": k, "shape": list(v.shape), "datatype": datatype,
                    "parameters": {"binary_data_size": v.nbytes}} for k, v in inputs.items()],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs],
    }
    head = json.dumps(header).encode()
    body = head + b"".join(np.ascontiguousarray(v).tobytes() for v in inputs.values())
    return body, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def parse_binary_response(headers: dict, body: bytes) -> dict[str, np.ndarray]:
    n = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
    head, pos, out = json.loads(body[:n]), n, {}
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        assert "data" not in o
        out[o["name"]] = np.frombuffer(body[pos:pos + size], dtype=np.float32).reshape(o["shape"])
        pos += size
    assert pos == len(body), "bytes left over after the last output"
    return out


def test_binary_tensor_extension_in_and_out_equals_direct_forward(zoo):
    server, proto, weights = zoo
    x = np.random.default_rng(4).normal(0, 1, (2, 3, 15, 15)).astype(np.float32)
    body, headers = binary_request({"data": x}, ["prob", "feat", "pooled"])
    status, resp_headers, resp = http("POST", server.url + "/v2/models/zoo/infer", body, headers)
    assert status == 200, resp
    assert_matches(parse_binary_response(resp_headers, resp), forward(proto, weights, {"data": x}))


def test_binary_input_with_json_output_and_mixed_output_encodings(zoo):
    server, proto, weights = zoo
    x = np.random.default_rng(5).normal(0, 1, (1, 3, 15, 15)).astype(np.float32)
    body, headers = binary_request({"data": x}, [])
    header_len = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:header_len])
    head["outputs"] = [{"name": "prob", "parameters": {"binary_data": False}},
                       {"name": "feat", "parameters": {"binary_data": True}}]
    new_head = json.dumps(head).encode()
    status, rh, resp = http("POST", server.url + "/v2/models/zoo/infer", new_head + body[header_len:],
                            {"Inference-Header-Content-Length": str(len(new_head))})
    assert status == 200, resp
    n = int({k.lower(): v for k, v in rh.items()}["inference-header-content-length"])
    meta = json.loads(resp[:n])
    prob_out, feat_out = meta["outputs"]
    ref = forward(proto, weights, {"data": x})
    assert np.abs(tensor(prob_out) - ref["prob"]).max() <= TOL
    feat = np.frombuffer(resp[n:], dtype=np.float32).reshape(feat_out["shape"])
    assert feat_out["parameters"]["binary_data_size"] == len(resp) - n
    assert np.abs(feat - ref["feat"]).max() <= TOL


@pytest.fixture(scope="module")
def typed(tmp_model_dir):
    proto, weights = save_net(typed_net(), tmp_model_dir, "typed", seed=5)
    cfg = {
        "name": "typed",
        "model": {"prototxt": str(proto), "weights": str(weights)},
        "inputs": [{"name": "a", "datatype": "FP64"}, {"name": "b", "datatype": "INT32"},
                   {"name": "c", "datatype": "UINT8"}],
    }
    with ServerProcess(cfg, tmp_model_dir) as server:
        yield server, proto, weights


def typed_values(batch: int):
    rng = np.random.default_rng(9)
    a = rng.normal(0, 1, (batch, 4))  # float64 values float32 cannot hold exactly
    a[0, 0] = 0.1
    b = np.array([[-(2**31), 2**24 + 1, 7, -3]] * batch, dtype=np.int32)  # 2^24+1 rounds to 2^24 in float32
    c = rng.integers(0, 256, (batch, 4)).astype(np.uint8)
    c[0, :2] = [0, 255]
    return a, b, c


def test_fp64_int32_uint8_inputs_convert_to_float32_exactly_json(typed):
    server, proto, weights = typed
    status, meta = http_json("GET", server.url + "/v2/models/typed")
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("a", "FP64"), ("b", "INT32"), ("c", "UINT8")]
    a, b, c = typed_values(2)
    body = json_infer(server.url, "typed", [
        {"name": "a", "shape": [2, 4], "datatype": "FP64", "data": a.tolist()},
        {"name": "b", "shape": [2, 4], "datatype": "INT32", "data": b.ravel().tolist()},
        {"name": "c", "shape": [2, 4], "datatype": "UINT8", "data": c.tolist()},
    ])
    got = {o["name"]: tensor(o) for o in body["outputs"]}
    expected_joined = np.concatenate([a.astype(np.float32), b.astype(np.float32), c.astype(np.float32)], axis=1)
    assert np.array_equal(got["joined"], expected_joined)
    ref = forward(proto, weights, {"a": a.astype(np.float32), "b": b.astype(np.float32), "c": c.astype(np.float32)})
    assert_matches(got, ref)


def test_fp64_int32_uint8_inputs_as_binary_tensors(typed):
    server, proto, weights = typed
    a, b, c = typed_values(3)
    header = {
        "inputs": [{"name": n, "shape": list(v.shape), "datatype": dt, "parameters": {"binary_data_size": v.nbytes}}
                   for n, v, dt in (("a", a, "FP64"), ("b", b, "INT32"), ("c", c, "UINT8"))],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header).encode()
    status, rh, resp = http("POST", server.url + "/v2/models/typed/infer",
                            head + a.tobytes() + b.tobytes() + c.tobytes(),
                            {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200, resp
    got = parse_binary_response(rh, resp)
    f32 = {"a": a.astype(np.float32), "b": b.astype(np.float32), "c": c.astype(np.float32)}
    assert np.array_equal(got["joined"], np.concatenate(list(f32.values()), axis=1))
    assert_matches(got, forward(proto, weights, f32))


@pytest.mark.parametrize("name,datatype,values", [
    ("c", "UINT8", [0, 255, 300, 1]),  # 300 would wrap to 44
    ("c", "UINT8", [0, -1, 2, 1]),  # -1 would wrap to 255
    ("b", "INT32", [0, 2**40, 2, 1]),  # would wrap to 0
    ("b", "INT32", [0, 2.7, 2, 1]),  # would truncate to 2
], ids=["uint8-over", "uint8-negative", "int32-over", "int32-fraction"])
def test_integer_values_the_declared_datatype_cannot_hold_are_400_not_silently_changed(typed, name, datatype, values):
    server, _, _ = typed
    a, b, c = typed_values(1)
    inputs = {"a": ("FP64", a.ravel().tolist()), "b": ("INT32", b.ravel().tolist()), "c": ("UINT8", c.ravel().tolist())}
    inputs[name] = (datatype, values)
    status, body = http_json("POST", server.url + "/v2/models/typed/infer", {"inputs": [
        {"name": n, "shape": [1, 4], "datatype": dt, "data": d} for n, (dt, d) in inputs.items()]})
    assert status == 400, body
    assert f"'{name}'" in body["error"] and datatype in body["error"]
