"""tritonclient.http and tritonclient.grpc, unchanged, against a served Faster-R-CNN-shaped net with two inputs
(data, im_info); run by tests/server/test_seg_det_serving.py in its own process (tritonclient.grpc's stubs and
ours must not share one). argv: HTTP_PORT GRPC_PORT CASES.npz; prints OK when every answer equals pycaffe's."""

import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http_port, grpc_port, cases = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
OUTPUTS = ("rois", "cls_prob", "bbox_pred")

for module, client in ((httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")),
                       (grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"))):
    assert client.is_model_ready("frcnn")
    meta = client.get_model_metadata("frcnn")
    inputs = meta["inputs"] if isinstance(meta, dict) else [{"name": t.name} for t in meta.inputs]
    assert sorted(t["name"] for t in inputs) == ["data", "im_info"], inputs
    feeds = []
    for name in ("data", "im_info"):
        t = module.InferInput(name, list(cases[name].shape), "FP32")
        t.set_data_from_numpy(cases[name])
        feeds.append(t)
    r = client.infer("frcnn", feeds, outputs=[module.InferRequestedOutput(o) for o in OUTPUTS])
    for name in OUTPUTS:
        got = r.as_numpy(name)
        assert got.shape == cases[name].shape, (module.__name__, name, got.shape, cases[name].shape)
        assert np.array_equal(got, cases[name]), (module.__name__, name, float(np.abs(got - cases[name]).max()))
print("OK")
