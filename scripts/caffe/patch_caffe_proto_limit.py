#!/usr/bin/env python3
"""Cap protobuf reads of a .caffemodel at INT_MAX (2 GiB), Caffe's upstream limit, instead of the sdist's 512 MiB.

    python3 scripts/caffe/patch_caffe_proto_limit.py CAFFE_SRC      (scripts/caffe/apply_patches.py runs it)

VGG16 (553 MB), VGG-Face and SSD-VGG weights must load. brocolli-caffe 9.0.2's src/caffe/util/io.cpp calls
the one-argument SetTotalBytesLimit with a literal, BVLC 9b89154 the two-argument form that protobuf 3.21
(Debian 12, Ubuntu 24.04) no longer has; either becomes SetTotalBytesLimit(INT_MAX). The patch anchors on
those exact calls and fails loudly when they change; a second run on a patched tree changes nothing.
"""

from __future__ import annotations

import os
import sys

IO_CPP = "src/caffe/util/io.cpp"
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


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: patch_caffe_proto_limit.py CAFFE_SRC", file=sys.stderr)
        return 2
    path = os.path.join(argv[0], IO_CPP)
    try:
        with open(path) as f:
            source = f.read()
        patched = patch_proto_limit(source)
    except (OSError, ValueError) as e:
        print(f"patch_caffe_proto_limit: {path}: {e}", file=sys.stderr)
        return 1
    if patched != source:
        with open(path, "w") as f:
            f.write(patched)
    print(f"patch_caffe_proto_limit: {IO_CPP}: {'patched' if patched != source else 'already patched'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
