"""spec.model.pythonLayers: a net's Caffe Python layers run their code in the model server, so the operator
passes their folder only from the model's own source (a PVC folder or a ConfigMap's keys), never a path
outside it, and refuses the spec otherwise with a message naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from caffe_operator import api, manifests, variants
from inference_server.config import parse_config

MODEL = {"prototxt": "test.prototxt", "weights": "frcnn.caffemodel"}


def server_config(source: dict[str, Any], python_layers: dict | None):
    model = {**MODEL, **({"pythonLayers": python_layers} if python_layers is not None else {})}
    s = api.parse_spec("frcnn", {"source": source, "model": model})
    text = manifests.children(variants.Variant("frcnn", s), "ml", "registry.example/caffe:1").config_map["data"]
    return parse_config(yaml.safe_load(text["config.yaml"]), environ={})


def test_off_by_default():
    assert server_config({"pvc": {"claimName": "models"}}, None).model.python_layers is None


@pytest.mark.parametrize("source,path,want", [
    ({"pvc": {"claimName": "models", "path": "zoo/frcnn"}}, "lib", "/models/lib"),
    ({"pvc": {"claimName": "models"}}, "lib/rpn/", "/models/lib/rpn"),
    ({"pvc": {"claimName": "models"}}, ".", "/models"),
    ({"configMap": {"name": "frcnn-files"}}, ".", "/models"),
])
def test_the_folder_is_inside_the_models_own_volume(source, path, want):
    assert server_config(source, {"path": path}).model.python_layers.path == want


@pytest.mark.parametrize("source,path,words", [
    ({"url": "https://models.example.com/frcnn"}, "lib", "model.pythonLayers needs source.pvc or source.configMap"),
    ({"s3": {"bucket": "models"}}, "lib", "model.pythonLayers needs source.pvc or source.configMap"),
    ({"pvc": {"claimName": "models"}}, "/usr/lib/python3", "must be relative, not absolute"),
    ({"pvc": {"claimName": "models"}}, "lib/../../etc", "must not contain '..'"),
    ({"configMap": {"name": "frcnn-files"}}, "lib", "a ConfigMap's keys are one folder"),
])
def test_a_folder_from_elsewhere_is_refused_naming_the_field(source, path, words):
    with pytest.raises(api.InvalidSpec, match="pythonLayers") as e:
        server_config(source, {"path": path})
    assert words in str(e.value)
