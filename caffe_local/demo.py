"""`caffeserve demo MANIFEST`: local mode plus one real request, then everything stops.

Runs `caffeserve up MANIFEST` (in this process), takes a handwritten digit from scikit-learn's
digits (a held-out one when the manifest's folder has the digits example's `data.py`), sends it
through the gateway as a PNG, prints the predicted digit beside the true one, and stops the
gateway and the servers. Exit code 0 when the prediction came back (right or wrong).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import random
import sys
import urllib.request
from pathlib import Path

import orjson

from caffe_http.access_log import configure_logging
from caffe_http.lifecycle import install_uvloop

from .main import parser, run


def pick_digit(manifest: Path, index: int | None) -> tuple[bytes, int, str]:
    """(PNG bytes, true digit, where it came from)."""
    data_py = manifest.resolve().parent / "data.py"
    if data_py.is_file():  # the digits example: a digit its training never saw, rendered its way
        spec = importlib.util.spec_from_file_location("caffeserve_demo_digits_data", data_py)
        data = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(data)
        images, labels = data.held_out()
        i = random.randrange(len(images)) if index is None else index % len(images)
        return data.render_png(images[i], 32), int(labels[i]), f"held-out digit #{i}"
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    i = random.randrange(len(digits.images)) if index is None else index % len(digits.images)
    pixels = (digits.images[i] * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue(), int(digits.target[i]), f"scikit-learn digit #{i}"


def classify(base_url: str, model: str, png: bytes) -> str:
    """Ask for the top class of `png`: the server answers "score:index:label"."""
    with urllib.request.urlopen(f"{base_url}/v2/models/{model}", timeout=30) as r:
        meta = orjson.loads(r.read())
    request = {
        "inputs": [{"name": meta["inputs"][0]["name"], "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(png).decode()]}],
        "outputs": [{"name": meta["outputs"][0]["name"], "parameters": {"classification": 1}}],
    }
    req = urllib.request.Request(f"{base_url}/v2/models/{model}/infer", data=orjson.dumps(request),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = orjson.loads(r.read())
    return answer["outputs"][0]["data"][0]


def main(argv: list[str] | None = None) -> int:
    p = parser("caffeserve demo")
    p.description = __doc__
    p.add_argument("--index", type=int, help="which digit to send (default: a random one)")
    p.set_defaults(port=0, grpc_port=0)  # any free ports: the demo never collides with a running server
    for action in p._actions:  # say so in --help
        if action.dest in ("port", "grpc_port"):
            action.help = action.help.split(" (default")[0] + " (default 0 here: any free port)"
    args = p.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    png, truth, source = pick_digit(args.manifest, args.index)
    outcome: dict[str, str] = {}

    async def one_request(port: int) -> int:
        url = f"http://127.0.0.1:{port}"

        def ask() -> tuple[str, str]:  # blocking HTTP, off the loop that runs the gateway
            with urllib.request.urlopen(f"{url}/v2/models", timeout=10) as r:
                model = orjson.loads(r.read())["models"][0]
            return model, classify(url, model, png)

        try:
            model, top = await asyncio.to_thread(ask)
        except Exception as e:  # noqa: BLE001 - the demo reports any failure and still stops cleanly
            print(f"demo: the request failed: {e}", file=sys.stderr, flush=True)
            return 1
        score, _, label = top.split(":", 2)
        outcome["line"] = (f"sent {source} through {url}/v2/models/{model}/infer: "
                           f"predicted {label} (score {float(score):.3f}), true digit {truth}")
        print(outcome["line"], flush=True)
        return 0

    install_uvloop()
    rc = asyncio.run(run(args, on_ready=one_request))
    if "line" in outcome:
        print("demo: done; gateway and servers stopped", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
