"""The build scripts: the one Debian package list, the source patches both Caffe builds apply through one
entry point, the build cache key made of the build files' contents, the check that a cached build cannot
hide a package the list lacks, the GPU image's runtime packages, and that no file names a path under
scripts/ that does not exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from caffe_testing import REPO
from caffe_testing.caffe_sources import POOLING_CPP_SNIPPET, PYCAFFE_SNIPPET, caffe_tree

SCRIPTS = REPO / "scripts"
CAFFE = SCRIPTS / "caffe"


def run(script: str, *args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable] if script.endswith(".py") else ["bash"]
    return subprocess.run(cmd + [str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True, **kw)


def listed_packages() -> list[str]:
    return run("system/setup_system.sh", "--print", check=True).stdout.split()


def dockerfile(name: str) -> str:
    return (REPO / name).read_text()


def test_the_one_package_list_holds_what_the_build_and_tests_need():
    packages = listed_packages()
    assert "libgtest-dev" in packages, "the sdist's net.cpp includes a gtest header"
    for needed in ("cmake", "libboost-python-dev", "libprotobuf-dev", "protobuf-compiler", "libgoogle-glog-dev",
                   "libopenblas-dev", "libhdf5-dev", "wrk"):
        assert needed in packages
    # no other script names a package of its own: the list is read, never repeated
    for script in ("caffe/install_pycaffe.sh", "caffe/build_caffe.sh", "system/setup_system.sh",
                   "system/check_build_debs.sh"):
        assert not re.search(r"libboost-\w+-dev|apt-get install\S* .*lib", (SCRIPTS / script).read_text())
    assert 'bash "$SYSTEM/setup_system.sh"' in (CAFFE / "build_caffe.sh").read_text()


def test_the_installed_build_compiled_only_against_listed_packages():
    """What this machine's pycaffe build recorded (its headers' packages) passes the check."""
    import caffe

    build_id = (Path(caffe.__file__).parent / "BUILD_ID").read_text().strip()
    cache = Path(os.environ.get("CAFFE_SERVING_CACHE") or Path.home() / ".cache" / "caffe-serving")
    recorded = cache / build_id / "build-debs.txt"
    used = recorded.read_text().split()
    assert any(p.startswith("libgtest") or p == "googletest" for p in used), used
    assert any(p.startswith("libboost") for p in used), used
    assert run("system/check_build_debs.sh", recorded).returncode == 0


def test_a_package_the_list_lacks_fails_the_check_even_when_installed_by_hand(tmp_path):
    used = tmp_path / "build-debs.txt"
    used.write_text("libprotobuf-dev\nlibgtest-dev\n")
    assert run("system/check_build_debs.sh", used).returncode == 0
    used.write_text("libprotobuf-dev\nlibsomething-by-hand-dev\n")
    result = run("system/check_build_debs.sh", used)
    assert result.returncode == 1
    assert "libsomething-by-hand-dev" in result.stderr and "debian-packages.txt" in result.stderr


def test_source_patches_release_the_gil_lift_the_weights_limit_and_add_the_fork_layers(tmp_path):
    src = caffe_tree(tmp_path / "caffe")
    first = run("caffe/apply_patches.py", "source", src)
    assert first.returncode == 0, first.stderr
    cpp = (src / "python" / "caffe" / "_caffe.cpp").read_text()
    assert '.def("_forward", &Net_ForwardFromTo_NoGIL)' in cpp and "PyEval_SaveThread()" in cpp
    io_cpp = (src / "src" / "caffe" / "util" / "io.cpp").read_text()
    assert io_cpp.count("SetTotalBytesLimit(INT_MAX)") == 2 and "536870912" not in io_cpp
    assert "#include <climits>" in io_cpp
    assert (src / "src" / "caffe" / "layers" / "axpy_layer.cpp").exists()
    assert (src / "include" / "caffe" / "layers" / "python_layer.hpp").read_text().count("PythonLayerGIL gil;") == 4
    pooling = (src / "src" / "caffe" / "layers" / "pooling_layer.cpp").read_text()
    forward, backward = pooling.split("void PoolingLayer<Dtype>::Backward_cpu(")
    assert "const int bottom_step = bottom[0]->count(2);" in forward and "bottom_data += bottom_step;" in forward
    assert "for (int n = 0; n < num; ++n)" in forward and "int hend = min(hstart + kernel_h, height);" in forward
    assert "->offset(" not in forward.split("const int top_step")[1] and "kernel_h_;" in forward
    assert backward == POOLING_CPP_SNIPPET.split("void PoolingLayer<Dtype>::Backward_cpu(")[1]  # the forward only
    again = run("caffe/apply_patches.py", "source", src)
    assert again.returncode == 0
    assert "_caffe.cpp: already patched" in again.stdout and "io.cpp: already patched" in again.stdout
    assert "pooling_layer.cpp: already patched" in again.stdout
    assert "patched\n" not in again.stdout.replace("already patched", "")
    assert (src / "src" / "caffe" / "util" / "io.cpp").read_text() == io_cpp
    # each patch alone does what the entry point does
    alone = tmp_path / "alone.cpp"
    alone.write_text(PYCAFFE_SNIPPET)
    assert run("caffe/patch_pycaffe_gil.py", alone).returncode == 0
    assert alone.read_text() == cpp


def test_source_patches_refuse_sources_they_do_not_know(tmp_path):
    src = caffe_tree(tmp_path / "caffe")
    (src / "python" / "caffe" / "_caffe.cpp").write_text(PYCAFFE_SNIPPET.replace("ForwardFromTo", "Forward"))
    result = run("caffe/apply_patches.py", "source", src)
    assert result.returncode == 1 and "update the patch" in result.stderr
    path = tmp_path / "_caffe.cpp"
    path.write_text(PYCAFFE_SNIPPET.replace("ForwardFromTo", "Forward"))
    assert run("caffe/patch_pycaffe_gil.py", path).returncode == 1
    assert path.read_text() == PYCAFFE_SNIPPET.replace("ForwardFromTo", "Forward")
    assert run("caffe/apply_patches.py", "sources", src).returncode == 2  # a stage it does not know


def test_every_place_that_patches_calls_the_one_entry_point():
    """Seven patches, one caller: build_caffe.sh (sources), install_pycaffe.sh and gpu_bundle.sh (installed
    package); nothing else runs a patch_*.py itself."""
    callers = {}
    for path in [*SCRIPTS.rglob("*.sh"), REPO / "Makefile", *REPO.glob("Dockerfile.*")]:
        text = path.read_text()
        if "apply_patches.py" in text:
            callers[path.name] = re.findall(r'apply_patches\.py" (\w+)', text)
        invoked = re.findall(r'(?:python\S*"?|\$PY"?)\s+"?[^"\s]*(patch_\w+\.py)', text)
        assert not invoked, f"{path.relative_to(REPO)} runs {invoked} itself: call scripts/caffe/apply_patches.py"
    assert callers == {"build_caffe.sh": ["source"], "install_pycaffe.sh": ["installed", "installed"],
                       "gpu_bundle.sh": ["installed"]}, callers


def build_key(scripts: Path, *args: str) -> str:
    return subprocess.run([sys.executable, str(scripts / "build_key.py"), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_build_cache_key_follows_the_contents_of_the_build_files(tmp_path):
    """build_caffe.sh names its cached build with build_key.py: the same files give the same key wherever
    they lie; any change to a patch, a fork layer or the build script gives a new one (a rebuild), and a
    CUDA-only file changes only the CUDA key. No constant to bump by hand."""
    copy = tmp_path / "a" / "caffe"
    shutil.copytree(CAFFE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    cpu, cuda = build_key(copy), build_key(copy, "--cuda")
    assert re.fullmatch(r"[0-9a-f]{12}", cpu) and cpu != cuda
    assert (cpu, cuda) == (build_key(CAFFE), build_key(CAFFE, "--cuda"))  # the path is not part of it
    assert build_key(copy) == cpu  # nothing changed, nothing rebuilt
    (copy / "README-not-a-build-file.txt").write_text("x")
    assert build_key(copy) == cpu  # a file that makes no build is not part of it
    for name in ("patch_caffe_proto_limit.py", "caffe_forks/axpy_layer.cpp", "build_caffe.sh"):
        original = (copy / name).read_bytes()
        (copy / name).write_bytes(original + b"\n")
        assert build_key(copy) != cpu and build_key(copy, "--cuda") != cuda, name
        (copy / name).write_bytes(original)
        assert build_key(copy) == cpu
    (copy / "patch_caffe_cuda.py").write_bytes((copy / "patch_caffe_cuda.py").read_bytes() + b"\n")
    assert build_key(copy) == cpu and build_key(copy, "--cuda") != cuda
    (copy / "caffe_forks" / "new_layer.cpp").write_text("// caffe-serving: a new layer\n")
    assert build_key(copy) != cpu  # a layer added to the forks is built


def test_the_build_names_its_cache_with_the_key():
    build = (CAFFE / "build_caffe.sh").read_text()
    assert 'KEY=$("$PY" "$HERE/build_key.py" "${CUDA_FLAG[@]}")' in build
    assert build.count("-$KEY\"") == 2  # the CPU and the CUDA cache folders
    assert "BUILD_LEVEL" not in build


def test_installed_pycaffe_carries_the_patches():
    """The pycaffe this suite runs is the patched build: caffe.io imports its resize, reads as_gray."""
    import caffe.io

    source = Path(caffe.io.__file__).read_text()
    assert "from skimage.transform import resize" in source and "as_grey" not in source


def test_protobuf_fix_makes_caffe_call_what_current_protobuf_has():
    """Caffe's io.cpp calls SetTotalBytesLimit(limit, warning_threshold) (BVLC) or with a 512 MiB literal
    (the sdist); protobuf 3.21 (Debian 12, Ubuntu 24.04) has only SetTotalBytesLimit(limit), and weights
    up to 2 GiB must load. patch_caffe_proto_limit.py, which both builds apply, turns either into that."""
    header = Path("/usr/include/google/protobuf/io/coded_stream.h")
    if header.exists():
        declared = re.findall(r"void SetTotalBytesLimit\(([^)]*)\)", header.read_text())
        assert declared == ["int total_bytes_limit"]
    sys.path.insert(0, str(CAFFE))
    try:
        import patch_caffe_proto_limit
    finally:
        sys.path.pop(0)
    for call in ("SetTotalBytesLimit(kProtoReadBytesLimit, 536870912)", "SetTotalBytesLimit(536870912)"):
        patched = patch_caffe_proto_limit.patch_proto_limit(f"  coded_input->{call};\n")
        assert "coded_input->SetTotalBytesLimit(INT_MAX);" in patched and "#include <climits>" in patched


def test_runtime_package_list_covers_what_pycaffe_links():
    """scripts/gpu/list_runtime_debs.sh on our own pycaffe build: the Debian packages of its libraries."""
    import caffe

    if shutil.which("dpkg") is None:
        pytest.skip("not a Debian/Ubuntu system")
    so = Path(caffe.__file__).parent / "_caffe.so"
    result = subprocess.run(["bash", str(SCRIPTS / "gpu" / "list_runtime_debs.sh"), str(so)],
                            capture_output=True, text=True, check=True)
    packages = result.stdout.split()
    for prefix in ("libboost-python", "libboost-filesystem", "libgoogle-glog", "libprotobuf", "libgflags",
                   "libopenblas"):
        assert any(p.startswith(prefix) for p in packages), (prefix, packages)
    assert not any(p.endswith("-dev") for p in packages)


# ------------------------------------------------------------------------ every path under scripts/ exists
SCRIPTS_PATH = re.compile(r"(?<![\w/.])scripts/[\w.*-][\w.*/-]*")
SHELL_BASE = re.compile(r'^\s*(\w+)=(?:\$\(cd "\$(\w+)([^"$]*)" && pwd\)|"\$(\w+)([^"$]*)")', re.M)
SHELL_REF = re.compile(r'\$\{?(\w+)\}?"?(/[\w.*/-]+)')
PY_CHAIN = re.compile(r'REPO((?:\s*/\s*"[\w.*-]+")+)')


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / f for f in out.stdout.splitlines() if (REPO / f).is_file()]


def exists(path: Path) -> bool:
    path = Path(os.path.normpath(path))
    if "*" in str(path):
        return any(REPO.glob(str(path.relative_to(REPO))))
    return path.exists()


def named_paths(path: Path, text: str) -> set[Path]:
    """The paths under scripts/ a file names: literally (scripts/...), in Python as REPO / "scripts" / ...,
    and in a shell script through $HERE, $(dirname "$0") and the folders assigned from them."""
    found = {REPO / m.rstrip(".") for m in SCRIPTS_PATH.findall(text)}
    found |= {REPO.joinpath(*re.findall(r'"([^"]+)"', m)) for m in PY_CHAIN.findall(text)}
    if path.suffix == ".sh":
        text = text.replace('$(dirname "$0")', "$HERE")
        bases = {"HERE": path.parent}
        for var, base1, rest1, base2, rest2 in SHELL_BASE.findall(text):
            base, rest = (base1, rest1) if base1 else (base2, rest2)
            if base in bases and var != "HERE":
                bases[var] = Path(os.path.normpath(str(bases[base]) + rest))
        found |= {Path(os.path.normpath(str(bases[var]) + rest)) for var, rest in SHELL_REF.findall(text)
                  if var in bases}
    return {p for p in found if Path(os.path.normpath(p)).is_relative_to(SCRIPTS)}


def test_every_path_under_scripts_that_a_file_names_exists():
    """A moved or renamed script must not leave a caller behind: the Makefile, the Dockerfiles, the docs, the
    tests and the scripts themselves (their "$HERE/../" paths too) name only paths that exist."""
    missing = {}
    for path in tracked_files():
        if path == Path(__file__):  # its own stale examples below
            continue
        if path.suffix not in {".sh", ".py", ".md", ".txt", ".toml", ".yaml", ".fields", ""} \
                and not path.name.startswith("Dockerfile"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        bad = sorted(str(p.relative_to(REPO)) for p in named_paths(path, text) if not exists(p))
        if bad:
            missing[str(path.relative_to(REPO))] = bad
    assert not missing, missing


def test_the_path_check_sees_a_stale_path(tmp_path):
    script = SCRIPTS / "gpu" / "example.sh"
    stale = 'HERE=$(cd "$(dirname "$0")" && pwd)\nREPO=$(cd "$HERE/../.." && pwd)\nbash "$HERE/../caffe/gone.sh"\n' \
            'bash "$REPO/scripts/gpu/gpu_check.sh"\n# see scripts/old_place.sh\n'
    named = {str(p.relative_to(REPO)) for p in named_paths(script, stale) if not exists(p)}
    assert named == {"scripts/caffe/gone.sh", "scripts/old_place.sh"}
    assert not [p for p in named_paths(REPO / "x.py", 'REPO / "scripts" / "gpu" / "gpu_wheels.py"') if not exists(p)]
    assert [p for p in named_paths(REPO / "x.py", 'REPO / "scripts" / "gpu_wheels.py"') if not exists(p)]
