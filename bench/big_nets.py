"""FCN-size and pose-size Caffe nets with random (He-scaled) weights, for load-time benchmarks.

- `fcn8s`: shelhamer/fcn.berkeleyvision.org `voc-fcn8s/deploy.prototxt`'s layers: VGG16's 13 convolutions
  (conv1_1 padded by 100), fc6 as a 7×7 convolution to 4096, fc7 1×1 to 4096, Dropout, the 21-class scores
  of pool3, pool4 and fc7, the three Deconvolution upsamplings, Crop and Eltwise sums. ~540 MB of weights,
  as the published caffemodel. Served at `size`×`size` (500 in the paper; smaller keeps a CPU forward short).
- `openpose`: CMU-Perceptual-Computing-Lab/openpose `pose/coco/pose_deploy_linevec.prototxt`'s layers:
  VGG19's first ten convolutions, conv4_3_CPM / conv4_4_CPM, stage 1's two branches (3×3 convolutions, then
  1×1 to 38 PAFs and 19 heatmaps), and stages 2-6 (Concat, five 7×7 convolutions, two 1×1) per branch. ~200 MB,
  as the published caffemodel; served at 368×368 as OpenPose's demo does.

The shapes and weight sizes are the published nets'; the weights are random, which is all a load-time figure
needs (the converter's parity on these layer types is tested elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _conv(L, bottom, num_output: int, kernel: int, pad: int = 0):
    return L.Convolution(bottom, num_output=num_output, kernel_size=kernel, pad=pad)


def fcn8s(size: int = 500, classes: int = 21):
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, size, size]))
    x = n.data
    plan = [(1, 64, 2), (2, 128, 2), (3, 256, 3), (4, 512, 3), (5, 512, 3)]
    for stage, width, convs in plan:
        for i in range(1, convs + 1):
            name = f"conv{stage}_{i}"
            n[name] = _conv(L, x, width, 3, pad=100 if name == "conv1_1" else 1)
            n[f"relu{stage}_{i}"] = L.ReLU(n[name], in_place=True)
            x = n[name]
        n[f"pool{stage}"] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=2, stride=2)
        x = n[f"pool{stage}"]
    n.fc6 = _conv(L, x, 4096, 7)
    n.relu6 = L.ReLU(n.fc6, in_place=True)
    n.drop6 = L.Dropout(n.fc6, dropout_ratio=0.5, in_place=True)
    n.fc7 = _conv(L, n.fc6, 4096, 1)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.drop7 = L.Dropout(n.fc7, dropout_ratio=0.5, in_place=True)
    n.score_fr = _conv(L, n.fc7, classes, 1)
    up = dict(num_output=classes, bias_term=False)
    n.upscore2 = L.Deconvolution(n.score_fr, convolution_param=dict(kernel_size=4, stride=2, **up))
    n.score_pool4 = _conv(L, n.pool4, classes, 1)
    n.score_pool4c = L.Crop(n.score_pool4, n.upscore2, crop_param=dict(axis=2, offset=5))
    n.fuse_pool4 = L.Eltwise(n.upscore2, n.score_pool4c, operation=P.Eltwise.SUM)
    n.upscore_pool4 = L.Deconvolution(n.fuse_pool4, convolution_param=dict(kernel_size=4, stride=2, **up))
    n.score_pool3 = _conv(L, n.pool3, classes, 1)
    n.score_pool3c = L.Crop(n.score_pool3, n.upscore_pool4, crop_param=dict(axis=2, offset=9))
    n.fuse_pool3 = L.Eltwise(n.upscore_pool4, n.score_pool3c, operation=P.Eltwise.SUM)
    n.upscore8 = L.Deconvolution(n.fuse_pool3, convolution_param=dict(kernel_size=16, stride=8, **up))
    n.score = L.Crop(n.upscore8, n.data, crop_param=dict(axis=2, offset=31))
    return n


def openpose(size: int = 368):
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.image = L.Input(shape=dict(dim=[1, 3, size, size]))
    x = n.image
    for stage, width, convs in [(1, 64, 2), (2, 128, 2), (3, 256, 4), (4, 512, 2)]:
        for i in range(1, convs + 1):
            n[f"conv{stage}_{i}"] = _conv(L, x, width, 3, pad=1)
            n[f"relu{stage}_{i}"] = L.ReLU(n[f"conv{stage}_{i}"], in_place=True)
            x = n[f"conv{stage}_{i}"]
        if stage < 4:
            n[f"pool{stage}_stage1"] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=2, stride=2)
            x = n[f"pool{stage}_stage1"]
    n.conv4_3_CPM = _conv(L, x, 256, 3, pad=1)
    n.relu4_3_CPM = L.ReLU(n.conv4_3_CPM, in_place=True)
    n.conv4_4_CPM = _conv(L, n.conv4_3_CPM, 128, 3, pad=1)
    n.relu4_4_CPM = L.ReLU(n.conv4_4_CPM, in_place=True)
    features = n.conv4_4_CPM
    outs = {1: 38, 2: 19}  # L1: part affinity fields, L2: heatmaps
    last = {}
    for branch, out in outs.items():
        x = features
        for i in range(1, 4):
            name = f"conv5_{i}_CPM_L{branch}"
            n[name] = _conv(L, x, 128, 3, pad=1)
            n[f"relu5_{i}_CPM_L{branch}"] = L.ReLU(n[name], in_place=True)
            x = n[name]
        n[f"conv5_4_CPM_L{branch}"] = _conv(L, x, 512, 1)
        n[f"relu5_4_CPM_L{branch}"] = L.ReLU(n[f"conv5_4_CPM_L{branch}"], in_place=True)
        n[f"conv5_5_CPM_L{branch}"] = _conv(L, n[f"conv5_4_CPM_L{branch}"], out, 1)
        last[branch] = n[f"conv5_5_CPM_L{branch}"]
    for stage in range(2, 7):
        n[f"concat_stage{stage}"] = L.Concat(last[1], last[2], features, axis=1)
        for branch, out in outs.items():
            x = n[f"concat_stage{stage}"]
            for i in range(1, 6):
                name = f"Mconv{i}_stage{stage}_L{branch}"
                n[name] = _conv(L, x, 128, 7, pad=3)
                n[f"Mrelu{i}_stage{stage}_L{branch}"] = L.ReLU(n[name], in_place=True)
                x = n[name]
            n[f"Mconv6_stage{stage}_L{branch}"] = _conv(L, x, 128, 1)
            n[f"Mrelu6_stage{stage}_L{branch}"] = L.ReLU(n[f"Mconv6_stage{stage}_L{branch}"], in_place=True)
            n[f"Mconv7_stage{stage}_L{branch}"] = _conv(L, n[f"Mconv6_stage{stage}_L{branch}"], out, 1)
            last[branch] = n[f"Mconv7_stage{stage}_L{branch}"]
    n.net_output = L.Concat(last[2], last[1], axis=1)
    return n


def write(netspec, directory: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    """NAME.prototxt and NAME.caffemodel with He-scaled random weights (activations stay O(1))."""
    import caffe

    directory.mkdir(parents=True, exist_ok=True)
    proto = directory / f"{name}.prototxt"
    proto.write_text(str(netspec.to_proto()))
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        w = blobs[0].data
        fan_in = int(np.prod(w.shape[1:]))
        w[...] = rng.normal(0, np.sqrt(2.0 / fan_in), w.shape).astype(np.float32)
        if len(blobs) > 1:
            blobs[1].data[...] = 0.01
    weights = directory / f"{name}.caffemodel"
    net.save(str(weights))
    return proto, weights
