"""The GPU bundle's wheels (scripts/gpu/gpu_wheels.py) against what the server really imports. No build needed.

A lent GPU machine has no network: a module `caffeserve serve` needs that neither the bundle nor the
machine holds ends the one check a task may get (it happened: grpcio joined the server's dependencies
after a hand-written wheel list). Here the real server runs on the digits example (startup, model load,
one request) with every installed distribution that will not be on the lent machine refused at import,
as if absent (optional imports survive that, as they would there): it must start and answer. The modules
it then holds, and those the check's gRPC client holds, must each come from the standard library (3.12's),
this repository, the bundle's pycaffe, a wheel the bundle carries or a package of the lent machine
(scripts/gpu/lent-gpu-packages.txt); taking any one imported wheel out of the set must fail that.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from caffe_testing import REPO


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, next((REPO / "scripts").rglob(f"{name}.py")))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wheels = load_script("gpu_wheels")


@pytest.fixture(scope="module")
def measured():
    carry, reached = wheels.bundle()
    _, lent = wheels.read_lent()
    blocked = wheels.blocked_prefixes(wheels.lent_allowed(carry), wheels.module_owners())
    owners = wheels.file_owners()
    server, server_orphans = wheels.distributions_of(wheels.startup_modules(blocked), owners)
    client, client_orphans = wheels.distributions_of(wheels.client_modules(blocked), owners)
    return {"server": server, "client": client, "orphans": server_orphans | client_orphans, "blocked": blocked,
            "carry": set(carry), "lent": set(lent), "reached": reached}


def test_the_bundle_comes_from_pyproject_less_the_lent_machine(measured):
    carry, lent = measured["carry"], measured["lent"]
    assert not carry & lent  # nothing the machine has travels
    for name in ("pydantic", "orjson", "httptools", "tritonclient"):  # declared, and not on the machine
        assert name in carry, sorted(carry)
    for name in ("numpy", "grpcio", "pyyaml", "protobuf"):  # declared, and on the machine
        assert name not in carry and name in measured["reached"]


def test_every_module_the_server_and_the_check_import_is_in_the_bundle_or_on_the_lent_machine(measured):
    assert "grpc_tools" in measured["blocked"]  # the test extra's grpcio-tools: installed here, not there
    assert not measured["orphans"], f"modules of no distribution: {sorted(measured['orphans'])}"
    server, client = measured["server"], measured["client"]
    assert {"pydantic", "grpcio", "numpy"} <= set(server)  # the measurement sees the server's real imports
    assert "tritonclient" in client
    for needed in (server, client):
        assert wheels.missing(set(needed), measured["carry"], measured["lent"]) == [], {
            d: sorted(needed[d])[:3] for d in wheels.missing(set(needed), measured["carry"], measured["lent"])}


def test_removing_any_imported_wheel_from_the_bundle_fails_the_check(measured):
    needed = set(measured["server"]) | set(measured["client"])
    imported_wheels = sorted(needed & measured["carry"])
    assert len(imported_wheels) >= 5, imported_wheels
    for wheel in imported_wheels:
        assert wheels.missing(needed, measured["carry"] - {wheel}, measured["lent"]) == [wheel]


def test_a_dependency_the_lent_machine_lacks_is_carried(tmp_path):
    """A new runtime dependency in pyproject lands in the bundle by itself (no list to edit)."""
    pyproject = (REPO / "pyproject.toml").read_text().replace('"grpcio>=1.60",', '"grpcio>=1.60", "kmock",')
    (tmp_path / "pyproject.toml").write_text(pyproject)
    carry, _ = wheels.bundle(tmp_path / "pyproject.toml")
    assert "kmock" in carry  # installed by the test extra; not on the lent machine
    lent = tmp_path / "lent.txt"
    lent.write_text(wheels.LENT_LIST.read_text() + "kmock\n")
    assert "kmock" not in wheels.bundle(tmp_path / "pyproject.toml", lent)[0]


def test_the_last_rehearsal_was_of_todays_inputs(measured):
    """Keep it true: a change to the bundle's wheels, the server's imports or the GPU scripts needs a passing
    `make gpu-rehearsal`, which records its inputs in scripts/gpu/gpu-rehearsal.json (commit that file)."""
    stamp = json.loads(wheels.STAMP.read_text())["fingerprint"]
    now = wheels.fingerprint(set(measured["server"]))
    changed = {k: {"rehearsed": stamp.get(k), "now": v} for k, v in now.items() if stamp.get(k) != v}
    if "files" in changed:
        changed["files"] = {f: h for f, h in now["files"].items() if stamp.get("files", {}).get(f) != h}
    assert not changed, ("the GPU rehearsal is out of date: run `make cuda-build gpu-rehearsal` (it rewrites "
                         f"scripts/gpu/gpu-rehearsal.json) and commit it. Changed since: {json.dumps(changed)[:2000]}")


def test_a_module_3_12_lacks_is_not_taken_for_the_standard_library():
    import json as stdlib_json

    import inference_server.serving.app

    dists, orphans = wheels.distributions_of({"distutils.util": "/anywhere/distutils/util.py",
                                              "json": stdlib_json.__file__, "sys": None,
                                              "inference_server.serving.app": inference_server.serving.app.__file__,
                                              "caffe.io": "/scratch/caffe/io.py"}, {})
    assert orphans == {"distutils.util"} and dists == {}
    assert sys.version_info >= (3, 11)


def test_a_blocked_distribution_is_refused_and_a_namespace_is_blocked_below_its_shared_part():
    owners = {"google.protobuf.message": "protobuf", "google.api.http_pb2": "googleapis-common-protos",
              "grpc_tools.protoc": "grpcio-tools", "numpy.core": "numpy"}
    assert wheels.blocked_prefixes({"protobuf", "numpy"}, owners) == ["google.api", "grpc_tools"]
    with pytest.raises(RuntimeError, match="No module named 'pydantic' .not on the lent machine"):
        wheels.startup_modules(["pydantic"], timeout=60)  # the server cannot start without it
