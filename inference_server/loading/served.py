"""What a model serves, resolved against the loaded caffe.Net: its input shapes and its output blobs.

One place for both, because the server, the ONNX conversion, the parity gate and `caffeserve check`
must all describe the same thing: the net reshaped to the configured input shapes (a prototxt may
declare `input_dim: 1 3 1 1` and be served at 368×368), and the blobs the config names as outputs.
Any blob may be an output, not only the ones Caffe calls net outputs: pycaffe users read a blob that
feeds a Silence layer (Caffe then reports no outputs at all) with `net.blobs[name]`.
"""

from __future__ import annotations

from ..errors import ModelLoadError


def input_shapes(cfg, net) -> dict[str, tuple[int, ...]]:
    """Full input shapes to serve at: the config's `inputs[].shape` where given, else the net's own."""
    inputs = list(net.inputs)
    configured = {}
    for spec in cfg.inputs or []:
        if spec.name not in inputs:
            raise ModelLoadError(f"config input '{spec.name}' is not an input of the net (it has {inputs})")
        if spec.shape:
            configured[spec.name] = tuple(spec.shape)
    return {name: configured.get(name, tuple(net.blobs[name].data.shape)) for name in inputs}


def reshape(net, shapes: dict[str, tuple[int, ...]]) -> None:
    """Reshape `net` to `shapes` (name → full shape), so that every blob has its served shape."""
    if all(tuple(net.blobs[n].data.shape) == tuple(s) for n, s in shapes.items()):
        return
    for name, shape in shapes.items():
        net.blobs[name].reshape(*shape)
    net.reshape()


def output_blobs(cfg, net) -> list[str]:
    """The blobs to serve: the config's `outputs` (any blob of the net), else Caffe's net outputs."""
    blobs = list(net.blobs.keys())
    if cfg.outputs:
        names = [o.name for o in cfg.outputs]
        for name in names:
            if name not in net.blobs:
                raise ModelLoadError(f"config output '{name}' is not a blob of the net (its blobs: {_listing(blobs)})")
            if name in net.inputs:
                raise ModelLoadError(f"config output '{name}' is an input of the net, not something it computes")
        return list(dict.fromkeys(names))
    names = list(net.outputs)
    if not names:
        computed = [b for b in blobs if b not in net.inputs]
        raise ModelLoadError(
            "the net has no outputs: Caffe reports none (every blob is consumed, e.g. by a Silence layer); "
            f"name the blobs to serve under `outputs` in the config (its blobs: {_listing(computed)})"
        )
    return names


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
