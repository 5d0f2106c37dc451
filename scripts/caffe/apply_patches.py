#!/usr/bin/env python3
"""The one entry point of our patches to Caffe: every place that patches calls this, never a patch itself.

    apply_patches.py source CAFFE_SRC [--cuda]   before compiling (build_caffe.sh): the forward pass releases
                                                 the GIL, protobuf reads up to 2 GiB, the Caffe forks' layers
                                                 and fields, Python layers take the GIL back, CPU pooling
                                                 reads its loop bounds once; with --cuda
                                                 also the sdist's CUDA parts back on
    apply_patches.py installed CAFFE_PACKAGE     after copying pycaffe (install_pycaffe.sh, gpu/gpu_bundle.sh):
                                                 caffe/io.py for current scikit-image, no rebuild
    apply_patches.py files [--cuda]              the files the source patches are made of, relative to this
                                                 folder: build_key.py hashes them into the build's cache key

Each patch anchors on exact source lines and fails loudly when they change; a second run changes nothing.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import patch_caffe_cuda  # noqa: E402
import patch_caffe_forks  # noqa: E402
import patch_caffe_pooling  # noqa: E402
import patch_caffe_proto_limit  # noqa: E402
import patch_pycaffe_gil  # noqa: E402
import patch_pycaffe_io  # noqa: E402
import patch_python_layer  # noqa: E402

# (patch, the path its main takes relative to the target), in the order they apply
SOURCE = [(patch_pycaffe_gil, "python/caffe/_caffe.cpp"), (patch_caffe_proto_limit, ""), (patch_caffe_forks, ""),
          (patch_python_layer, ""), (patch_caffe_pooling, "")]
CUDA = [(patch_caffe_cuda, "")]
INSTALLED = [(patch_pycaffe_io, "")]


def patches(stage: str, cuda: bool = False) -> list:
    if stage == "source":
        return SOURCE + (CUDA if cuda else [])
    if stage == "installed":
        return INSTALLED
    raise ValueError(f"unknown stage {stage!r}")


def files(cuda: bool = False) -> list[str]:
    """This script, the source patches a build applies and what they add (relative to this folder)."""
    names = [os.path.basename(__file__)] + [os.path.basename(m.__file__) for m, _ in patches("source", cuda)]
    return names + patch_caffe_forks.inputs()


def apply(stage: str, target: str, cuda: bool = False) -> int:
    for patch, rel in patches(stage, cuda):
        rc = patch.main([os.path.join(target, rel) if rel else target])
        if rc:
            return rc
    return 0


def main(argv: list[str]) -> int:
    cuda = "--cuda" in argv
    args = [a for a in argv if a != "--cuda"]
    if args[:1] == ["files"] and len(args) == 1:
        print("\n".join(files(cuda)))
        return 0
    if len(args) == 2 and args[0] in ("source", "installed") and not (cuda and args[0] == "installed"):
        return apply(args[0], args[1], cuda)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
