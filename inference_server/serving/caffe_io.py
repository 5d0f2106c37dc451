"""caffe.io's image semantics on images Pillow decoded: what Caffe's own classifier feeds a net.

`caffe.io.load_image` reads pixels through scikit-image as float in [0, 1] (grey from colour by
scikit-image's luminance weights, alpha dropped, or composited on white for grey), and
`caffe.io.resize_image` stretches the image's own min..max to [0, 1], resizes with scikit-image's
order-1 spline (Gaussian anti-aliasing when shrinking) and stretches back. Models were trained and
validated on exactly those pixels, so we repeat the same steps with the same library calls instead
of importing pycaffe's io.py (broken as shipped against current scikit-image, and absent from a
server that runs ONNX Runtime only).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# what img_as_float makes of each 8-bit value (x · (1/255) in float64), as float32
_UINT8_TO_FLOAT = (np.arange(256, dtype=np.float64) * (1.0 / 255)).astype(np.float32)


def _reader_array(img: Image.Image) -> np.ndarray:
    """The array scikit-image's reader (imageio over Pillow) gets: palette images expanded to their
    palette's mode, 16-bit greys as uint16; other exotic modes (CMYK, LA, ...) made RGB(A)."""
    if img.mode == "P":
        img = img.convert(img.palette.mode if img.palette is not None else "RGB")
    elif img.mode.startswith("I"):
        img = img.convert("I;16") if img.mode != "I;16" else img
    elif img.mode == "LA" or img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode not in ("1", "L", "RGB", "RGBA"):
        img = img.convert("RGB")
    return np.asarray(img)


def _as_float32(arr: np.ndarray) -> np.ndarray:
    """skimage.img_as_float(arr).astype(float32), without a float64 copy of 8-bit images."""
    if arr.dtype == np.uint8:
        return _UINT8_TO_FLOAT[arr]
    if arr.dtype == np.uint16:
        return (arr * (1.0 / 65535)).astype(np.float32)
    return arr.astype(np.float32)  # bool (mode "1"): 0 or 1


def load_image(img: Image.Image, color: bool) -> np.ndarray:
    """H×W×3 (color) or H×W×1 float32 in [0, 1], as caffe.io.load_image(file, color) returns it."""
    arr = _reader_array(img)
    if arr.ndim == 3 and not color:  # skimage.io.imread(as_gray=True)
        from skimage.color import rgb2gray, rgba2rgb

        floats = rgb2gray(rgba2rgb(arr) if arr.shape[2] == 4 else arr).astype(np.float32)
    else:
        floats = _as_float32(arr)
    if floats.ndim == 2:
        floats = floats[:, :, None]
        if color:
            floats = np.repeat(floats, 3, axis=2)
    elif floats.shape[2] == 4:
        floats = floats[:, :, :3]
    return floats


def resize_image(im: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """caffe.io.resize_image(im, size) for H×W×1 and H×W×3 images: float32 of shape (*size, K)."""
    from skimage.transform import resize

    lo, hi = im.min(), im.max()
    if not hi > lo:  # a constant image (Caffe's guard against dividing by zero)
        return np.full((size[0], size[1], im.shape[-1]), lo, dtype=np.float32)
    stretched = (im - lo) / (hi - lo)
    resized = resize(stretched, size, order=1, mode="constant")
    return (resized * (hi - lo) + lo).astype(np.float32)


def fit_mean(mean: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A C×H×W mean as caffe.io.Transformer.set_mean keeps it for an input of H×W `size`: as is where
    the sizes agree, else resized between its own min and max."""
    if tuple(mean.shape[1:]) == tuple(size):
        return mean
    lo, hi = mean.min(), mean.max()
    if not hi > lo:
        return np.full((mean.shape[0], *size), lo, dtype=np.float32)
    normal = (mean - lo) / (hi - lo)
    return resize_image(normal.transpose(1, 2, 0), size).transpose(2, 0, 1) * (hi - lo) + lo
