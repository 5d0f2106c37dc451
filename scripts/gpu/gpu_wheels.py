#!/usr/bin/env python3
"""Which Python wheels the GPU bundle carries, computed from pyproject.toml (no hand-kept list).

The lent GPU machine (scripts/gpu/lent-gpu-packages.txt, from the device tool's KINDS.md) runs Python 3.12
with numpy, grpcio, protobuf, PyYAML and many more already there, and nothing can be fetched there. The
bundle carries the rest of what the model server and the check's own client need:

    roots   = pyproject's `dependencies` + pycaffe's imports + the check's gRPC client (tritonclient[grpc],
              as pyproject's `test` extra pins it)
    closure = the roots and their requirements, markers evaluated for the lent machine's Python 3.12 on
              Linux x86-64, at the versions this interpreter (the project venv) runs; a package the lent
              machine has ends the walk there (its own needs are installed beside it)
    bundle  = the closure minus the lent machine's packages

    python scripts/gpu/gpu_wheels.py pins       name==version per wheel to carry (scripts/gpu/gpu_bundle.sh)
    python scripts/gpu/gpu_wheels.py lent       the lent packages the closure reaches, pinned where KINDS.md
                                            gives a version (the rehearsal's Python 3.12 venv installs them)
    python scripts/gpu/gpu_wheels.py stamp OUT  after a passing rehearsal (make gpu-rehearsal): record in
                                            scripts/gpu/gpu-rehearsal.json what it was rehearsed with

Run by the project venv's Python: the versions are the ones its tests ran.

What `caffeserve serve` really imports is measured, not assumed: `startup_modules` runs the server on the
digits example under `python -X importtime` (startup, model load, one request). tests/packaging/
test_gpu_wheels.py holds every module of it (and of the check's gRPC client) against the bundle and the
lent machine, and holds scripts/gpu/gpu-rehearsal.json's fingerprint against today's inputs, so that a change to
the dependencies, the server's imports or the GPU scripts fails `make test` until the rehearsal is rerun.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = next(p for p in HERE.parents if (p / "pyproject.toml").exists())


def script(name: str) -> Path:
    """A file of scripts/ by its name, wherever under scripts/ it lives."""
    return next((REPO / "scripts").rglob(name))


LENT_LIST = script("lent-gpu-packages.txt")

# What `import caffe` needs: pycaffe is not a distribution, so scripts/caffe/install_pycaffe.sh's pip line declares it
# (tests/packaging/test_packaging.py reads the same line).
PYCAFFE_LINE = re.compile(r"pip install -q 'numpy<2' (six .*)$", re.M)


def pycaffe_needs() -> list[str]:
    return ["numpy", *PYCAFFE_LINE.search(script("install_pycaffe.sh").read_text()).group(1).replace("'", "").split()]
# The check's gRPC client, from pyproject's `test` extra, with only the extra the check uses.
CHECK_CLIENT = ("tritonclient", {"grpc"})


def lent_environment(python: str) -> dict:
    """Marker variables of the lent machine's interpreter (CPython `python` on Linux x86-64)."""
    return {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python,
            "implementation_name": "cpython", "implementation_version": python,
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "os_name": "posix", "platform_release": "", "platform_version": ""}


def read_lent(path: Path = LENT_LIST) -> tuple[str, dict[str, str | None]]:
    """(the lent machine's Python version, {canonical package name: version or None})."""
    python, packages = "3.12", {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "python":
            python = words[1]
            continue
        packages[canonicalize_name(words[0])] = words[1] if len(words) > 1 else None
    return python, packages


def roots(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]] + [Requirement(r) for r in pycaffe_needs()]
    name, extras = CHECK_CLIENT
    client = [Requirement(r) for r in project["optional-dependencies"]["test"]
              if canonicalize_name(Requirement(r).name) == name]
    if not client:
        raise SystemExit(f"pyproject's test extra no longer names {name}: the check's gRPC client")
    client[0].extras = client[0].extras & extras
    return reqs + client


def closure(reqs: list[Requirement], lent: dict[str, str | None], env: dict,
            version=metadata.version, requires=metadata.requires) -> tuple[dict[str, str], set[str]]:
    """({package to carry: installed version}, {lent packages reached}) for `reqs` on the lent machine."""
    carry: dict[str, str] = {}
    reached: set[str] = set()
    todo = [(r, "") for r in reqs]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name in lent:
            reached.add(name)
            continue
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            carry[name] = version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} (needed on the lent machine: {req}) is not installed in this venv "
                             f"({sys.executable}): run make setup, or add it to pyproject") from None
        for spec in requires(name) or []:
            sub = Requirement(spec)
            marker = str(sub.marker) if sub.marker else ""
            if "extra" in marker:  # only the extras asked for
                for x in req.extras or {""}:
                    if x and sub.marker.evaluate({**env, "extra": x}):
                        sub.marker = None
                        todo.append((sub, ""))
                continue
            todo.append((sub, ""))
    return carry, reached


def bundle(pyproject: Path = REPO / "pyproject.toml", lent_list: Path = LENT_LIST):
    """({name: version} to carry, {lent name: lent version or None} reached)."""
    python, lent = read_lent(lent_list)
    carry, reached = closure(roots(pyproject), lent, lent_environment(python))
    return carry, {n: lent[n] for n in sorted(reached)}


# ------------------------------------------------------------------------------------ what the server imports
FIRST_PARTY = {p.name for p in [*REPO.iterdir(), *(REPO / "operator").iterdir()] if (p / "__init__.py").exists()}
OURS = "caffe-serving"  # this repository (its editable install's finder too): it travels as the working tree
PYCAFFE = "caffe"  # not a distribution: the bundle's caffe/ (pycaffe built for Python 3.12)
GONE_IN_312 = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}  # in 3.11's standard library, not 3.12's
# what scripts/gpu/gpu_check.py's steps import beyond the standard library
CLIENT_IMPORTS = "import numpy, yaml, tritonclient.grpc, caffe_testing.servers"

# Run in the measured process before anything else: refuse the blocked modules (as if not installed, which an
# optional import survives) and write sys.modules at exit: what was really imported, failed tries left out.
PRELUDE = """
import atexit, json, os, sys
_blocked = tuple(filter(None, os.environ.get("GPU_WHEELS_BLOCK", "").split(",")))
class _Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in _blocked):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the lent machine)", name=name)
sys.meta_path.insert(0, _Block())
atexit.register(lambda: open(os.environ["GPU_WHEELS_MODULES"], "w").write(json.dumps(
    {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())})))
"""


def blocked_prefixes(allowed: set[str], owners: dict[str, str]) -> list[str]:
    """The module prefixes of installed distributions outside `allowed`: top-level names, or second-level
    ones inside a namespace an allowed distribution shares (google.api beside protobuf's google.protobuf)."""
    inside = {m.split(".")[0] for m, d in owners.items() if d in allowed}
    out = set()
    for mod, dist in owners.items():
        if dist in allowed:
            continue
        parts = mod.split(".")
        if parts[0] in FIRST_PARTY or parts[0] == PYCAFFE or parts[0] in sys.stdlib_module_names:
            continue
        out.add(parts[0] if parts[0] not in inside else ".".join(parts[:2]))
    return sorted(p for p in out if "." in p or p not in inside)


def _measured(argv: list[str], env: dict, timeout: float, until=None) -> dict[str, str | None]:
    with tempfile.TemporaryDirectory() as tmp:
        modules, log = Path(tmp) / "modules.json", Path(tmp) / "log"
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env, "GPU_WHEELS_MODULES": str(modules),
                                         "GLOG_minloglevel": "2"})
        try:
            if until is not None:
                until(proc, log)
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not modules.exists():
            raise RuntimeError(f"{argv[-1]!r} ended with {proc.returncode} before writing its modules: "
                               f"{log.read_text()[-3000:]}")
        return json.loads(modules.read_text())


def startup_modules(blocked: list[str] = (), python: str = sys.executable, timeout: float = 180) -> dict:
    """{module: its file} for every module `caffeserve serve` holds after startup, model load and one request on the
    digits example, with the `blocked` module prefixes refused: raises if it then fails to start or to answer."""
    import urllib.request

    import yaml

    digits = REPO / "examples" / "digits"
    cfg = yaml.safe_load((digits / "server.yaml").read_text())
    for key in ("prototxt", "weights", "labels"):
        cfg["model"][key] = str(digits / cfg["model"][key])

    def serve_once(proc, log: Path) -> None:
        deadline, url = time.monotonic() + timeout, None
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready: {log.read_text()[-3000:]}")
            if url is None and (m := re.search(r"listening on http://[\d.]+:(\d+)", log.read_text())):
                url = f"http://127.0.0.1:{m.group(1)}"
            if url is not None:
                try:
                    with urllib.request.urlopen(url + "/v2/health/ready", timeout=5):
                        break
                except OSError:
                    pass
            time.sleep(0.2)
        body = json.dumps({"inputs": [{"name": "data", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": [1.0] * 64}]}).encode()
        req = urllib.request.Request(url + "/v2/models/digits/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            if r.status != 200:
                raise RuntimeError(f"the server answered {r.status}")

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "server.yaml"
        config.write_text(yaml.safe_dump(cfg))
        code = PRELUDE + "import runpy\nsys.argv[0] = 'caffeserve'\nrunpy.run_module('caffeserve', run_name='__main__')"
        return _measured([python, "-c", code, "serve", "--config", str(config), "--port", "0", "--grpc-port", "0",
                          "--no-access-log"], {"GPU_WHEELS_BLOCK": ",".join(blocked)}, timeout, serve_once)


def client_modules(blocked: list[str] = (), python: str = sys.executable) -> dict:
    """{module: its file} for the modules the check's steps hold after their imports (tritonclient.grpc, ...),
    `blocked` refused."""
    return _measured([python, "-c", PRELUDE + CLIENT_IMPORTS], {"GPU_WHEELS_BLOCK": ",".join(blocked)}, 120)


def _installed_files():
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for f in dist.files or []:
            path = str(f)
            if path.endswith((".py", ".so")) and "__pycache__" not in path and not path.startswith(".."):
                yield name, path, dist


def module_owners() -> dict[str, str]:
    """{dotted module name: the distribution whose files hold it}, from every installed distribution's RECORD."""
    owners = {}
    for name, path, _ in _installed_files():
        parts = path.split("/")
        stem = parts[-1].split(".")[0]
        mod = parts[:-1] + ([] if stem == "__init__" else [stem])
        if mod and all(p.isidentifier() for p in mod):
            owners.setdefault(".".join(mod), name)
    return owners


def file_owners() -> dict[str, str]:
    """{a module file's absolute path: its distribution}."""
    return {os.path.normpath(str(dist.locate_file(path))): name for name, path, dist in _installed_files()}


STDLIB = tuple(os.path.normpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib"))
SITE = tuple(os.path.normpath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib"))


def distributions_of(modules: dict[str, str | None], owners: dict[str, str]) -> tuple[dict[str, set[str]], set[str]]:
    """({distribution: its modules}, modules of no distribution) for {module: file}; the standard library
    (Python 3.12's), this repository, pycaffe and file-less modules (built in, namespaces) are left out."""
    dists: dict[str, set[str]] = {}
    orphans = set()
    for mod, file in modules.items():
        top = mod.split(".")[0]
        if top in GONE_IN_312:
            orphans.add(mod)
            continue
        if file is None or top == PYCAFFE or os.sep + PYCAFFE + os.sep in file:
            continue
        path = os.path.normpath(file)
        if path.startswith(str(REPO) + os.sep) and not path.startswith(SITE):
            continue
        if path.startswith(STDLIB) and not path.startswith(SITE):
            continue
        owner = owners.get(path)
        if owner == OURS:
            continue
        if owner is None:
            orphans.add(mod)
        else:
            dists.setdefault(owner, set()).add(mod)
    return dists, orphans


def lent_allowed(carry) -> set[str]:
    """What the lent machine will hold: the bundle's wheels, its own packages, this repository."""
    return set(carry) | set(read_lent()[1]) | {OURS}


def missing(needed: set[str], carry: set[str], lent: set[str]) -> list[str]:
    """The distributions needed on the lent machine that neither the bundle nor the machine has."""
    return sorted(d for d in needed if d not in carry and d not in lent)


# ------------------------------------------------------------------------------------ keep the rehearsal true
STAMP = HERE / "gpu-rehearsal.json"
# by name, wherever under scripts/ they live: moving them needs no new rehearsal, changing them does
GPU_FILES = ["gpu_check.py", "gpu_check.sh", "gpu_bundle.sh", "gpu_wheels.py", "cuda_build.sh", "cuda-wheels.txt",
             "lent-gpu-packages.txt"]


def rehearsed_files() -> list[str]:
    """These GPU scripts, every file of the CUDA build (scripts/caffe/build_key.py's list: what its cache key
    hashes) and the install-time patch the bundle applies."""
    spec = importlib.util.spec_from_file_location("build_key", script("build_key.py"))
    build_key = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_key)
    return GPU_FILES + build_key.build_files(cuda=True) + ["patch_pycaffe_io.py"]


def fingerprint(startup_dists: set[str]) -> dict:
    """What a rehearsal depends on: the bundle's wheels and the lent packages reached (names: a fresh venv
    may resolve newer versions), the distributions the server imports, and the GPU scripts' contents."""
    carry, reached = bundle()
    files = {f: hashlib.sha256(script(f).read_bytes()).hexdigest()[:12] for f in rehearsed_files()}
    return {"wheels": sorted(carry), "lent": sorted(reached), "server_imports": sorted(startup_dists),
            "files": files}


def write_stamp(out: Path) -> None:
    results = json.loads((out / "gpu_check.json").read_text())
    if results.get("failed") or results.get("stopped"):
        raise SystemExit(f"the rehearsal did not pass (failed: {results.get('failed')}): no stamp written")
    if results.get("check_sha256") != hashlib.sha256(script("gpu_check.py").read_bytes()).hexdigest()[:12]:
        raise SystemExit("that rehearsal ran another scripts/gpu/gpu_check.py than today's: rerun make gpu-rehearsal")
    carry, _ = bundle()
    blocked = blocked_prefixes(lent_allowed(carry), module_owners())
    dists, _ = distributions_of(startup_modules(blocked), file_owners())
    STAMP.write_text(json.dumps({
        "what": "the inputs of the last passing `make gpu-rehearsal` (scripts/gpu/gpu_wheels.py stamp); "
                "tests/packaging/test_gpu_wheels.py fails when today's differ",
        "fingerprint": fingerprint(set(dists)),
        "rehearsed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": results.get("seconds"),
        "summary": {name: f"{r['status'].upper()}: {r['summary'][:200]}" for name, r in results["steps"].items()},
    }, indent=1) + "\n")
    print(f"[gpu_wheels] {STAMP.relative_to(REPO)} written")


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "pins"
    carry, reached = bundle()
    if what == "pins":
        print("\n".join(f"{n}=={v}" for n, v in sorted(carry.items())))
    elif what == "lent":
        print("\n".join(f"{n}=={v}" if v else n for n, v in reached.items()))
    elif what == "stamp" and len(argv) == 2:
        write_stamp(Path(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
