"""`caffeserve`: one console entry point, one subcommand per program.

The top of the package graph: each subcommand is a `main(argv) -> int` in the package of its
program (the inference server, the operator, the gateway, local mode); this file only dispatches,
importing lazily so that (for example) the operator image never imports pycaffe. Nothing below
names this package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from inference_server import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("inference_server.commands.serve", "run the inference server for one model config"),
    "check": ("inference_server.commands.check", "load a model, print its inputs/outputs and backend parity"),
    "operator": ("caffe_operator.run", "run the Kubernetes operator (kopf)"),
    "gateway": ("caffe_gateway.main", "run the gateway that forwards requests to model pods"),
    "up": ("caffe_local.main", "run a CaffeModelService manifest on this machine (local mode)"),
    "demo": ("caffe_local.demo", "local mode on the digits example plus one real request"),
    "export": ("inference_server.commands.export", "export a model as ONNX with its parity report (and for Triton)"),
    "fetch": ("inference_server.commands.fetch", "download a model file and check its sha256"),
    "crd": ("caffe_operator.crd", "print the CaffeModelService CRD YAML generated from the model"),
}


def usage() -> str:
    lines = ["usage: caffeserve [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`caffeserve COMMAND --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"caffeserve {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"caffeserve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    package = COMMANDS[name][0].split(".")[0]
    if importlib.util.find_spec(package) is None:  # an image installs only the programs it runs
        print(f"caffeserve: {name!r} is not installed here (package {package})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)

