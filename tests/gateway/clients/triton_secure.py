"""tritonclient.http and tritonclient.grpc, unchanged, with `ssl=True` (and a bearer token when given)
through the gateway; run by tests/gateway/test_gateway_tls.py and test_gateway_auth.py in its own
process (tritonclient.grpc's stubs and ours must not share one).
argv: HTTP_PORT GRPC_PORT CA_FILE TOKEN ("": none) CASES.npz (blobs `x` (N, 1, 8, 8), their `labels`);
exit 0 = all good."""

import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

http_port, grpc_port, ca, token, cases = sys.argv[1:6]
cases = np.load(cases)
x, labels = cases["x"], cases["labels"]
# a fresh dict per call: tritonclient.http adds its own headers to the one it is given
def headers():
    return {"authorization": f"Bearer {token}"} if token else None


h = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", ssl=True, ssl_options={"ca_certs": ca})
g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=ca)
assert h.is_server_ready() and g.is_server_ready()  # the health calls need no token

right = 0
for i in range(len(x)):
    hi = httpclient.InferInput("data", [1, 1, 8, 8], "FP32")
    hi.set_data_from_numpy(x[i:i + 1], binary_data=True)
    right += int(np.argmax(h.infer("digits", [hi], headers=headers()).as_numpy("prob")[0]) == labels[i])
    gi = grpcclient.InferInput("data", [1, 1, 8, 8], "FP32")
    gi.set_data_from_numpy(x[i:i + 1])
    right += int(np.argmax(g.infer("digits", [gi], headers=headers()).as_numpy("prob")[0]) == labels[i])
assert right >= 0.9 * 2 * len(x), right

if token:  # without the token: refused, with the gateway's message
    for call, status in ((lambda: h.infer("digits", [hi]), "401"),
                         (lambda: g.infer("digits", [gi]), "StatusCode.UNAUTHENTICATED")):
        try:
            call()
            raise AssertionError("a call without a token was answered")
        except InferenceServerException as e:
            assert str(e.status()) == status and "Bearer" in e.message(), (e.status(), e.message())
h.close()
g.close()
print("ok")
