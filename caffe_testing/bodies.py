"""Large JSON infer bodies built fast (numpy, not json.dumps), for the memory tests and bench."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MiB = 1024 * 1024
ISSUE_NUMBERS = 16071 * 784  # issue 15's corpus: 12.6 M numbers, a 60 MiB body


def numbers_text(n: int, seed: int = 0) -> bytes:
    """n numbers "0.dd" joined by commas (5 bytes each)."""
    digits = np.random.default_rng(seed).integers(0, 100, n)
    rec = np.empty((n, 5), np.uint8)
    rec[:, 0], rec[:, 1], rec[:, 4] = ord("0"), ord("."), ord(",")
    rec[:, 2] = ord("0") + digits // 10
    rec[:, 3] = ord("0") + digits % 10
    return rec.tobytes()[:-1]


def json_body(shape: list[int], numbers: int, trailing_string: bool = False, name: str = "data") -> bytes:
    """An FP32 infer request of `numbers` numbers (and a string after them if asked)."""
    data = numbers_text(numbers) + (b',"x"' if trailing_string else b"")
    head = b'{"inputs":[{"name":"%s","shape":%s,"datatype":"FP32","data":[' % (
        name.encode(), str(shape).replace(" ", "").encode())
    return head + data + b"]}]}"


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM: the peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]
