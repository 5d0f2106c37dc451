"""Issue 25's fork layers on the CPU at the sizes their published nets run them (pycaffe, one thread):
forward p50 of each layer alone, in milliseconds, and its share of what the data it touches costs to copy.

- Interp: PSPNet's classifier (150 classes, 60 x 60) zoomed by 8 to 473 x 473 (pspnet50_ADE20K_473).
- BN (PSPNet, frozen): conv5's 2048 x 60 x 60, in place.
- ROIPooling: VGG16's conv5_3 (512 x 38 x 50) and 300 regions pooled to 7 x 7 (py-faster-rcnn).
- PSROIPooling: R-FCN's 21 x 7 x 7 score maps (1029 x 38 x 50), 300 regions.
- Reorg: YOLOv2's passthrough (64 x 26 x 26, stride 2).

    .venv/bin/python bench/seg_det_layers.py [--iterations 20]

GPU kernel: none for these but PSROIPooling; in a GPU build each runs this CPU code (docs/model-families.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import caffe
import numpy as np

ROIS = 300

CASES = {
    "Interp zoom 8 (150 x 60 x 60 -> 473 x 473)": (
        'input: "x" input_shape { dim: 1 dim: 150 dim: 60 dim: 60 }\n'
        'layer { name: "l" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 8 } }\n', {}),
    "BN PSPNet frozen (2048 x 60 x 60, in place)": (
        'input: "x" input_shape { dim: 1 dim: 2048 dim: 60 dim: 60 }\n'
        'layer { name: "l" type: "BN" bottom: "x" top: "x" bn_param { slope_filler { type: "constant" value: 1 }'
        ' frozen: true } }\n', {}),
    f"ROIPooling 7 x 7 (512 x 38 x 50, {ROIS} regions)": (
        'input: "x" input_shape { dim: 1 dim: 512 dim: 38 dim: 50 }\n'
        f'input: "rois" input_shape {{ dim: {ROIS} dim: 5 }}\n'
        'layer { name: "l" type: "ROIPooling" bottom: "x" bottom: "rois" top: "y"\n'
        '  roi_pooling_param { pooled_h: 7 pooled_w: 7 spatial_scale: 0.0625 } }\n', {"rois": True}),
    f"PSROIPooling 7 x 7 (1029 x 38 x 50, {ROIS} regions)": (
        'input: "x" input_shape { dim: 1 dim: 1029 dim: 38 dim: 50 }\n'
        f'input: "rois" input_shape {{ dim: {ROIS} dim: 5 }}\n'
        'layer { name: "l" type: "PSROIPooling" bottom: "x" bottom: "rois" top: "y"\n'
        '  psroi_pooling_param { spatial_scale: 0.0625 output_dim: 21 group_size: 7 } }\n', {"rois": True}),
    "Reorg stride 2 (64 x 26 x 26)": (
        'input: "x" input_shape { dim: 1 dim: 64 dim: 26 dim: 26 }\n'
        'layer { name: "l" type: "Reorg" bottom: "x" top: "y" reorg_param { stride: 2 } }\n', {}),
}


def regions(rng: np.random.Generator, width: float = 800, height: float = 600) -> np.ndarray:
    x1, y1 = rng.uniform(0, width - 32, ROIS), rng.uniform(0, height - 32, ROIS)
    w, h = rng.uniform(16, 400, ROIS), rng.uniform(16, 300, ROIS)
    return np.stack([np.zeros(ROIS), x1, y1, np.minimum(x1 + w, width - 1), np.minimum(y1 + h, height - 1)],
                    axis=1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args()
    caffe.set_mode_cpu()
    rng = np.random.default_rng(0)
    print(f"{'layer':<52} {'p50 ms':>8} {'MB in+out':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (text, extra) in CASES.items():
            proto = Path(tmp) / "net.prototxt"
            proto.write_text(text)
            net = caffe.Net(str(proto), caffe.TEST)
            net.blobs["x"].data[...] = rng.uniform(-1, 1, net.blobs["x"].data.shape)
            if extra.get("rois"):
                net.blobs["rois"].data[...] = regions(rng)
            net.forward()  # warm up
            times = []
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                net.forward()
                times.append((time.perf_counter() - t0) * 1e3)
            touched = sum(b.data.nbytes for b in net.blobs.values()) / 2**20
            print(f"{name:<52} {statistics.median(times):8.2f} {touched:10.1f}")


if __name__ == "__main__":
    main()
