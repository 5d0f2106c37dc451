"""What a new user meets first: the extras each command needs, `--version`, `--help`, documented defaults."""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import yaml

from caffe_testing import REPO
from inference_server import __version__
from inference_server.config import ServerConfig

PROJECT = ("caffeserve", "caffe_local", "caffe_operator", "caffe_gateway", "inference_server", "caffe_http")


def caffeserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caffeserve", *args], capture_output=True, text=True, timeout=60)


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a `try:` whose handler catches ImportError: an optional
    dependency, with its extra named in the error it raises (e.g. boto3 for s3:// sources)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            out.update(
                id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))
            )
    return out


def imported_names(path: Path) -> set[str]:
    """Every module an import statement in the file names (function-level imports too), except
    optional ones (guarded by `except ImportError`)."""
    names: set[str] = set()
    package = ".".join(
        path.relative_to(REPO / "operator" if "caffe_operator" in path.parts else REPO).with_suffix("").parts[:-1]
    )
    tree = ast.parse(path.read_text())
    optional = _optional_imports(tree)
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names.add(module)
                names.update(f"{module}.{a.name}" for a in node.names)
            else:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def third_party_imports(roots: list[Path]) -> set[str]:
    """Top-level third-party modules reachable from the roots through the project's own modules."""
    seen: set[Path] = set()
    todo, found = list(roots), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            top = name.split(".")[0]
            if top in PROJECT:
                spec = importlib.util.find_spec(name) if _is_module(name) else None
                if spec and spec.origin and spec.origin.endswith(".py"):
                    todo.append(Path(spec.origin))
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def installed_with(dists: set[str]) -> set[str]:
    """The distributions and everything they require, transitively (what pip installs with them)."""
    todo, out = list(dists), set()
    while todo:
        d = todo.pop()
        if d in out:
            continue
        out.add(d)
        try:
            reqs = [r for r in (md.requires(d) or []) if "extra ==" not in r]
        except md.PackageNotFoundError:
            continue
        todo.extend(requirement_names(reqs))
    return out


def test_caffeserve_demo_needs_only_the_extras_the_readme_names():
    readme = (REPO / "README.md").read_text()
    extras = re.search(r"pip install -e '\.\[([a-z,]+)\]'` for `caffeserve demo`", readme).group(1).split(",")
    meta = md.metadata("caffe-serving")
    requires = meta.get_all("Requires-Dist") or []
    wanted = [r for r in requires if "extra ==" not in r]
    wanted += [r for r in requires if any(f'extra == "{e}"' in r for e in extras)]
    # pycaffe and what `import caffe` needs come from scripts/caffe/install_pycaffe.sh, not from pip extras
    script = (REPO / "scripts" / "caffe" / "install_pycaffe.sh").read_text()
    pycaffe_line = re.search(r"pip install -q 'numpy<2' (six .*)$", script, re.M).group(1).replace("'", "").split()
    allowed = installed_with(requirement_names(wanted) | requirement_names(pycaffe_line))
    by_module = md.packages_distributions()
    roots = [REPO / "caffe_local" / "demo.py", REPO / "inference_server" / "commands" / "serve.py",
             REPO / "examples" / "digits" / "data.py"]
    missing = {}
    for module in third_party_imports(roots) - {"caffe"}:
        dists = {d.lower().replace("_", "-") for d in by_module.get(module, [])}
        if not dists & allowed:
            missing[module] = sorted(dists)
    assert not missing, f"`caffeserve demo` imports modules no named extra installs: {missing}"
    assert "sklearn" in third_party_imports(roots)  # the scan does see the demo's lazy imports


def test_version_is_the_package_version():
    result = caffeserve("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"caffeserve {__version__}"
    assert md.version("caffe-serving") == __version__


def test_serve_help_tells_defaults_and_where_the_config_is_described():
    result = caffeserve("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "README" in text and "The inference server" in text and "config.py" not in text
    for option, default in (("--host", "127.0.0.1"), ("--port", "8080"), ("--log-level", "INFO"),
                            ("--grace-period", "30")):
        assert re.search(rf"{option} \S+ .*?\(default {re.escape(default)}[:;)]", text), (option, text)


def readme_config_block() -> dict:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The inference server", 1)[1]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))


def test_readme_config_block_shows_the_defaults():
    documented = readme_config_block()
    defaults = ServerConfig.model_validate({"name": "m", "model": {"prototxt": "p", "weights": "w"}}).model_dump(
        by_alias=True, mode="json")
    for key in ("backend", "instances", "device", "batching", "limits"):
        shown = documented[key]
        expected = {k: defaults[key][k] for k in shown} if isinstance(shown, dict) else defaults[key]
        assert shown == expected, key


def test_docs_state_the_configs_default_backend():
    default = ServerConfig.model_fields["backend"].default
    onnx_md = (REPO / "docs" / "onnx.md").read_text()
    assert f"`backend` defaults to `{default}`" in onnx_md
    assert "defaults to `pycaffe`" not in onnx_md and "the default today" not in onnx_md
    assert f"| `{default}` (the default) |" in onnx_md
