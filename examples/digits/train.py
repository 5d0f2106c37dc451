"""Train the digits example with pycaffe's own SGD solver and write everything the server needs.

    .venv/bin/python examples/digits/train.py        # 10-20 s on 2 cores

Writes, next to this file: deploy.prototxt, digits.caffemodel, labels.txt and server.yaml (with the
files' sha256s). The train net and solver prototxts are generated into a temporary folder. Training is
seeded (Caffe's filler seed and numpy's shuffling), and the script checks the saved model on the
held-out split with a plain `caffe.Net(deploy, TEST, weights=...)` forward, failing below 97%.

The net sees exactly what the server feeds it (see data.py): 8-bit grayscale pixels p →
((p / 255) × RAW_SCALE − MEAN_VALUE) × SCALE. Clients may upscale the 8×8 image before sending and the
server shrinks it back with an antialiasing filter, which blurs it a little; so besides the plain 8×8
images, training also sees each image after such a round trip (upscaled nearest or bilinear, shrunk
bilinear or box) and shifted by a pixel, which keeps accuracy on those renders close to the plain one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("GLOG_minloglevel", "2")  # keep Caffe's per-layer setup log out of the output

import caffe  # noqa: E402
from caffe import (
    layers as L,  # noqa: E402
    params as P,  # noqa: E402
)
from caffe.proto import caffe_pb2  # noqa: E402
from google.protobuf import text_format  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data  # noqa: E402

SEED = 0
BATCH = 64
MAX_ITER = 3000
MIN_ACCURACY = 0.97


def net_body(n: caffe.NetSpec, phase_train: bool) -> None:
    """conv3x3(16) → ReLU → maxpool 2 → conv3x3(32) → ReLU → maxpool 2 → fc 64 → ReLU → fc 10 (`logits`)."""
    xavier = dict(type="xavier")
    zero = dict(type="constant", value=0)
    lr = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
    n.conv1 = L.Convolution(n.data, num_output=16, kernel_size=3, pad=1, weight_filler=xavier, bias_filler=zero,
                            param=lr)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)  # 8×8 → 4×4
    n.conv2 = L.Convolution(n.pool1, num_output=32, kernel_size=3, pad=1, weight_filler=xavier, bias_filler=zero,
                            param=lr)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool2 = L.Pooling(n.relu2, pool=P.Pooling.MAX, kernel_size=2, stride=2)  # 4×4 → 2×2
    n.fc1 = L.InnerProduct(n.pool2, num_output=64, weight_filler=xavier, bias_filler=zero, param=lr)
    n.relu3 = L.ReLU(n.fc1, in_place=True)
    if phase_train:
        n.drop1 = L.Dropout(n.relu3, dropout_ratio=0.2, in_place=True)
    n.logits = L.InnerProduct(n.relu3, num_output=10, weight_filler=xavier, bias_filler=zero, param=lr)


def train_net_proto(batch: int) -> caffe_pb2.NetParameter:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 1, data.IMAGE_SIZE, data.IMAGE_SIZE]))
    n.label = L.Input(shape=dict(dim=[batch]))
    net_body(n, phase_train=True)
    n.loss = L.SoftmaxWithLoss(n.logits, n.label)
    proto = n.to_proto()
    proto.name = "digits_train"
    return proto


def deploy_net_proto() -> caffe_pb2.NetParameter:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, data.IMAGE_SIZE, data.IMAGE_SIZE]))
    net_body(n, phase_train=False)
    n.prob = L.Softmax(n.logits)
    proto = n.to_proto()
    proto.name = "digits"
    return proto


def solver_proto(train_net: Path) -> caffe_pb2.SolverParameter:
    s = caffe_pb2.SolverParameter()
    s.train_net = str(train_net)
    s.type = "SGD"
    s.base_lr = 0.02
    s.momentum = 0.9
    s.weight_decay = 5e-4
    s.lr_policy = "step"
    s.gamma = 0.1
    s.stepsize = int(MAX_ITER * 0.7)
    s.max_iter = MAX_ITER
    s.display = 0
    s.snapshot_after_train = False
    s.random_seed = SEED
    s.solver_mode = caffe_pb2.SolverParameter.CPU
    return s


def round_trip(gray8: np.ndarray, size: int, up: str, down: str) -> np.ndarray:
    """An 8×8 image upscaled to size×size and shrunk back to 8×8, as a client's render meets the server."""
    img = Image.fromarray(gray8).resize((size, size), data.RESAMPLING[up])
    return np.asarray(img.resize((data.IMAGE_SIZE, data.IMAGE_SIZE), data.RESAMPLING[down]))


def shift(gray8: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move the image by (dy, dx) pixels, filling with background (0)."""
    out = np.zeros_like(gray8)
    h, w = gray8.shape
    src = gray8[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = src
    return out


def augmented(images: np.ndarray, labels: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Each training image as sent (8×8), after two random resize round trips, and shifted by one pixel."""
    gray = data.to_gray8(images)
    variants = [gray]
    for _ in range(2):
        variants.append(np.stack([
            round_trip(g, int(rng.randint(9, 65)), rng.choice(["nearest", "bilinear"]), rng.choice(["bilinear", "box"]))
            for g in gray
        ]))
    variants.append(np.stack([shift(g, *rng.choice([-1, 0, 1], size=2)) for g in gray]))
    x = np.concatenate(variants)
    y = np.tile(labels, len(variants))
    return data.preprocess(x)[:, None, :, :], y.astype(np.float32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def accuracy(deploy: Path, weights: Path, blobs: np.ndarray, labels: np.ndarray) -> float:
    """Held-out accuracy of the saved model, by a plain pycaffe forward of the whole split at once."""
    net = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
    net.blobs["data"].reshape(*blobs.shape)
    net.blobs["data"].data[...] = blobs
    prob = net.forward()["prob"]
    return float((prob.argmax(axis=1) == labels).mean())


def server_yaml(prototxt: Path, weights: Path, labels: Path) -> str:
    return f"""\
# The digits example model, written by train.py (rerun it to retrain; the sha256s follow the files).
# A client sends a digit as a grayscale PNG (8x8, or upscaled) in a BYTES input and asks for
# `classification: 1` on `prob` to get "score:index:label" back.
name: digits
version: "1"
model:
  prototxt: {prototxt.name}
  prototxtSha256: {sha256(prototxt)}
  weights: {weights.name}
  weightsSha256: {sha256(weights)}
  labels: {labels.name}
preprocessing:
  color: false            # decode as grayscale
  imageSize: [{data.IMAGE_SIZE}, {data.IMAGE_SIZE}]       # any larger image is resized to 8x8
  rawScale: {data.RAW_SCALE}          # [0,1] pixel x 16: the dataset's own 0..16 units
  meanValues: [{data.MEAN_VALUE}]       # about the training images' mean pixel
  scale: {data.SCALE}             # about 1 / their standard deviation
inputs:
  - name: data
    shape: [1, 1, {data.IMAGE_SIZE}, {data.IMAGE_SIZE}]
    datatype: FP32
outputs:
  - name: prob
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder to write the model files into (default: here)")
    ap.add_argument("--iters", type=int, default=MAX_ITER)
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    caffe.set_mode_cpu()
    caffe.set_random_seed(SEED)
    rng = np.random.RandomState(SEED)
    split = data.split()
    x_train, y_train = augmented(split.train_images, split.train_labels, rng)

    with tempfile.TemporaryDirectory(prefix="digits-train-") as tmp:
        train_path = Path(tmp) / "train.prototxt"
        solver_path = Path(tmp) / "solver.prototxt"
        train_path.write_text(str(train_net_proto(BATCH)))
        solver = solver_proto(train_path)
        solver.max_iter = args.iters
        solver.stepsize = max(1, int(args.iters * 0.7))
        solver_path.write_text(text_format.MessageToString(solver))
        sgd = caffe.get_solver(str(solver_path))

        order = rng.permutation(len(x_train))
        pos = 0
        for it in range(args.iters):
            if pos + BATCH > len(order):
                order, pos = rng.permutation(len(x_train)), 0
            idx = order[pos:pos + BATCH]
            pos += BATCH
            sgd.net.blobs["data"].data[...] = x_train[idx]
            sgd.net.blobs["label"].data[...] = y_train[idx]
            sgd.step(1)
            if (it + 1) % 500 == 0:
                print(f"iter {it + 1}: loss {float(sgd.net.blobs['loss'].data):.4f}", flush=True)

        deploy_path = out / "deploy.prototxt"
        weights_path = out / "digits.caffemodel"
        deploy_path.write_text(str(deploy_net_proto()))
        deploy = caffe.Net(str(deploy_path), caffe.TEST)
        for name, params in deploy.params.items():
            for dst, src in zip(params, sgd.net.params[name], strict=True):
                dst.data[...] = src.data
        deploy.save(str(weights_path))

    labels_path = out / "labels.txt"
    labels_path.write_text("".join(f"{d}\n" for d in range(10)))
    (out / "server.yaml").write_text(server_yaml(deploy_path, weights_path, labels_path))

    acc = accuracy(deploy_path, weights_path, data.to_blob(split.test_images), split.test_labels)
    print(f"held-out accuracy: {acc:.4f} ({len(split.test_labels)} digits); wrote {weights_path} "
          f"({weights_path.stat().st_size} bytes)")
    if acc < MIN_ACCURACY:
        print(f"accuracy below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
