"""The docs' commands and names, read out of Markdown for tests/docs (the convention is in README.md,
"The docs are tested").

- `blocks(path)`: the fenced code blocks, with their language and `# needs: ...` marker.
- `session(block)`: a `console` block as (command, expected output lines) pairs.
- `matches(expected, actual)`: whether the lines a doc shows appear in a command's output, in order.
- `problems(path, text, repo)`: every file path, env var, flag, `caffeserve` subcommand and make target the
  doc names that does not exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

NEEDS = ("cluster", "gpu", "network", "time")  # what a block that the test does not run needs
NEEDS_RE = re.compile(r"^#\s*needs:\s*(\w+)")
ELLIPSIS = "…"
# files and folders the docs may name that a build or a benchmark makes, not checked in
GENERATED = (".venv", ".venv-checkov", ".venv-opencv", ".caffe-cuda", ".gpu-bundle", "bench/results")
# other programs' environment variables the docs mention (ours must be used by our code)
EXTERNAL_ENV = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    lines: list[str]
    needs: str | None  # one of NEEDS when the first line is `# needs: X`

    @property
    def where(self) -> str:
        return f"{self.doc.name}:{self.line}"


def blocks(path: Path, text: str | None = None) -> list[Block]:
    lines = (path.read_text() if text is None else text).split("\n")
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, j = lines[i][3:].strip(), i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            body = lines[i + 1:j]
            m = NEEDS_RE.match(body[0].strip()) if body else None
            out.append(Block(path, i + 1, lang, body, m.group(1) if m else None))
            i = j
        i += 1
    return out


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


def session(block: Block) -> list[tuple[str, list[str]]]:
    """`$ command` lines (a trailing backslash continues one) and the output lines after each."""
    steps: list[tuple[str, list[str]]] = []
    lines = iter(block.lines)
    for line in lines:
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\"):
                cmd = cmd[:-1] + " " + next(lines).strip()
            steps.append((cmd, []))
        elif steps and line.strip():
            steps[-1][1].append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{block.where}: output before any `$ command`: {line!r}")
    return steps


def _norm(s: str) -> str:
    return " ".join(s.split())


def line_matches(expected: str, actual: str) -> bool:
    """The doc's line is in the actual line; `…` in it stands for any text; whitespace runs compare equal."""
    actual, pos = _norm(actual), 0
    for part in (_norm(p) for p in expected.split(ELLIPSIS)):
        if part:
            found = actual.find(part, pos)
            if found < 0:
                return False
            pos = found + len(part)
    return True


def matches(expected: list[str], actual: str) -> str | None:
    """None when every expected line is found in `actual`, in order; else the first line that is not."""
    lines = actual.splitlines()
    pos = 0
    for e in expected:
        while pos < len(lines) and not line_matches(e, lines[pos]):
            pos += 1
        if pos == len(lines):
            return e
        pos += 1
    return None


# --- what exists
@cache
def parser_of(command: str) -> argparse.ArgumentParser | None:
    """The ArgumentParser `caffeserve COMMAND` builds (caught as it prints its --help)."""
    import caffeserve

    caught: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help
    argparse.ArgumentParser.print_help = lambda self, file=None: caught.append(self)  # type: ignore[method-assign]
    try:
        module = importlib.import_module(caffeserve.COMMANDS[command][0])
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            module.main(["--help"])
    finally:
        argparse.ArgumentParser.print_help = original  # type: ignore[method-assign]
    return caught[-1] if caught else None


def flags_of(command: str) -> set[str]:
    p = parser_of(command)
    return {s for a in p._actions for s in a.option_strings} if p else set()


@cache
def code_text(repo: Path) -> str:
    """Every checked-in file that is not documentation, as one string (what an env var or flag must be in)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    out = []
    for f in files:
        if f.endswith(".md") or f.startswith("docs/") or f.startswith("tests/docs/"):
            continue
        try:
            out.append((repo / f).read_text(errors="ignore"))
        except (OSError, UnicodeDecodeError):
            pass
    return "\n".join(out)


def config_field_exists(path: list[str]) -> bool:
    """CAFFESERVE__DEVICE__KIND -> device.kind, a field of the server config."""
    from inference_server.config import ServerConfig

    model: Any = ServerConfig  # then the model of each field on the path
    for part in path:
        fields = {name.lower(): f for name, f in model.model_fields.items()}
        fields.update({(f.alias or "").lower(): f for f in model.model_fields.values() if f.alias})
        f = fields.get(part.lower()) or fields.get(part.lower().replace("_", ""))
        if f is None:
            f = next((v for k, v in fields.items() if k.replace("_", "") == part.lower().replace("_", "")), None)
        if f is None:
            return False
        ann = f.annotation
        model = ann if isinstance(ann, type) and hasattr(ann, "model_fields") else None
        if model is None:
            return part is path[-1]
    return True


# --- what the doc names
PATH_RE = re.compile(r"(?<![\w/.~$-])((?:\.{0,2}/)?[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.*{}<>$…-]+)+/?|Dockerfile\.[\w-]+)")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
ENV_RE = re.compile(r"(?<![\w-])\$?\{?([A-Z][A-Z0-9]*(?:__?[A-Z0-9]+)+)\b")
PLACEHOLDER = re.compile(r"[$*{}<>…]|\.\.\.|/[A-Z][A-Z0-9_]*(?:/|$)")
COMMAND_RE = re.compile(r"(?:^|[\s;&|(])(?:\S*/)?caffeserve\s+([a-z][\w|-]*)((?:[^\n;&|`)]*))")
SCRIPT_RE = re.compile(r"(?:python3?|bash|sh)\s+((?:[\w.-]+/)+[\w.-]+\.(?:py|sh))((?:[^\n;&|`)]*))")
MODULE_RE = re.compile(r"python3?\s+-m\s+([\w.]+)")
MAKE_RE = re.compile(r"(?:^|[\s;&(`])make\s+([a-z][\w-]*)")
FLAG_RE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")  # KServe's runtimes spell flags with "_"


def _code_pieces(text: str) -> list[tuple[str, bool]]:
    """Inline code spans and the lines of fenced blocks, each with whether it may hold commands (not in a
    `text` block: a diagram or an illustration)."""
    pieces = [(span, True) for span in inline_code(text)]
    for b in blocks(Path("doc.md"), text):
        pieces.extend((line, b.lang != "text") for line in b.lines)
    return pieces


def _command_flags(rest: str) -> list[str]:
    rest = rest.split("#", 1)[0]
    return [f.split("=", 1)[0] for f in FLAG_RE.findall(rest)]


def problems(doc: Path, text: str, repo: Path) -> list[str]:
    """What `doc` names that does not exist: file paths, links, env vars, flags, subcommands, make targets."""
    import caffeserve

    found: list[str] = []
    tops = {p.name for p in repo.iterdir() if p.name != ".git"}
    code = code_text(repo)
    all_flags = set().union(*(flags_of(c) for c in caffeserve.COMMANDS))
    makefile = (repo / "Makefile").read_text()
    pieces = _code_pieces(text)

    def check_path(token: str, base: Path) -> None:
        token = token.split("::")[0].split("#")[0].rstrip(".,:;)")
        if not token or PLACEHOLDER.search(token) or token.startswith(("http", "~", "/")):
            return
        bare = token[2:] if token.startswith("./") else token
        first = bare.split("/")[0]
        if bare.startswith(GENERATED):
            return
        if token.startswith("./") or token.startswith("../") or first in tops:
            if not ((base / token).exists() or (repo / token).exists()):
                found.append(f"names a path that does not exist: {token}")

    for token in PATH_RE.findall(prose(text)):  # paths in prose too (inline code included)
        check_path(token, doc.parent)
    for piece, commands in pieces:
        for token in PATH_RE.findall(piece):
            check_path(token, doc.parent)
        for name in ENV_RE.findall(piece):
            if "__" in name and name.startswith("CAFFESERVE__"):
                if not config_field_exists(name.split("__")[1:]):
                    found.append(f"names a config override that is no config field: {name}")
            elif name not in code and name not in EXTERNAL_ENV:
                found.append(f"names an environment variable (or constant) no code uses: {name}")
        if not commands:
            continue
        for sub, rest in COMMAND_RE.findall(piece):
            for s in sub.split("|"):
                if s not in caffeserve.COMMANDS:
                    found.append(f"names a caffeserve subcommand that does not exist: caffeserve {s}")
                elif "|" not in sub:
                    for flag in _command_flags(rest):
                        if flag not in flags_of(s):
                            found.append(f"names a flag `caffeserve {s}` does not take: {flag}")
        for script, rest in SCRIPT_RE.findall(piece):
            path = repo / script
            if not path.exists():
                found.append(f"runs a script that does not exist: {script}")
                continue
            body = path.read_text()
            for flag in _command_flags(rest):
                if flag not in body:
                    found.append(f"names a flag {script} does not take: {flag}")
        for module in MODULE_RE.findall(piece):
            if module.split(".")[0] in ("pip", "venv", "pytest", "http"):
                continue
            rel = Path(*module.split("."))
            if not ((repo / rel).with_suffix(".py").exists() or (repo / rel / "__main__.py").exists()):
                found.append(f"runs a module that does not exist: python -m {module}")
        for target in MAKE_RE.findall(piece):
            if not re.search(rf"^{re.escape(target)}\s*:", makefile, re.M):
                found.append(f"names a make target that does not exist: make {target}")
    for span in inline_code(text):  # a flag named on its own: one of ours, or in some checked-in file
        if span.startswith("--") and (m := FLAG_RE.match(span)) is not None:
            flag = m.group(1)
            if flag not in all_flags and flag not in code:
                found.append(f"names a flag no command takes: {flag}")
    for target in LINK_RE.findall(prose(text)):
        target = target.split("#")[0]
        if target and not target.startswith(("http:", "https:", "mailto:")):
            if not (doc.parent / target).exists():
                found.append(f"links to a file that does not exist: {target}")
    return sorted(set(found))


def split_command(cmd: str) -> list[str]:
    try:
        return shlex.split(cmd, comments=True)
    except ValueError:
        return cmd.split()
