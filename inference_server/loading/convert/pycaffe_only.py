"""Layer types left to pycaffe on purpose, with the reason `backend: auto` gives (`caffeserve check` lists
them among the types without a converter). Not converters: the types stay unsupported."""

from __future__ import annotations

from .registry import REFUSED

REFUSED["Python"] = (
    "a Caffe Python layer runs the model's own Python code, which has no ONNX form; pycaffe serves this net")
REFUSED["ROIPooling"] = (
    "Fast/Faster R-CNN's ROIPooling pools regions whose number and place come from the data (its proposals), "
    "which the converter does not express; pycaffe serves this net")
REFUSED["PSROIPooling"] = (
    "R-FCN's PSROIPooling pools regions whose number and place come from the data (its proposals), which the "
    "converter does not express; pycaffe serves this net")
REFUSED["Reorg"] = (
    "YOLOv2's Reorg (darknet's passthrough index map, not ONNX's SpaceToDepth) has no converter yet; "
    "pycaffe serves this net")
