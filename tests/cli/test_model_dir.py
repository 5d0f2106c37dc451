"""A model folder as KServe's storage initializer leaves it (/mnt/models), read by `caffeserve serve --model_dir`
and `caffeserve export`: which config it gives (its server.yaml, else the defaults inferred from the prototxt),
and the clear exit-2 message for a folder that does not say which files to serve. The serving itself is tested
in tests/cluster/test_kserve.py (the server started from the runtime's args)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from caffe_testing import REPO
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.servers import CAFFESERVE
from inference_server.config import ConfigError
from inference_server.model_dir import config_from


def copy_digits(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(DIGITS_DIR / name, folder / name)
    return folder


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CAFFESERVE, "serve", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_a_folder_without_config_gets_the_nets_own_io_and_its_labels(tmp_path):
    folder = copy_digits(tmp_path / "digits-v2", "deploy.prototxt", "digits.caffemodel", "labels.txt")
    cfg, source = config_from(folder, environ={})
    assert source == "inferred" and cfg.name == "digits-v2"
    assert (cfg.model.prototxt, cfg.model.weights, cfg.model.labels) == ("deploy.prototxt", "digits.caffemodel",
                                                                        "labels.txt")
    assert cfg.inputs is None and cfg.outputs is None and cfg.preprocessing is None  # the net decides
    assert cfg.path(cfg.model.weights) == folder / "digits.caffemodel"
    # KServe's --model_name wins; CAFFESERVE__ variables (an InferenceService's env) still apply
    cfg, _ = config_from(folder, "digits", environ={"CAFFESERVE__DEVICE__KIND": "gpu"})
    assert cfg.name == "digits" and cfg.device.kind == "gpu"


def test_deploy_prototxt_is_preferred_and_a_lone_subfolder_is_entered(tmp_path):
    folder = copy_digits(tmp_path / "mnt" / "model", "deploy.prototxt", "digits.caffemodel")
    shutil.copy(DIGITS_DIR / "deploy.prototxt", folder / "train_val.prototxt")
    cfg, _ = config_from(tmp_path / "mnt", "m", environ={})
    assert cfg.model.prototxt == "deploy.prototxt" and cfg.path(cfg.model.prototxt) == folder / "deploy.prototxt"


def test_a_server_yaml_in_the_folder_is_the_config_with_kserves_name(tmp_path):
    folder = copy_digits(tmp_path / "m", "deploy.prototxt", "digits.caffemodel", "labels.txt", "server.yaml")
    cfg, source = config_from(folder, "digits-isvc", environ={})
    assert source == "folder config" and cfg.name == "digits-isvc"
    assert cfg.preprocessing is not None and cfg.preprocessing.raw_scale == 16.0  # the file's own fields
    assert cfg.model.weights_sha256 is not None and cfg.base_dir == str(folder)
    with pytest.raises(ConfigError, match="invalid model name 'no spaces'"):
        config_from(folder, "no spaces", environ={})


def test_a_folder_that_does_not_say_what_to_serve_exits_2_naming_the_files(tmp_path):
    two = copy_digits(tmp_path / "two", "deploy.prototxt", "digits.caffemodel")
    shutil.copy(DIGITS_DIR / "digits.caffemodel", two / "old.caffemodel")
    r = serve("--model_dir", two)
    assert r.returncode == 2 and "2 caffemodels (digits.caffemodel, old.caffemodel)" in r.stderr, r.stderr
    assert "server.yaml" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = serve("--model_dir", empty)
    assert r.returncode == 2 and "has no prototxt" in r.stderr, r.stderr
    r = serve("--model_dir", tmp_path / "missing")
    assert r.returncode == 2 and "is not a folder" in r.stderr, r.stderr
    r = serve("--model_dir", two, "--config", DIGITS_DIR / "server.yaml")
    assert r.returncode == 2 and "not allowed with" in r.stderr, r.stderr
    r = serve()
    assert r.returncode == 2 and "--config" in r.stderr and "--model_dir" in r.stderr, r.stderr
