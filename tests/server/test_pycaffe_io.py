"""Our pycaffe's caffe.io works as Caffe's examples use it (the sdist's io.py, as shipped, passes
scikit-image a removed `as_grey` and lost its `resize` import; the install repairs both)."""

from __future__ import annotations

import caffe.io
import numpy as np
from PIL import Image


def test_load_image_reads_a_file_as_float_rgb_or_grey(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(pixels, "RGB").save(path)
    rgb = caffe.io.load_image(str(path))
    assert rgb.dtype == np.float32 and rgb.shape == (6, 8, 3)
    assert np.allclose(rgb, pixels / 255.0, atol=1e-7)
    grey = caffe.io.load_image(str(path), color=False)
    assert grey.shape == (6, 8, 1) and 0.0 <= grey.min() and grey.max() <= 1.0


def test_transformer_preprocess_resizes_to_the_input():
    img = np.random.default_rng(1).uniform(0, 1, (20, 30, 3)).astype(np.float32)  # as load_image returns it
    t = caffe.io.Transformer({"data": (1, 3, 8, 10)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    blob = t.preprocess("data", img)
    assert blob.shape == (3, 8, 10) and blob.dtype == np.float32
    assert -130.0 <= blob.min() and blob.max() <= 160.0
    assert caffe.io.resize_image(np.ones((5, 5, 1), np.float32), (9, 7)).shape == (9, 7, 1)
