"""What a newcomer meets in the first hour on the command line: every command's flags and help texts,
ports that are taken or collide, and one exit-code convention (README, "Exit codes"): 0 a clean run,
1 something failed at run time, 2 a usage or configuration error (bad flag, config, manifest, a port
that cannot be bound)."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys

import pytest

import caffeserve
from caffe_testing import REPO
from caffe_testing.docs import parser_of
from caffe_testing.servers import CAFFESERVE, free_port
from inference_server.config import Grpc

DIGITS = REPO / "examples" / "digits"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CAFFESERVE, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", sorted(caffeserve.COMMANDS))
def test_every_command_takes_log_level_and_log_format(command):
    p = parser_of(command)
    flags = {s for a in p._actions for s in a.option_strings}
    assert {"--log-level", "--log-format"} <= flags, command
    help_text = p.format_help()
    assert "--log-level" in help_text and "--log-format" in help_text
    level = next(a for a in p._actions if "--log-level" in a.option_strings)
    fmt = next(a for a in p._actions if "--log-format" in a.option_strings)
    assert {"DEBUG", "INFO", "WARNING", "ERROR"} <= set(level.choices) and {"text", "json"} <= set(fmt.choices)


@pytest.mark.parametrize("command", sorted(caffeserve.COMMANDS))
def test_help_texts_say_what_the_default_means(command):
    """`--no-access-log ... (default: True)` reads as 'off by default': a default is said in words."""
    p = parser_of(command)
    text = p.format_help()
    for raw in ("(default: True)", "(default: False)", "(default: None)", "default True", "default False"):
        assert raw not in text, f"`caffeserve {command} --help` prints {raw!r}"
    for a in p._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction):
            continue
        silent = a.default is None or (isinstance(a, argparse._StoreTrueAction) and a.default is False)
        if not silent:
            assert a.help and "default" in a.help.lower(), \
                f"`caffeserve {command}` {'/'.join(a.option_strings)} has default {a.default!r} its help does not state"


def test_default_ports_of_serve_and_up_do_not_collide():
    """`caffeserve serve` (KServe's 8080/8081) and `caffeserve up` (Triton's 8000/8001) run side by side."""
    serve = parser_of("serve").parse_args(["--config", "x.yaml"])
    up = parser_of("up").parse_args(["m.yaml"])
    serve_ports = {serve.port, Grpc().port if serve.grpc_port is None else serve.grpc_port}
    assert serve_ports == {8080, 8081}
    assert {up.port, up.grpc_port} == {8000, 8001}
    demo = parser_of("demo").parse_args(["m.yaml"])
    assert (demo.port, demo.grpc_port) == (0, 0)  # any free ports
    readme = (REPO / "README.md").read_text()
    assert "8000" in readme and "8001" in readme and "8080" in readme


def _held_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("which", ["rest", "grpc"])
def test_a_taken_port_is_one_clear_line_and_exit_2(which):
    with _held_port() as held:
        port = held.getsockname()[1]
        ports = ["--port", str(port), "--grpc-port", "0"] if which == "rest" else \
            ["--port", str(free_port()), "--grpc-port", str(port)]
        r = run("serve", "--config", str(DIGITS / "server.yaml"), *ports, "--log-format", "json")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and "Event loop is closed" not in out, out
    errors = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    errors = [e for e in errors if e["level"] == "ERROR"]
    assert len(errors) == 1, out
    assert f"127.0.0.1:{port}" in errors[0]["message"] and "in use" in errors[0]["message"], errors


def test_the_gateway_on_a_taken_port_exits_2():
    with _held_port() as held:
        port = held.getsockname()[1]
        r = run("gateway", "--static", "m=http://127.0.0.1:1", "--port", str(port), "--no-grpc")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot listen" in r.stderr and str(port) in r.stderr


@pytest.mark.parametrize("args, message", [
    (["serve", "--config", "examples/digits/nope.yaml"], "nope.yaml"),
    (["check", "--config", "examples/digits/nope.yaml"], "nope.yaml"),
    (["up", "examples/digits/nope.yaml", "--log-level", "DEBUG", "--log-format", "json"], "nope.yaml"),
    (["up", "examples/digits/server.yaml"], "has no CaffeModelService"),
    (["demo", "examples/digits/server.yaml"], "has no CaffeModelService"),
    (["gateway"], "--static"),
    (["serve", "--config", "examples/digits/server.yaml", "--no-such-flag"], "unrecognized arguments"),
    (["nope"], "unknown command"),
])
def test_configuration_and_usage_errors_exit_2_with_a_message(args, message):
    r = run(*args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["up", "--help"], ["crd", "--help"]])
def test_help_exits_0(args):
    r = run(*args)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr


def test_python_m_inference_server_help_exits_0():
    r = subprocess.run([sys.executable, "-m", "inference_server", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "serve" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "inference_server"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
