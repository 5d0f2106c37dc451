#!/usr/bin/env python3
"""Make Caffe's Python layer take the GIL whenever it calls into Python (apply_patches.py runs it).

    python3 scripts/caffe/patch_python_layer.py CAFFE_SRC

The CPU build has WITH_PYTHON_LAYER (build_caffe.sh), so a net may hold `type: "Python"` layers, whose
setup, reshape and forward run Python code from inside Caffe. patch_pycaffe_gil.py releases the GIL for
the whole forward pass so that Net copies in different threads overlap; a Python layer inside that pass
must take it back, or it runs Python without the GIL. This patch gives each of PythonLayer's calls into
Python (include/caffe/layers/python_layer.hpp) a scoped PyGILState_Ensure/Release: it works whether the
calling thread holds the GIL (Net construction) or released it (our forward pass), and the layers
without Python code keep running without the GIL. A Python exception in a layer still reaches the
caller (pycaffe raises it from net.forward()).

Anchors on exact source lines and fails loudly when they change; a second run changes nothing.
"""

from __future__ import annotations

import os
import sys

HEADER = "include/caffe/layers/python_layer.hpp"
MARK = "// caffe-serving patch: PythonLayer takes the GIL"
GUARD_ANCHOR = "namespace caffe {\n"
GUARD = GUARD_ANCHOR + f"""
{MARK} (our forward pass runs without it)
struct PythonLayerGIL {{
  PyGILState_STATE state;
  PythonLayerGIL() : state(PyGILState_Ensure()) {{}}
  ~PythonLayerGIL() {{ PyGILState_Release(state); }}
}};
"""
CALLS = (
    '    self_.attr("param_str") = bp::str(',
    '    self_.attr("reshape")(bottom, top);',
    '    self_.attr("forward")(bottom, top);',
    '    self_.attr("backward")(top, propagate_down, bottom);',
)


def patch(source: str) -> str:
    if MARK in source:
        return source
    if source.count(GUARD_ANCHOR) != 1 or any(source.count(c) != 1 for c in CALLS):
        raise ValueError("python_layer.hpp changed (namespace or self_.attr lines not found once): update the patch")
    source = source.replace(GUARD_ANCHOR, GUARD, 1)
    for call in CALLS:
        source = source.replace(call, "    PythonLayerGIL gil;\n" + call, 1)
    return source


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: patch_python_layer.py CAFFE_SRC", file=sys.stderr)
        return 2
    path = os.path.join(argv[0], HEADER)
    try:
        with open(path) as f:
            source = f.read()
        patched = patch(source)
    except (OSError, ValueError) as e:
        print(f"patch_python_layer: {path}: {e}", file=sys.stderr)
        return 1
    if patched != source:
        with open(path, "w") as f:
            f.write(patched)
    print(f"patch_python_layer: {HEADER}: {'patched' if patched != source else 'already patched'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
