#!/usr/bin/env python3
"""The cache key of a Caffe build: a hash of the contents of the files that make it.

    build_key.py [--cuda]      prints 12 hex digits (build_caffe.sh names its cached build with them)

The files: build_caffe.sh (the sdist version, CMake flags, what is kept), the source patches and what they
add (apply_patches.py files), and for a CUDA build boost_python.sh (its bindings for other Pythons). The
key hashes their contents only, sorted, not their names or paths: moving a file keeps every cached build,
and any edit to one of them (a comment too) makes the next setup rebuild, so no constant is bumped by hand.
What the directory name adds: the Python version (CPU) or the CUDA version and GPU architectures (CUDA).
"""

from __future__ import annotations

import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import apply_patches  # noqa: E402

BUILD = ["build_caffe.sh"]
CUDA_ONLY = ["boost_python.sh"]


def build_files(cuda: bool = False) -> list[str]:
    """Every file whose content makes a build, relative to this folder."""
    return BUILD + (CUDA_ONLY if cuda else []) + apply_patches.files(cuda)


def key(cuda: bool = False) -> str:
    digests = []
    for name in build_files(cuda):
        with open(os.path.join(HERE, name), "rb") as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:12]


def main(argv: list[str]) -> int:
    if argv not in ([], ["--cuda"]):
        print(__doc__, file=sys.stderr)
        return 2
    print(key(cuda=argv == ["--cuda"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
