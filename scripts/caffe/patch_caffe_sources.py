#!/usr/bin/env python3
"""Patch a Caffe source tree before it is compiled (both our builds: install_pycaffe.sh, the GPU image).

    python3 scripts/patch_caffe_sources.py CAFFE_SRC

- pycaffe's forward pass releases the GIL (scripts/patch_pycaffe_gil.py says why).
- Protobuf reads of a .caffemodel are capped at INT_MAX (2 GiB), Caffe's upstream limit, instead of the
  sdist's 512 MiB: VGG16 (553 MB), VGG-Face and SSD-VGG weights must load.
- The Caffe forks' layers and fields (SSD's clip, SegNet/ENet BN and Upsample, Axpy, ShuffleChannel,
  ConvolutionDepthwise): scripts/patch_caffe_forks.py and scripts/caffe_forks/. The build's cache key
  hashes this file, so FORKS_DIGEST (patch_caffe_forks.digest() of what that patch adds) changes it when
  they change; a stale digest fails the patch, and tests/test_caffe_forks.py says the new value.

Each patch anchors on exact source lines and fails loudly when they change; a second run on a patched
tree changes nothing. Python-only fixes live in patch_pycaffe_io.py (applied at install, no rebuild).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import patch_caffe_forks  # noqa: E402
import patch_pycaffe_gil  # noqa: E402

FORKS_DIGEST = "73fe32e2393782fa"

IO_CPP = "src/caffe/util/io.cpp"
# brocolli-caffe 9.0.2 calls the one-argument form with a literal; BVLC 9b89154 the two-argument form.
PROTO_LIMITS = {
    "SetTotalBytesLimit(536870912)": "SetTotalBytesLimit(INT_MAX)",
    "SetTotalBytesLimit(kProtoReadBytesLimit, 536870912)": "SetTotalBytesLimit(INT_MAX)",
}
CLIMITS = "#include <climits>  // caffe-serving patch: INT_MAX\n"


def patch_proto_limit(source: str) -> str:
    if "SetTotalBytesLimit(INT_MAX)" in source and not any(old in source for old in PROTO_LIMITS):
        return source
    if not any(old in source for old in PROTO_LIMITS):
        raise ValueError("no SetTotalBytesLimit call this patch knows: update the patch")
    for old, new in PROTO_LIMITS.items():
        source = source.replace(old, new)
    return CLIMITS + source if CLIMITS not in source else source


def patch_file(path: str, fn) -> str:
    with open(path) as f:
        source = f.read()
    patched = fn(source)
    if patched != source:
        with open(path, "w") as f:
            f.write(patched)
        return "patched"
    return "already patched"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: patch_caffe_sources.py CAFFE_SRC", file=sys.stderr)
        return 2
    src = argv[0]
    for rel, fn in (("python/caffe/_caffe.cpp", patch_pycaffe_gil.patch), (IO_CPP, patch_proto_limit)):
        path = os.path.join(src, rel)
        try:
            print(f"patch_caffe_sources: {rel}: {patch_file(path, fn)}")
        except (OSError, ValueError) as e:
            print(f"patch_caffe_sources: {path}: {e}", file=sys.stderr)
            return 1
    if patch_caffe_forks.digest() != FORKS_DIGEST:
        print(f"patch_caffe_sources: scripts/caffe_forks changed: set FORKS_DIGEST = \"{patch_caffe_forks.digest()}\" "
              "so that cached builds are rebuilt", file=sys.stderr)
        return 1
    return patch_caffe_forks.main([src])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
