#!/usr/bin/env python3
"""Make pycaffe's Net._forward release the GIL, so Net copies in different threads overlap.

    python3 scripts/caffe/patch_pycaffe_gil.py CAFFE_SRC/python/caffe/_caffe.cpp

pycaffe binds `_forward` straight to `Net::ForwardFromTo`, which holds the GIL for the whole forward
pass: with `instances: N` the server's N worker threads would take turns. The patch binds `_forward`
to a wrapper that releases the GIL while Caffe computes. Python code inside a forward pass (a
`type: "Python"` layer, WITH_PYTHON_LAYER in the CPU build) takes the GIL back for each of its calls
(patch_python_layer.py). BVLC Caffe at 9b89154 and the brocolli-caffe 9.0.2 sdist (its CPU-only repackaging)
carry the same _caffe.cpp lines this patch anchors on; it fails loudly if they ever change, and a
second run on a patched file changes nothing.

Every build applies it, through scripts/caffe/apply_patches.py (CPU pycaffe, CUDA build, GPU image).
"""

from __future__ import annotations

import sys

ANCHOR = "void set_mode_gpu() { Caffe::set_mode(Caffe::GPU); }"
WRAPPER = ANCHOR + """

// caffe-serving patch: run the forward pass without holding the GIL.
struct ScopedGILRelease {
  PyThreadState* state;
  ScopedGILRelease() : state(PyEval_SaveThread()) {}
  ~ScopedGILRelease() { PyEval_RestoreThread(state); }
};
Dtype Net_ForwardFromTo_NoGIL(Net<Dtype>& net, int start, int end) {
  ScopedGILRelease release;
  return net.ForwardFromTo(start, end);
}
"""
BINDING = '.def("_forward", &Net<Dtype>::ForwardFromTo)'
PATCHED_BINDING = '.def("_forward", &Net_ForwardFromTo_NoGIL)'


def patch(source: str) -> str:
    """The patched source; the source unchanged if it is already patched."""
    if PATCHED_BINDING in source and "Net_ForwardFromTo_NoGIL(Net<Dtype>& net" in source:
        return source
    if ANCHOR not in source or BINDING not in source:
        raise ValueError("pycaffe sources changed (the set_mode_gpu or _forward lines are not there): update the patch")
    return source.replace(ANCHOR, WRAPPER, 1).replace(BINDING, PATCHED_BINDING, 1)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: patch_pycaffe_gil.py PATH/TO/_caffe.cpp", file=sys.stderr)
        return 2
    path = argv[0]
    with open(path) as f:
        source = f.read()
    try:
        patched = patch(source)
    except ValueError as e:
        print(f"patch_pycaffe_gil: {path}: {e}", file=sys.stderr)
        return 1
    if patched != source:
        with open(path, "w") as f:
            f.write(patched)
    print(f"patch_pycaffe_gil: {path}: {'patched' if patched != source else 'already patched'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
