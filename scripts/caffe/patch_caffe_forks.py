#!/usr/bin/env python3
"""Add the layers and fields of Caffe forks to a Caffe source tree (scripts/caffe/apply_patches.py runs it).

    python3 scripts/caffe/patch_caffe_forks.py CAFFE_SRC

What models from the forks need that the brocolli-caffe 9.0.2 sdist lacks (docs/model-families.md):
- scripts/caffe/caffe_forks/*.cpp, our own implementations written from the layers' published definitions,
  are copied into src/caffe/layers/ (CMake globs that folder): Axpy (SE-Nets), ShuffleChannel
  (ShuffleNet), ConvolutionDepthwise/DepthwiseConvolution (MobileNet, ShuffleNet), BN (SegNet, ENet)
  and Upsample (SegNet's max-unpooling; it replaces the sdist's upsample_layer.cpp, keeping its
  one-bottom nearest-neighbour form). Each .cpp holds its whole layer class, so no headers are added.
- scripts/caffe/caffe_forks/caffe.proto.fields: the fields those layers and the forks' deploy files use,
  inserted into src/caffe/proto/caffe.proto (that file says how field numbers are chosen).
- DetectionOutput honours the new `clip` field (OpenCV's face detector): the sdist decodes with a
  hard-coded `clip_bbox = false`, in the .cpp and the .cu.

Every edit anchors on exact source text and fails loudly when it is missing; a second run changes nothing.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FORKS = os.path.join(HERE, "caffe_forks")
PROTO = "src/caffe/proto/caffe.proto"
LAYERS = "src/caffe/layers"
BEGIN, END = "// caffe-serving fork fields: begin", "// caffe-serving fork fields: end"
CLIP_OLD = "const bool clip_bbox = false;"
CLIP_NEW = "const bool clip_bbox = this->layer_param_.detection_output_param().clip();  // caffe-serving patch"
DETECTION_OUTPUT = ("src/caffe/layers/detection_output_layer.cpp", "src/caffe/layers/detection_output_layer.cu")


def layer_sources() -> list[str]:
    return sorted(f for f in os.listdir(FORKS) if f.endswith(".cpp"))


def inputs() -> list[str]:
    """What this patch adds, relative to this folder: part of the build's cache key (build_key.py)."""
    return [os.path.join("caffe_forks", f) for f in sorted(os.listdir(FORKS))]


def proto_sections(text: str) -> dict[str, str]:
    """caffe.proto.fields → {message name or 'toplevel': the lines to insert}."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if current is None and (not line.strip() or line.startswith("#")):
            continue
        if line.startswith("message ") and not line.rstrip().endswith("{"):
            current = line.split()[1]
            sections[current] = []
        elif line.strip() == "toplevel":
            current = "toplevel"
            sections[current] = []
        elif current is None:
            raise ValueError(f"caffe.proto.fields: a line before any section: {line!r}")
        else:
            sections[current].append(line)
    return {k: "\n".join(v).strip("\n") + "\n" for k, v in sections.items()}


def patch_proto(source: str, sections: dict[str, str]) -> str:
    if BEGIN in source:
        return source
    for message, fields in sections.items():
        if message == "toplevel":
            continue
        anchor = f"message {message} {{\n"
        if source.count(anchor) != 1:
            raise ValueError(f"expected one '{anchor.strip()}' in caffe.proto, found {source.count(anchor)}")
        source = source.replace(anchor, f"{anchor}  {BEGIN}\n{fields}  {END}\n")
    if "toplevel" in sections:
        source = source.rstrip("\n") + f"\n\n{BEGIN}\n{sections['toplevel']}{END}\n"
    return source


def patch_clip(source: str) -> str:
    if CLIP_NEW in source:
        return source
    if source.count(CLIP_OLD) != 1:
        raise ValueError(f"expected one '{CLIP_OLD}', found {source.count(CLIP_OLD)}: update the patch")
    return source.replace(CLIP_OLD, CLIP_NEW)


def _rewrite(path: str, fn, new_ok: bool = False) -> str:
    if new_ok and not os.path.exists(path):
        source = None
    else:
        with open(path) as f:
            source = f.read()
    patched = fn(source)
    if patched == source:
        return "already patched"
    with open(path, "w") as f:
        f.write(patched)
    return "added" if source is None else "patched"


def apply(src: str) -> list[str]:
    """Patch the tree at `src`; returns one line per file. Raises OSError/ValueError on a mismatch."""
    report = []
    with open(os.path.join(FORKS, "caffe.proto.fields")) as f:
        sections = proto_sections(f.read())
    report.append(f"{PROTO}: {_rewrite(os.path.join(src, PROTO), lambda s: patch_proto(s, sections))}")
    for rel in DETECTION_OUTPUT:
        path = os.path.join(src, rel)
        if rel.endswith(".cu") and not os.path.exists(path):
            continue
        report.append(f"{rel}: {_rewrite(path, patch_clip)}")
    if not os.path.isdir(os.path.join(src, LAYERS)):
        raise OSError(f"{os.path.join(src, LAYERS)} is not a directory")
    for name in layer_sources():
        with open(os.path.join(FORKS, name)) as f:
            ours = f.read()
        report.append(f"{LAYERS}/{name}: {_rewrite(os.path.join(src, LAYERS, name), lambda _: ours, new_ok=True)}")
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: patch_caffe_forks.py CAFFE_SRC", file=sys.stderr)
        return 2
    try:
        for line in apply(argv[0]):
            print(f"patch_caffe_forks: {line}")
    except (OSError, ValueError) as e:
        print(f"patch_caffe_forks: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
