"""The build scripts: the one Debian package list, the source patches both Caffe builds apply, the
check that a cached build cannot hide a package the list lacks, and the GPU image's runtime packages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from caffe_testing import REPO
from caffe_testing.caffe_sources import PYCAFFE_SNIPPET, caffe_tree

SCRIPTS = REPO / "scripts"

def run(script: str, *args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable] if script.endswith(".py") else ["bash"]
    return subprocess.run(cmd + [str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True, **kw)


def listed_packages() -> list[str]:
    return run("setup_system.sh", "--print", check=True).stdout.split()


def dockerfile(name: str) -> str:
    return (REPO / name).read_text()


def test_the_one_package_list_holds_what_the_build_and_tests_need():
    packages = listed_packages()
    assert "libgtest-dev" in packages, "the sdist's net.cpp includes a gtest header"
    for needed in ("cmake", "libboost-python-dev", "libprotobuf-dev", "protobuf-compiler", "libgoogle-glog-dev",
                   "libopenblas-dev", "libhdf5-dev", "wrk"):
        assert needed in packages
    # no other script names a package of its own: the list is read, never repeated
    for script in ("install_pycaffe.sh", "build_caffe.sh", "setup_system.sh", "check_build_debs.sh"):
        assert not re.search(r"libboost-\w+-dev|apt-get install\S* .*lib", (SCRIPTS / script).read_text())
    assert 'bash "$HERE/setup_system.sh"' in (SCRIPTS / "build_caffe.sh").read_text()


def test_the_installed_build_compiled_only_against_listed_packages():
    """What this machine's pycaffe build recorded (its headers' packages) passes the check."""
    import caffe

    build_id = (Path(caffe.__file__).parent / "BUILD_ID").read_text().strip()
    cache = Path(os.environ.get("CAFFE_SERVING_CACHE") or Path.home() / ".cache" / "caffe-serving")
    recorded = cache / build_id / "build-debs.txt"
    used = recorded.read_text().split()
    assert any(p.startswith("libgtest") or p == "googletest" for p in used), used
    assert any(p.startswith("libboost") for p in used), used
    assert run("check_build_debs.sh", recorded).returncode == 0


def test_a_package_the_list_lacks_fails_the_check_even_when_installed_by_hand(tmp_path):
    used = tmp_path / "build-debs.txt"
    used.write_text("libprotobuf-dev\nlibgtest-dev\n")
    assert run("check_build_debs.sh", used).returncode == 0
    used.write_text("libprotobuf-dev\nlibsomething-by-hand-dev\n")
    result = run("check_build_debs.sh", used)
    assert result.returncode == 1
    assert "libsomething-by-hand-dev" in result.stderr and "debian-packages.txt" in result.stderr


def test_source_patches_release_the_gil_and_lift_the_weights_limit(tmp_path):
    src = caffe_tree(tmp_path / "caffe")
    first = run("patch_caffe_sources.py", src)
    assert first.returncode == 0, first.stderr
    cpp = (src / "python" / "caffe" / "_caffe.cpp").read_text()
    assert '.def("_forward", &Net_ForwardFromTo_NoGIL)' in cpp and "PyEval_SaveThread()" in cpp
    io_cpp = (src / "src" / "caffe" / "util" / "io.cpp").read_text()
    assert io_cpp.count("SetTotalBytesLimit(INT_MAX)") == 2 and "536870912" not in io_cpp
    assert "#include <climits>" in io_cpp
    again = run("patch_caffe_sources.py", src)
    assert again.returncode == 0
    assert "_caffe.cpp: already patched" in again.stdout and "io.cpp: already patched" in again.stdout
    assert (src / "src" / "caffe" / "util" / "io.cpp").read_text() == io_cpp
    # the GIL patch is the same one the GPU image applies on its own
    alone = tmp_path / "alone.cpp"
    alone.write_text(PYCAFFE_SNIPPET)
    assert run("patch_pycaffe_gil.py", alone).returncode == 0
    assert alone.read_text() == cpp
    assert '"$HERE/patch_caffe_sources.py" "$src"' in (SCRIPTS / "build_caffe.sh").read_text()


def test_source_patches_refuse_sources_they_do_not_know(tmp_path):
    src = caffe_tree(tmp_path / "caffe")
    (src / "python" / "caffe" / "_caffe.cpp").write_text(PYCAFFE_SNIPPET.replace("ForwardFromTo", "Forward"))
    result = run("patch_caffe_sources.py", src)
    assert result.returncode == 1 and "update the patch" in result.stderr
    path = tmp_path / "_caffe.cpp"
    path.write_text(PYCAFFE_SNIPPET.replace("ForwardFromTo", "Forward"))
    assert run("patch_pycaffe_gil.py", path).returncode == 1
    assert path.read_text() == PYCAFFE_SNIPPET.replace("ForwardFromTo", "Forward")


def test_installed_pycaffe_carries_the_patches():
    """The pycaffe this suite runs is the patched build: caffe.io imports its resize, reads as_gray."""
    import caffe.io

    source = Path(caffe.io.__file__).read_text()
    assert "from skimage.transform import resize" in source and "as_grey" not in source


def test_protobuf_fix_makes_caffe_call_what_current_protobuf_has():
    """Caffe's io.cpp calls SetTotalBytesLimit(limit, warning_threshold) (BVLC) or with a 512 MiB literal
    (the sdist); protobuf 3.21 (Debian 12, Ubuntu 24.04) has only SetTotalBytesLimit(limit), and weights
    up to 2 GiB must load. patch_caffe_sources.py, which both builds apply, turns either into that."""
    header = Path("/usr/include/google/protobuf/io/coded_stream.h")
    if header.exists():
        declared = re.findall(r"void SetTotalBytesLimit\(([^)]*)\)", header.read_text())
        assert declared == ["int total_bytes_limit"]
    sys.path.insert(0, str(SCRIPTS))
    try:
        import patch_caffe_sources
    finally:
        sys.path.pop(0)
    for call in ("SetTotalBytesLimit(kProtoReadBytesLimit, 536870912)", "SetTotalBytesLimit(536870912)"):
        patched = patch_caffe_sources.patch_proto_limit(f"  coded_input->{call};\n")
        assert "coded_input->SetTotalBytesLimit(INT_MAX);" in patched and "#include <climits>" in patched


def test_runtime_package_list_covers_what_pycaffe_links():
    """scripts/list_runtime_debs.sh on our own pycaffe build: the Debian packages of its libraries."""
    import caffe

    if shutil.which("dpkg") is None:
        pytest.skip("not a Debian/Ubuntu system")
    so = Path(caffe.__file__).parent / "_caffe.so"
    result = subprocess.run(["bash", str(REPO / "scripts" / "list_runtime_debs.sh"), str(so)],
                            capture_output=True, text=True, check=True)
    packages = result.stdout.split()
    for prefix in ("libboost-python", "libboost-filesystem", "libgoogle-glog", "libprotobuf", "libgflags",
                   "libopenblas"):
        assert any(p.startswith(prefix) for p in packages), (prefix, packages)
    assert not any(p.endswith("-dev") for p in packages)
