"""A model folder → the server config: what KServe's storage initializer leaves in `/mnt/models`.

KServe passes a runtime `--model_dir=/mnt/models` (the files of the InferenceService's `storageUri`)
and `--model_name={{.Name}}`. Such a folder holds either

- a `server.yaml` (our config, relative paths resolve against the folder): used as it is, or
- just the Caffe files: then the config is the defaults inferred from the net itself, which a plain
  `caffeserve serve --config` with only `model:` gives too: the net's Input layers (names, shapes) as FP32
  tensor inputs, Caffe's net outputs, no image preprocessing, `labels.txt` when present.

`caffeserve export` reads a model the same way, so a folder that serves also exports.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from .config import ConfigError, ServerConfig, format_validation_error, load_config, parse_config

CONFIG_NAMES = ("server.yaml", "server.yml")
LABEL_NAMES = ("labels.txt", "synset_words.txt")


def _one(folder: Path, pattern: str, what: str, prefer: tuple[str, ...] = ()) -> Path:
    """The one file matching `pattern` (a preferred name wins among several); ConfigError naming them otherwise."""
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    for name in prefer:
        if (folder / name) in found:
            return folder / name
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"model folder {folder} has no {what} ({pattern}) and no {CONFIG_NAMES[0]}")
    names = ", ".join(p.name for p in found)
    raise ConfigError(f"model folder {folder} has {len(found)} {what}s ({names}): write a {CONFIG_NAMES[0]} "
                      "there naming the one to serve")


def _model_folder(root: Path) -> Path:
    """`root`, or its one subfolder when `root` holds nothing but that (a storageUri that names a folder's parent)."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return root


def inferred_config(folder: Path, name: str, environ: dict[str, str] | None = None) -> ServerConfig:
    """The config of a folder without a server.yaml: its prototxt and caffemodel, the net's own I/O."""
    prototxt = _one(folder, "*.prototxt", "prototxt", prefer=("deploy.prototxt",))
    weights = _one(folder, "*.caffemodel", "caffemodel")
    labels = next((folder / n for n in LABEL_NAMES if (folder / n).is_file()), None)
    model = {"prototxt": prototxt.name, "weights": weights.name}
    if labels is not None:
        model["labels"] = labels.name
    return parse_config({"name": name, "model": model}, base_dir=str(folder), environ=environ)


def default_name(path: Path) -> str:
    """A model name from a folder's name (what a URL may hold), for a folder without a config."""
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "-" for c in path.resolve().name).strip("-.") or "model"
    return cleaned[:63]


def config_from(path: str | os.PathLike, name: str | None = None,
                environ: dict[str, str] | None = None) -> tuple[ServerConfig, str]:
    """The config a config file or a model folder gives, and which it was ("file", "folder config",
    "inferred"); `name` (KServe's --model_name) replaces the config's model name."""
    p = Path(path)
    if p.is_dir():
        folder = _model_folder(p)
        config_file = next((folder / n for n in CONFIG_NAMES if (folder / n).is_file()), None)
        if config_file is not None:
            cfg, source = load_config(config_file, environ), "folder config"
        else:
            cfg, source = inferred_config(folder, name or default_name(p), environ), "inferred"
    else:  # a config file (load_config says when it cannot be read)
        cfg, source = load_config(p, environ), "file"
    if name is not None and name != cfg.name:
        try:
            renamed = ServerConfig.model_validate({**cfg.model_dump(by_alias=True), "name": name})
        except ValidationError as e:
            raise ConfigError(f"invalid model name {name!r}: {format_validation_error(e)}") from None
        renamed.base_dir = cfg.base_dir
        cfg = renamed
    return cfg, source
