"""Drive `wrk` against one URL with a fixed POST body and parse its figures.

wrk costs the machine far less than a Python client, which on 2 cores would eat the CPU the server
under test needs. A Lua script sets the method, headers and body.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, body: bytes, headers: dict[str, str], connections: int, seconds: float,
            threads: int | None = None, timeout_s: float | None = None) -> dict:
    """Returns requests/s, p50/p90/p99 latency (ms), and counts of non-2xx responses and socket errors."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (make setup does this)")
    with tempfile.TemporaryDirectory() as d:
        body_file = Path(d) / "body.bin"
        body_file.write_bytes(body)
        hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
        script = Path(d) / "post.lua"
        script.write_text(
            f'wrk.method = "POST"\n{hdrs}'
            f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
        )
        threads = threads or min(connections, 2)
        timeout = [f"--timeout={timeout_s:g}s"] if timeout_s else []  # wrk's own default is 2 s
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", *timeout,
             "-s", str(script), url],
            capture_output=True, text=True, check=True,
        ).stdout
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(pct["50"]),
        "p90_ms": _ms(pct["90"]),
        "p99_ms": _ms(pct["99"]),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }
