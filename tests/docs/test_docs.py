"""The docs say only what is true: every name they give exists, and every command they show runs and prints
what they show (the convention: README.md, "The docs are tested"; the reading: caffe_testing/docs.py).

The servers the docs start (`caffeserve serve`, `up`, `gateway` in a `console` block) run in the background,
one process per command line for the whole module, so that later blocks talk to them as a reader would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caffe_testing import REPO
from caffe_testing.docs import NEEDS, Block, blocks, matches, problems, session, split_command
from caffe_testing.servers import free_port, http, stop_process

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*/README.md"))]
VENV_BIN = Path(sys.executable).parent
PORTS = (8080, 8081, 8000, 8001)  # the defaults the docs use: mapped to free ports here
RUN_LANGS = ("console", "python")
NAME_LANGS = ("yaml", "json", "text")  # not commands: only their names are checked
BACKGROUND = {"serve": (8080, 8081), "up": (8000, 8001), "gateway": (8080, 8081)}  # subcommand -> default ports
COMMAND_LINE = re.compile(r"^\s*(?:\S+=\S+\s+)*(?:\.venv/bin/|\./)?(make|bash|python3?|caffeserve|curl|kubectl|helm|"
                          r"docker|pip|\.venv/bin/python)\b")


def _rel(doc: Path) -> str:
    return str(doc.relative_to(REPO))


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


# --- names
@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_name_a_doc_gives_exists(doc):
    found = problems(doc, doc.read_text(), REPO)
    assert not found, f"{_rel(doc)}:\n  " + "\n  ".join(found)


def test_the_name_check_finds_what_does_not_exist(tmp_path):
    """The check itself: a stale path, link, env var, flag, subcommand, script flag and make target are each found."""
    doc = tmp_path / "stale.md"
    doc.write_text(
        "Tests: tests/test_caffe_forks.py and `tests/server/test_caffe_forks.py`; see [gpu](docs/nope.md).\n"
        "Set `CAFFESERVE_NO_SUCH_SETTING=1` or `CAFFESERVE__DEVICE__COLOUR=red`; the real `CAFFESERVE__DEVICE__KIND=gpu`.\n"
        "Run `caffeserve serve --config x.yaml --no-such-flag` or `caffeserve launch`, then `make nothing-here`.\n"
        "```sh\n# needs: time\n.venv/bin/python bench/protocols.py --no-such-option 3\n```\n"
        "A flag alone: `--drain-delay` exists, `--drain-forever` does not.\n")
    found = "\n".join(problems(doc, doc.read_text(), REPO))
    for stale in ("tests/test_caffe_forks.py", "docs/nope.md", "CAFFESERVE_NO_SUCH_SETTING", "CAFFESERVE__DEVICE__COLOUR",
                  "--no-such-flag", "caffeserve launch", "make nothing-here", "--no-such-option", "--drain-forever"):
        assert stale in found, f"{stale!r} was not reported:\n{found}"
    for real in ("tests/server/test_caffe_forks.py", "CAFFESERVE__DEVICE__KIND", "--drain-delay", "--config"):
        assert real not in found, f"{real!r} was reported:\n{found}"


# --- which blocks run
@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_block_is_run_or_says_what_it_needs(doc):
    """A block is run (console, python), a config or illustration (yaml, json, text), or marked `# needs: X`."""
    bad = []
    for b in blocks(doc):
        if b.needs is not None and b.needs not in NEEDS:
            bad.append(f"{b.where}: `# needs: {b.needs}`: not one of {', '.join(NEEDS)}")
        elif b.needs is None and b.lang not in RUN_LANGS + NAME_LANGS:
            bad.append(f"{b.where}: a ```{b.lang or '(no language)'} block: make it console/python (run by this test), "
                       f"yaml/json/text, or mark its first line `# needs: cluster|gpu|network|time`")
    # a command in an indented (4-space) code block would escape both rules
    lines = doc.read_text().split("\n")
    for i, line in enumerate(lines):
        if line.startswith("    ") and (i == 0 or not lines[i - 1].strip()) and COMMAND_LINE.match(line[4:]):
            bad.append(f"{doc.name}:{i + 1}: a command in an indented block: fence it (console, or `# needs:`)")
    assert not bad, "\n".join(bad)


# --- running them
class Sessions:
    """The background servers the docs start, by the (mapped) REST port they listen on."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ports = {p: free_port() for p in PORTS}
        self.running: dict[int, tuple[str, subprocess.Popen, int | None]] = {}  # REST port -> (command, process, gRPC port)

    def map(self, text: str) -> str:
        text = re.sub(r"(?<![\d.])(8080|8081|8000|8001)(?!\d)", lambda m: str(self.ports[int(m.group(1))]), text)
        return re.sub(r"(?<![\w/])\.venv/bin/", f"{VENV_BIN}/", text)

    def env(self) -> dict:
        return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    @staticmethod
    def background(cmd: str) -> str | None:
        words = split_command(cmd)
        if len(words) >= 2 and Path(words[0]).name == "caffeserve" and words[1] in BACKGROUND:
            return words[1]
        return None

    def start(self, cmd: str, where: str) -> None:
        """Start a `caffeserve serve|up|gateway` (already mapped) unless this very command runs; wait until ready."""
        sub = self.background(cmd)
        words = split_command(cmd)
        rest_default, grpc_default = BACKGROUND[sub]
        if "--port" not in words:
            words += ["--port", str(self.ports[rest_default])]
        if "--grpc-port" not in words and "--no-grpc" not in words:
            words += ["--grpc-port", str(self.ports[grpc_default])]
        port = int(words[words.index("--port") + 1])
        grpc_port = int(words[words.index("--grpc-port") + 1]) if "--grpc-port" in words else None
        if port in self.running:
            if self.running[port][0] == cmd and self.running[port][1].poll() is None:
                return
            self.stop(port)
        log = self.tmp / f"{sub}-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(words, cwd=REPO, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.running[port] = (cmd, proc, grpc_port)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{where}: `{cmd}` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if http("GET", f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"{where}: `{cmd}` not ready within 180 s:\n{log.read_text()[-3000:]}")

    def served_ports(self) -> set[int]:
        return set(self.running) | {g for _, _, g in self.running.values() if g}

    def stop(self, port: int) -> int | None:
        _, proc, _ = self.running.pop(port)
        return stop_process(proc, 60, signal.SIGTERM)

    def close(self) -> dict[str, int | None]:
        return {self.running[p][0]: self.stop(p) for p in list(self.running)}


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    s = Sessions(tmp_path_factory.mktemp("docs"))
    yield s
    codes = s.close()
    assert all(rc == 0 for rc in codes.values()), f"a server the docs start did not stop cleanly: {codes}"


RUNNABLE = [b for b in all_blocks() if b.lang in RUN_LANGS and b.needs is None]


def _needs_server(s: Sessions, text: str, where: str) -> None:
    """A block that talks to a port the docs' servers use, before any block started one there, says so."""
    for doc_port, port in s.ports.items():
        if re.search(rf"(?<![\d.]){doc_port}(?!\d)", text) and port not in s.served_ports():
            pytest.fail(f"{where}: talks to port {doc_port}, but no earlier block of the docs starts a server there")


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"{_rel(b.doc)}:{b.line}")
def test_the_docs_commands_run_and_print_what_they_show(block, sessions):
    where = f"{_rel(block.doc)}:{block.line}"
    if block.lang == "python":
        code = "\n".join(block.lines)
        _needs_server(sessions, code, where)
        script = sessions.tmp / f"block-{block.doc.stem}-{block.line}.py"
        script.write_text(sessions.map(code))
        r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=sessions.env(), capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, f"{where}: the python block failed:\n{r.stdout}\n{r.stderr}"
        return
    steps = session(block)
    assert steps, f"{where}: a console block with no `$ command`"
    for cmd, expected in steps:
        mapped = sessions.map(cmd)
        if Sessions.background(mapped):
            assert not expected, f"{where}: `{cmd}` runs in the background: show its output with a later command"
            sessions.start(mapped, where)
            continue
        _needs_server(sessions, cmd, where)
        r = subprocess.run(["bash", "-c", mapped], cwd=REPO, env=sessions.env(), capture_output=True, text=True,
                           timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"{where}: `{cmd}` exited with {r.returncode}:\n{out[-3000:]}"
        missing = matches([sessions.map(e).replace("~/", f"{Path.home()}/") for e in expected], out)
        assert missing is None, f"{where}: `{cmd}` did not print the line the doc shows:\n  {missing}\nit printed:\n{out[-3000:]}"
