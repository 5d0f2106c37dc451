"""Encoded image bytes → the Caffe input blob, the way caffe.io.Transformer prepares it.

Caffe's classifier loads an image as float RGB in [0, 1] (caffe.io.load_image), resizes it to the
input's H×W, transposes HWC→CHW, applies channel_swap, multiplies by raw_scale, subtracts the mean
and multiplies by input_scale. We do the same, decoding with Pillow (resize: bilinear, antialiased
when shrinking). The decompression-bomb guard is set to the configured pixel limit and its warning is
an error, and the size is checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image

from .config import Preprocessing
from .errors import BadRequest, ModelLoadError

warnings.simplefilter("error", Image.DecompressionBombWarning)


def read_mean_file(path: str) -> np.ndarray:
    """Per-channel mean of a mean.binaryproto (as Caffe's examples reduce it: mean over H and W)."""
    from caffe.proto import caffe_pb2

    blob = caffe_pb2.BlobProto()
    try:
        with open(path, "rb") as f:
            blob.ParseFromString(f.read())
    except (OSError, Exception) as e:
        raise ModelLoadError(f"cannot read mean file {path}: {e}") from None
    shape = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    arr = np.asarray(blob.data, dtype=np.float32).reshape(shape[-3:])
    return arr.mean(axis=(1, 2))


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
            raise ModelLoadError(f"image preprocessing needs a 4-D input blob (N, C, H, W), the net's is {list(blob_shape)}")
        self.channels = blob_shape[1]
        self.height, self.width = spec.image_size or blob_shape[2:]
        if (self.height, self.width) != tuple(blob_shape[2:]):
            raise ModelLoadError(
                f"preprocessing.imageSize {[self.height, self.width]} differs from the input blob's H×W {list(blob_shape[2:])}"
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
        mean = read_mean_file(mean_path) if mean_path else spec.mean_values
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        if self.mean is not None and self.mean.shape[0] not in (1, self.channels):
            raise ModelLoadError(f"{self.mean.shape[0]} mean values for {self.channels} channels")
        self.max_pixels = max_pixels
        # Pillow's own guard runs inside Image.open, before our check: tie it to the configured limit
        Image.MAX_IMAGE_PIXELS = max_pixels

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
            img = img.convert("RGB" if self.color else "L")
            if img.size != (self.width, self.height):
                img = img.resize((self.width, self.height), Image.BILINEAR)
        except BadRequest:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise BadRequest(
                f"input '{name}': image rejected as a decompression bomb: it has more than the limit of "
                f"{self.max_pixels} pixels (limits.maxImagePixels)"
            ) from None
        except Exception as e:  # Pillow raises many types for undecodable data
            raise BadRequest(f"input '{name}': cannot decode image: {e}") from None
        arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
        arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if self.channel_swap is not None:
            arr = arr[self.channel_swap, :, :]
        arr = arr * np.float32(self.raw_scale)
        if self.mean is not None:
            arr = arr - self.mean
        if self.scale != 1.0:
            arr = arr * np.float32(self.scale)
        return arr

    def __call__(self, name: str, images: np.ndarray) -> np.ndarray:
        """A 1-D object array of encoded images → float32 (N, C, H, W)."""
        return np.stack([self.decode_one(name, bytes(b)) for b in images]).astype(np.float32, copy=False)
