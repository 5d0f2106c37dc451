"""`caffeserve fetch --url U --dest PATH [--sha256 HEX]`: download one model file, safely.

Used by the init containers of `source.url` and `source.s3` models and by local mode. What it guarantees:
- http(s) URLs, and `s3://BUCKET/KEY` (S3 or an S3-compatible store at `--s3-endpoint`; s3.py); a size cap (Content-Length checked first, then the bytes actually read);
  a read timeout and an overall deadline, so a stalled server cannot hang a pod forever;
- the sha256 is computed while streaming and checked before the file appears at PATH: the file
  is written beside PATH under a temporary name, fsynced, then renamed (atomic on one filesystem),
  so a reader never sees a partial or unverified file;
- a PATH that already has the expected sha256 is kept (an init container that restarts does not
  download again); transient failures (connection errors, 5xx, 429) are retried with backoff,
  permanent ones (4xx, a wrong sha256, too big) are not.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from caffe_http.access_log import add_logging_arguments, configure_logging

from ..hashing import file_sha256
from .s3 import S3Options, open_object, read_credentials

GiB = 1024**3
DEFAULT_MAX_BYTES = 8 * GiB
CHUNK = 1024 * 1024
USER_AGENT = "caffeserve-fetch/0.1"


class FetchError(Exception):
    """A download that failed; `transient` says whether trying again may help."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    sha256: str
    downloaded: bool  # False: the file was already there with the expected sha256


def _open_http(url: str, read_timeout_s: float):
    """(Content-Length or None, read(n), close) of a GET of `url`."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=read_timeout_s)
    except urllib.error.HTTPError as e:
        transient = e.code >= 500 or e.code in (408, 429)
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}", transient=transient) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"{url}: {reason}", transient=True) from None
    length = response.headers.get("Content-Length")
    return (int(length) if length is not None and length.isdigit() else None), response.read, response.close


def _download_once(url: str, dest: Path, max_bytes: int, read_timeout_s: float, deadline: float,
                   s3: S3Options | None = None) -> tuple[int, str]:
    """Stream `url` into a temporary file beside `dest`; return (size, sha256) and leave it at dest+'.part'."""
    if url.startswith("s3://"):
        length, read, close = open_object(url, s3 or S3Options(), read_timeout_s, FetchError)
    else:
        length, read, close = _open_http(url, read_timeout_s)
    try:
        return _stream(url, dest, max_bytes, deadline, length, read)
    finally:
        close()


def _stream(url: str, dest: Path, max_bytes: int, deadline: float, length: int | None, read) -> tuple[int, str]:
    """Hash and write what `read` gives into a temporary file beside `dest`, renamed to dest+'.part'."""
    if length is not None and length > max_bytes:
        raise FetchError(f"{url}: {length} bytes is over the limit of {max_bytes} bytes (--max-bytes)")
    h = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                if time.monotonic() > deadline:
                    raise FetchError(f"{url}: not finished within the deadline (--timeout)", transient=False)
                try:
                    chunk = read(CHUNK)
                except (OSError, TimeoutError, http.client.HTTPException) as e:
                    raise FetchError(f"{url}: read failed after {size} bytes: {e}", transient=True) from None
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{url}: more than {max_bytes} bytes (--max-bytes)")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if length is not None and size != length:
            raise FetchError(f"{url}: got {size} of {length} bytes", transient=True)
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, str(dest) + ".part")
    return size, h.hexdigest()


def fetch(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = 1800.0,
    read_timeout_s: float = 60.0,
    attempts: int = 4,
    backoff_s: float = 1.0,
    s3: S3Options | None = None,
) -> Fetched:
    """Download `url` to `dest` (verified, atomically); raise FetchError with a clear message."""
    if not re.match(r"^(https?|s3)://", url):
        raise FetchError(f"{url}: only http://, https:// and s3:// URLs can be fetched")
    expected = sha256.lower() if sha256 else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise FetchError(f"--sha256 {sha256!r} is not 64 hex digits")
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if expected is not None and path.is_file() and file_sha256(path) == expected:
        return Fetched(path, path.stat().st_size, expected, downloaded=False)

    deadline = time.monotonic() + timeout_s
    part = Path(str(path) + ".part")
    for attempt in range(1, attempts + 1):
        try:
            size, digest = _download_once(url, path, max_bytes, min(read_timeout_s, timeout_s), deadline, s3)
            break
        except FetchError as e:
            if not e.transient or attempt == attempts or time.monotonic() + backoff_s > deadline:
                raise
            print(f"fetch: attempt {attempt} failed ({e}); retrying in {backoff_s:g} s", file=sys.stderr)
            time.sleep(backoff_s)
            backoff_s *= 2
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise FetchError(f"{url}: sha256 mismatch: expected {expected}, got {digest}")
    os.replace(part, path)
    return Fetched(path, size, digest, downloaded=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caffeserve fetch", description="Download a model file and check its sha256.")
    p.add_argument("--url", required=True, help="http(s) URL of the file, or s3://BUCKET/KEY")
    p.add_argument("--dest", required=True, help="where to write it (written beside it first, then renamed)")
    p.add_argument("--sha256", help="expected sha256 (hex); the file is kept only if it matches")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="refuse files larger than this (default 8 GiB)")
    add_logging_arguments(p, default_level="WARNING", access_log=False)
    p.add_argument("--timeout", type=float, default=1800.0, help="overall deadline in seconds (default 1800)")
    p.add_argument("--read-timeout", type=float, default=60.0, help="longest wait for the next bytes (default 60)")
    p.add_argument("--attempts", type=int, default=4, help="tries on transient errors (default 4)")
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="S3-compatible endpoint for s3:// URLs (MinIO, Ceph, ...); default: AWS (or $AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region", metavar="REGION", help="region for s3:// URLs (default: $AWS_REGION, the SDK's)")
    p.add_argument("--s3-credentials-dir", metavar="DIR",
                   help="a folder of files named AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN): a Secret "
                        "mounted as a volume; default: the SDK's chain (environment, ~/.aws, IRSA, Pod Identity)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    configure_logging(args.log_level, args.log_format)
    started = time.monotonic()
    try:
        got = fetch(args.url, args.dest, args.sha256, max_bytes=args.max_bytes, timeout_s=args.timeout,
                    read_timeout_s=args.read_timeout, attempts=args.attempts,
                    s3=S3Options(endpoint=args.s3_endpoint, region=args.s3_region,
                                 credentials=read_credentials(args.s3_credentials_dir)))
    except (FetchError, OSError) as e:
        print(f"fetch: {e}", file=sys.stderr)
        return 1
    if got.downloaded:
        print(f"fetch: {args.url} -> {got.path} ({got.size} bytes, sha256 {got.sha256}) in {time.monotonic() - started:.1f} s")
    else:
        print(f"fetch: {got.path} already has sha256 {got.sha256}; kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
