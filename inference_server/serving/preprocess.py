"""Encoded image bytes → the Caffe input blob, the way Caffe's classifier prepares it with caffe.io.

caffe.io.load_image gives float RGB (or grey) in [0, 1]; caffe.io.resize_image brings it to the
input's H×W; Transformer.preprocess transposes HWC→CHW, applies channel_swap, multiplies by
raw_scale, subtracts the mean and multiplies by input_scale. We do the same, with the same
arithmetic (caffe_io.py), so a model sees the blob it was validated on. `resize: fast` trades that
for Pillow's 8-bit bilinear resize. Decoding uses Pillow: its decompression-bomb guard is set to the
configured pixel limit with its warning an error, and the size is checked from the header before
any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image

from ..config import Preprocessing
from ..errors import BadRequest, ModelLoadError
from . import caffe_io

warnings.simplefilter("error", Image.DecompressionBombWarning)


def read_mean_file(path: str) -> np.ndarray:
    """A mean.binaryproto as the C×H×W float64 array caffe.io.blobproto_to_array makes of it."""
    from caffe.proto import caffe_pb2

    blob = caffe_pb2.BlobProto()
    try:
        with open(path, "rb") as f:
            blob.ParseFromString(f.read())
    except (OSError, Exception) as e:
        raise ModelLoadError(f"cannot read mean file {path}: {e}") from None
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = [blob.num, blob.channels, blob.height, blob.width] if legacy else list(blob.shape.dim)
    if len(shape) == 2:  # H×W: one channel, as set_mean takes it
        shape = [1, *shape]
    arr = np.asarray(blob.data, dtype=np.float64)
    if len(shape) < 3 or arr.size != int(np.prod(shape)) or int(np.prod(shape[:-3])) != 1:
        raise ModelLoadError(f"mean file {path} does not hold one C×H×W image (its shape is {shape})")
    return arr.reshape(shape[-3:])


def _unbase64(data: bytes) -> bytes:
    """JSON carries images base64-encoded (KServe's convention); the binary extension carries raw bytes.

    Encoded images are never made only of base64's alphabet, so a strict decode tells the two apart.
    """
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data


class ImagePreprocessor:
    """Turns a batch of encoded images into one float32 (N, C, H, W) array for one input blob."""

    def __init__(self, spec: Preprocessing, blob_shape: tuple[int, ...], max_pixels: int, mean_path: str | None = None):
        if len(blob_shape) != 4:
            raise ModelLoadError(
                f"image preprocessing needs a 4-D input blob (N, C, H, W), the net's is {list(blob_shape)}"
            )
        self.channels = blob_shape[1]
        self.height, self.width = spec.image_size or blob_shape[2:]
        if (self.height, self.width) != tuple(blob_shape[2:]):
            raise ModelLoadError(
                f"preprocessing.imageSize {[self.height, self.width]} differs from the input blob's "
                f"H×W {list(blob_shape[2:])}"
            )
        self.color = spec.color
        if self.channels != (3 if self.color else 1):
            raise ModelLoadError(
                f"the input blob has {self.channels} channel(s) but preprocessing.color is {str(self.color).lower()}"
            )
        self.raw_scale = spec.raw_scale
        self.scale = spec.scale
        self.channel_swap = spec.channel_swap
        if self.channel_swap is not None and sorted(self.channel_swap) != list(range(self.channels)):
            raise ModelLoadError(f"preprocessing.channelSwap {self.channel_swap} is not a permutation of the channels")
        self.mean = self._mean(spec, mean_path)
        self.resize = spec.resize
        self.max_pixels = max_pixels
        # Pillow's own guard runs inside Image.open, before our check: tie it to the configured limit
        Image.MAX_IMAGE_PIXELS = max_pixels

    def _mean(self, spec: Preprocessing, mean_path: str | None) -> np.ndarray | None:
        """What Transformer.set_mean keeps: per-channel values, or the mean file pixel by pixel at H×W.
        Kept in float64 where Caffe's would be, so the subtraction rounds as Caffe's does."""
        if mean_path:
            mean = read_mean_file(mean_path)
            if mean.shape[0] != self.channels:
                raise ModelLoadError(f"the mean file has {mean.shape[0]} channel(s), the input blob {self.channels}")
            return caffe_io.fit_mean(mean, (self.height, self.width))
        if spec.mean_values is None:
            return None
        mean = np.asarray(spec.mean_values, dtype=np.float64).reshape(-1, 1, 1)
        if mean.shape[0] not in (1, self.channels):
            raise ModelLoadError(f"{mean.shape[0]} mean values for {self.channels} channels")
        return mean

    def _pixels(self, img: Image.Image) -> np.ndarray:
        """H×W×C float32 pixels in [0, 1] at the input's size."""
        size = (self.height, self.width)
        if self.resize == "fast":
            img = img.convert("RGB" if self.color else "L")
            if img.size != (self.width, self.height):
                img = img.resize((self.width, self.height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
            return arr[:, :, None] if arr.ndim == 2 else arr
        arr = caffe_io.load_image(img, self.color)
        return arr if arr.shape[:2] == size else caffe_io.resize_image(arr, size)

    def decode_one(self, name: str, data: bytes) -> np.ndarray:
        data = _unbase64(data)
        try:
            # (the DecompressionBombWarning → error filter is set once, at import: catch_warnings
            # is not thread-safe, and images are decoded in worker threads)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > self.max_pixels:
                raise BadRequest(
                    f"input '{name}': image of {w}x{h} pixels exceeds the limit of {self.max_pixels} pixels"
                )
            arr = self._pixels(img)
        except BadRequest:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise BadRequest(
                f"input '{name}': image rejected as a decompression bomb: it has more than the limit of "
                f"{self.max_pixels} pixels (limits.maxImagePixels)"
            ) from None
        except Exception as e:  # Pillow raises many types for undecodable data
            why = str(e)
            if why.startswith("cannot identify image file"):  # Pillow names its BytesIO object: say what it means
                why = "not an image format the server reads (JPEG, PNG, BMP, GIF, TIFF, WebP, ...)"
            raise BadRequest(f"input '{name}': cannot decode image: {why}") from None
        # Transformer.preprocess, step for step (in-place ops round as Caffe's do)
        arr = arr.transpose(2, 0, 1)
        if self.channel_swap is not None:
            arr = arr[self.channel_swap, :, :]
        arr *= self.raw_scale
        if self.mean is not None:
            arr -= self.mean
        if self.scale != 1.0:
            arr *= self.scale
        return arr

    def __call__(self, name: str, images: np.ndarray) -> np.ndarray:
        """A 1-D object array of encoded images → float32 (N, C, H, W)."""
        return np.stack([self.decode_one(name, bytes(b)) for b in images]).astype(np.float32, copy=False)
