"""TLS from files on disk that may change while the program runs: the listeners' certificate and key
(the gateway's `--tls-dir`, a model server's `--tls-dir`), and the CA that a client of the model pods
(the gateway, the operator) checks their certificates against (`ClientTLS`).

The files are a `kubernetes.io/tls` Secret mounted as a volume (tls.crt, tls.key; cert-manager
writes that layout). When the Secret changes, the kubelet writes the new files into a fresh folder
and swaps one symlink, so both files change at once; a poll of their stat (inode, size, mtime, after
the symlinks) sees the swap without inotify, which does not follow that swap. A pair that does not
load (a key that does not match, a half-written file from some other writer) is logged and the
last good pair kept; the next poll tries again.

New connections get the new certificate; connections already open keep theirs (TLS cannot change
a certificate mid-connection). REST and gRPC (on our HTTP/2 transport) swap the SSLContext of each
handshake (`sni_callback`, which OpenSSL calls on every ClientHello, SNI or not); grpc.aio asks
`cert_config` before each handshake.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RELOAD_POLL_S = 2.0  # a stat of two files every 2 s: nothing measurable, and well inside the kubelet's ~1 min sync


FileStamp = tuple[int, int, int, int] | None


def file_stamp(path: Path) -> FileStamp:
    """A file's target identity, size and mtime (None when it cannot be read): what a Secret's swap changes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, folder: str | Path) -> TLSFiles:
        """The `kubernetes.io/tls` layout: tls.crt and tls.key in `folder`."""
        return cls(Path(folder) / "tls.crt", Path(folder) / "tls.key")

    def stamp(self) -> tuple[FileStamp, ...]:
        """What changes when either file does (their targets' identity, size and mtime)."""
        return file_stamp(self.cert), file_stamp(self.key)


def server_context(files: TLSFiles, alpn: str = "http/1.1") -> ssl.SSLContext:
    """A server SSLContext holding the pair (TLS 1.2+, ALPN `alpn`: h2 for gRPC, whose clients insist on it).
    ssl.SSLError/OSError when it does not load."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([alpn])
    ctx.load_cert_chain(files.cert, files.key)
    return ctx


class ReloadingTLS:
    """The current certificate pair of `files`, reloaded when they change (`check`, or `watch` in a task).

    `context` is what the REST listener is given: it hands each handshake the newest loaded context;
    `h2_context` the same for the gRPC listener on our HTTP/2 transport (ALPN h2).
    `generation` counts successful loads; `pem` is the newest pair as bytes (for grpc.aio).
    """

    def __init__(self, files: TLSFiles, poll_s: float = RELOAD_POLL_S):
        self.files = files
        self.poll_s = poll_s
        self._stamp = files.stamp()
        self._current = server_context(files)  # the first load must succeed: a bad pair at start is fatal
        self._current_h2 = server_context(files, "h2")
        self.pem = self._read()
        self.generation = 1
        # The listener's own context is never swapped out; each handshake is moved to the newest one.
        self.context = server_context(files)
        self.context.sni_callback = self._pick
        self.h2_context = server_context(files, "h2")
        self.h2_context.sni_callback = self._pick_h2

    def _read(self) -> tuple[bytes, bytes]:
        return self.files.cert.read_bytes(), self.files.key.read_bytes()

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self._current is not ctx:
            sslobj.context = self._current
        return None

    def _pick_h2(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self._current_h2 is not ctx:
            sslobj.context = self._current_h2
        return None

    def check(self) -> bool:
        """Reload when the files changed since the last look; True when a new pair was loaded."""
        stamp = self.files.stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            ctx, ctx_h2, pem = server_context(self.files), server_context(self.files, "h2"), self._read()
        except (ssl.SSLError, OSError, ValueError) as e:
            log.warning("TLS: %s / %s changed but do not load (%s); serving the previous certificate",
                        self.files.cert, self.files.key, e)
            return False
        self._current, self._current_h2, self.pem = ctx, ctx_h2, pem
        self.generation += 1
        log.info("TLS: loaded the new certificate from %s", self.files.cert)
        return True

    async def watch(self) -> None:
        """Poll the files until cancelled."""
        while True:
            await asyncio.sleep(self.poll_s)
            self.check()

    def grpc_credentials(self) -> Any:
        """gRPC server credentials that take the newest pair at each new connection's handshake."""
        import grpc

        served = {"generation": self.generation}

        def config() -> Any:
            cert, key = self.pem
            return grpc.ssl_server_certificate_configuration([(key, cert)])

        def fetch() -> Any:  # called by gRPC before each handshake, on its own thread: read-only here
            if served["generation"] == self.generation:
                return None  # no change
            served["generation"] = self.generation
            return config()

        return grpc.dynamic_ssl_server_credentials(config(), fetch)


# The name every model pod's certificate carries (a DNS SAN), checked instead of the pod's address: pods come
# and go with new IPs, and a certificate per pod IP is not something cert-manager or a user can keep up with.
POD_SERVER_NAME = "caffe-model-server"


def client_context(ca_file: str | Path, alpn: str | None = None) -> ssl.SSLContext:
    """A client SSLContext that trusts `ca_file` only (TLS 1.2+, hostname checked; `alpn` h2 for gRPC).
    ssl.SSLError/OSError when the file does not load."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols([alpn])
    return ctx


class ClientTLS:
    """How to reach the model pods over TLS: the CA bundle (re-read when the file changes: the Secret it is
    mounted from may rotate) and the server name their certificates carry (`POD_SERVER_NAME` by default)."""

    def __init__(self, ca_file: str | Path, server_name: str = POD_SERVER_NAME, poll_s: float = RELOAD_POLL_S):
        self.ca_file = Path(ca_file)
        self.server_name = server_name
        self.poll_s = poll_s
        self._stamp = file_stamp(self.ca_file)
        self._checked = 0.0
        self._contexts = {alpn: client_context(self.ca_file, alpn) for alpn in (None, "h2")}  # fatal at start

    def context(self, alpn: str | None = None) -> ssl.SSLContext:
        """The newest loaded context (checked for a new CA at most every `poll_s`; a CA that does not load
        is logged and the last good one kept)."""
        now = time.monotonic()
        if now - self._checked >= self.poll_s:
            self._checked = now
            stamp = file_stamp(self.ca_file)
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._contexts = {a: client_context(self.ca_file, a) for a in (None, "h2")}
                    log.info("TLS: loaded the new CA bundle %s for the model pods", self.ca_file)
                except (ssl.SSLError, OSError, ValueError) as e:
                    log.warning("TLS: %s changed but does not load (%s); keeping the previous CA", self.ca_file, e)
        return self._contexts[alpn]
