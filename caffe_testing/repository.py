"""Model repositories for tests and benchmarks: folders DIR/NAME/server.yaml with each model's files."""

from __future__ import annotations

from pathlib import Path

import yaml

from caffe_testing.nets import dense_net, save_net


def write_model(repo: Path, name: str, config: dict) -> Path:
    """DIR/NAME/server.yaml holding `config`; the folder."""
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.yaml").write_text(yaml.safe_dump(config))
    return folder


def dense_model(repo: Path, name: str, inputs: int, outputs: int, seed: int, **config) -> dict:
    """A model folder holding its own net files (input [1, inputs] → `outputs` classes, seeded weights),
    named relative to the folder as a repository keeps them; served with pycaffe unless `config` says."""
    folder = repo / name
    proto, weights = save_net(dense_net(inputs, outputs), folder, "net", seed=seed)
    write_model(repo, name, {"model": {"prototxt": proto.name, "weights": weights.name}, "backend": "pycaffe",
                             **config})
    return {"proto": proto, "weights": weights, "inputs": inputs}
