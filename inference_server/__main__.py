"""`python -m inference_server serve|check|fetch ARGS...`: the server's own commands, the same as
`caffeserve serve|check|fetch`, for whoever runs servers without the top-level CLI (local mode
starts its replicas this way, so that nothing below `caffeserve` names it)."""

import importlib
import sys

COMMANDS = ("serve", "check", "fetch")


def main(argv: list[str]) -> int:
    usage = f"usage: python -m inference_server {{{','.join(COMMANDS)}}} ARGS...  (COMMAND --help: its options)"
    if argv and argv[0] in ("-h", "--help"):  # asked for: stdout, exit 0
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:  # a usage error: stderr, exit 2 (README, "Exit codes")
        print(usage, file=sys.stderr)
        return 2
    return int(importlib.import_module(f"inference_server.commands.{argv[0]}").main(argv[1:]) or 0)


sys.exit(main(sys.argv[1:]))
