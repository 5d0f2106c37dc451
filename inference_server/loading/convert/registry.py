"""The table of Caffe layer types we convert: one function per type, registered by a decorator.

A converter function receives the layer and a `LayerContext` (its bottoms as ONNX values, its weights
as numpy arrays, the static shapes) and returns one ONNX value per top. Anything it cannot express
exactly raises `UnsupportedLayer` with the reason, which the backend selection shows to the user.
"""

from __future__ import annotations

from collections.abc import Callable

CONVERTERS: dict[str, Callable] = {}
NOTES: dict[str, str] = {}  # what each converter maps to, for the docs table and `caffeserve check`
REFUSED: dict[str, str] = {}  # types deliberately left to pycaffe, with the reason the error gives


class UnsupportedLayer(Exception):
    """A layer the onnxruntime backend cannot run exactly as Caffe does."""

    def __init__(self, name: str, type_: str, detail: str | None = None):
        self.layer, self.type, self.detail = name, type_, detail
        msg = f"layer '{name}' of type '{type_}' is not supported by the onnxruntime backend"
        super().__init__(f"{msg}: {detail}" if detail else msg)


def converts(*types: str, note: str = ""):
    """Register the decorated function as the converter of these Caffe layer types."""

    def register(fn: Callable) -> Callable:
        for t in types:
            CONVERTERS[t] = fn
            NOTES[t] = note
        return fn

    return register


def supported_types() -> list[str]:
    _load_all()
    return sorted(CONVERTERS)


def converter_for(layer_name: str, layer_type: str) -> Callable:
    _load_all()
    try:
        return CONVERTERS[layer_type]
    except KeyError:
        raise UnsupportedLayer(layer_name, layer_type, REFUSED.get(layer_type)) from None


def _load_all() -> None:
    # the modules register their converters on import
    from . import (  # noqa: F401
        activations,
        argmax,
        arithmetic,
        convolution,
        crop,
        forks,
        interp,
        normalization,
        pooling,
        pycaffe_only,  # types left to pycaffe, with their reason
        ssd,
        structure,
    )
