"""Caffe's Python layers (`type: "Python"`): off unless the config names the folder of their modules.

Loading a net with a Python layer imports its module and runs its code (setup, reshape, forward) inside
the server: the same trust as running a script from the model's source. So a net with such a layer is
refused unless `model.pythonLayers.path` names that folder, and the refusal names the layer and the
setting. With it, the folder goes first on `sys.path` of the server and of the load probe's child, each
layer's module is imported once here (an import error is a load error that says which module), and
Caffe's own Python layer (the CPU build's WITH_PYTHON_LAYER) does the rest.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ..errors import ModelLoadError

SETTING = "model.pythonLayers.path"


def python_layers(prototxt: str) -> list[tuple[str, str, str]]:
    """(layer name, module, class) of each Python layer of the deploy file; [] when it does not parse
    (Caffe then says why, in its own words)."""
    try:
        text = Path(prototxt).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    if "Python" not in text:  # the usual case, without importing pycaffe's protobuf classes
        return []
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    net = caffe_pb2.NetParameter()
    try:
        text_format.Merge(text, net)
    except text_format.ParseError:
        return []
    return [(layer.name, layer.python_param.module, layer.python_param.layer)
            for layer in net.layer if layer.type == "Python"]


def folder(cfg) -> str | None:
    """The configured folder of the layer modules, resolved against the config file's folder."""
    setting = cfg.model.python_layers
    return None if setting is None else str(cfg.path(setting.path))


def allow(prototxt: str, path: str | None) -> list[tuple[str, str, str]]:
    """Refuse a net whose Python layers are not allowed or cannot load; else put `path` on sys.path and
    import their modules. Returns the layers."""
    found = python_layers(prototxt)
    if not found:
        return found
    import caffe

    layer_types = list(caffe.layer_type_list())
    name, module, cls = found[0]
    if path is None:
        raise ModelLoadError(
            f"layer '{name}' is a Python layer (module '{module}', class '{cls}'): loading it runs that code in "
            f"the server, so Python layers are off unless the config names the folder of their modules: "
            f"set {SETTING}")
    if "Python" not in layer_types:
        raise ModelLoadError(
            f"layer '{name}' is a Python layer, and this pycaffe build has no Python layer (WITH_PYTHON_LAYER): "
            "the CPU build has it, the CUDA build (the GPU image) does not")
    if not Path(path).is_dir():
        raise ModelLoadError(f"{SETTING}: {path} is not a folder")
    if path not in sys.path:
        sys.path.insert(0, path)
    for name, module, cls in found:
        try:
            loaded = importlib.import_module(module)
        except Exception as e:  # the module's own code failed: say which module, and how
            raise ModelLoadError(f"Python layer '{name}': importing module '{module}' from {path} failed: "
                                 f"{type(e).__name__}: {e}") from None
        if not hasattr(loaded, cls):
            raise ModelLoadError(f"Python layer '{name}': module '{module}' ({loaded.__file__}) has no class '{cls}'")
    return found
