"""The digits example's data: scikit-learn's bundled 8×8 digits, one fixed held-out split, and the
pixel math shared by training, the server config and the tests.

A client sends a digit as a grayscale PNG: the dataset's 8×8 image (values 0–16) scaled to 0–255,
or that image upscaled to any size. The server decodes it as grayscale, resizes it to 8×8 and turns
each pixel p (0–255) into ((p / 255) × RAW_SCALE − MEAN_VALUE) × SCALE, as `server.yaml`'s
preprocessing says. Training feeds the net exactly that, computed from the same uint8 pixels a
rendered PNG carries, so a served 8×8 PNG reaches the net as the very input the net was trained on.

Importable without Caffe (tests and the demo only need numpy, Pillow and scikit-learn).
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image

IMAGE_SIZE = 8  # the dataset's images are 8×8; the net's input blob is (N, 1, 8, 8)
DATASET_MAX = 16.0  # the dataset's pixel values run 0..16
# Preprocessing (mirrored in server.yaml, which train.py writes from these constants):
RAW_SCALE = 16.0  # [0, 1] pixel × 16 → back to the dataset's own 0..16 units
MEAN_VALUE = 4.9  # ≈ the training images' mean pixel (4.88)
SCALE = 0.16  # ≈ 1 / the training images' pixel std (6.0), so inputs have unit spread
TEST_SIZE = 0.2
SPLIT_SEED = 0

RESAMPLING = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX}


class Split(NamedTuple):
    """Images are float arrays (N, 8, 8) in the dataset's 0..16 units; labels are int (N,)."""

    train_images: np.ndarray
    test_images: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray


def split() -> Split:
    """The one fixed split: 80% train / 20% held out, stratified by digit, random_state 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    parts = train_test_split(
        digits.images, digits.target, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=digits.target
    )
    return Split(*parts)


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits (360 of 1797): images (N, 8, 8) in 0..16 and their labels."""
    s = split()
    return s.test_images, s.test_labels


def to_gray8(image: np.ndarray) -> np.ndarray:
    """A dataset image (0..16) as 8-bit grayscale pixels (0..255), rounded to nearest."""
    return np.rint(np.asarray(image, dtype=np.float64) * (255.0 / DATASET_MAX)).astype(np.uint8)


def preprocess(gray8: np.ndarray) -> np.ndarray:
    """8-bit grayscale pixels (..., 8, 8) → the net's float32 input, the server's math step by step:
    p / 255 → × RAW_SCALE → − MEAN_VALUE → × SCALE."""
    x = np.asarray(gray8, dtype=np.float32) * np.float32(1.0 / 255.0)
    x = x * np.float32(RAW_SCALE)
    x = x - np.float32(MEAN_VALUE)
    return x * np.float32(SCALE)


def to_blob(images: np.ndarray) -> np.ndarray:
    """Dataset images (N, 8, 8) in 0..16 → the net's input blob (N, 1, 8, 8), via the 8-bit pixels a PNG holds."""
    return preprocess(to_gray8(images))[:, None, :, :]


def render(image: np.ndarray, size: int | tuple[int, int] = IMAGE_SIZE, resample: str = "nearest") -> Image.Image:
    """A dataset image as a grayscale Pillow image, upscaled to `size` (an int or (width, height))
    with `resample` ("nearest", "bilinear", "bicubic" or "box") when larger than 8×8."""
    img = Image.fromarray(to_gray8(image))  # uint8 (H, W) → mode "L"
    wh = (size, size) if isinstance(size, int) else tuple(size)
    if wh != img.size:
        img = img.resize(wh, RESAMPLING[resample])
    return img


def render_png(image: np.ndarray, size: int | tuple[int, int] = IMAGE_SIZE, resample: str = "nearest") -> bytes:
    """A dataset image as the PNG bytes a client sends (see `render`)."""
    buf = io.BytesIO()
    render(image, size, resample).save(buf, format="PNG")
    return buf.getvalue()
