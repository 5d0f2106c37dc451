#!/usr/bin/env python3
"""Repair pycaffe's `caffe/io.py` for current scikit-image (applied at install; no rebuild).

    python3 scripts/caffe/patch_pycaffe_io.py SITE_PACKAGES/caffe     (apply_patches.py installed runs it)

The sdist's io.py calls `skimage.io.imread(..., as_grey=...)` (renamed `as_gray` in scikit-image 0.16,
removed since), so `caffe.io.load_image` raises TypeError; and it lost the `resize` import, so
`Transformer.preprocess` and `resize_image` raise NameError whenever they resize. A user's own pycaffe
script in our image must work, and the server's preprocessing is checked against this very module.
"""

from __future__ import annotations

import os
import sys

FIXES = (
    ("as_grey=not color", "as_gray=not color"),
    ("from scipy.ndimage import zoom\n", "from scipy.ndimage import zoom\nfrom skimage.transform import resize\n"),
)


def patch(source: str) -> str:
    for old, new in FIXES:
        if new in source:
            continue
        if old not in source:
            raise ValueError(f"caffe/io.py changed ({old.strip()!r} is not there): update the patch")
        source = source.replace(old, new, 1)
    return source


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: patch_pycaffe_io.py PATH/TO/caffe", file=sys.stderr)
        return 2
    path = os.path.join(argv[0], "io.py")
    try:
        with open(path) as f:
            source = f.read()
        patched = patch(source)
    except (OSError, ValueError) as e:
        print(f"patch_pycaffe_io: {path}: {e}", file=sys.stderr)
        return 1
    if patched != source:
        with open(path, "w") as f:
            f.write(patched)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
