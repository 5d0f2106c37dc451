"""TLS for the gateway's listeners, from a certificate and key on disk that may change while it runs.

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
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RELOAD_POLL_S = 2.0  # a stat of two files every 2 s: nothing measurable, and well inside the kubelet's ~1 min sync


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, folder: str | Path) -> TLSFiles:
        """The `kubernetes.io/tls` layout: tls.crt and tls.key in `folder`."""
        return cls(Path(folder) / "tls.crt", Path(folder) / "tls.key")

    def stamp(self) -> tuple:
        """What changes when either file does (their targets' identity, size and mtime)."""
        out: list = []
        for p in (self.cert, self.key):
            try:
                st = os.stat(p)
            except OSError:
                out.append(None)
                continue
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)


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

    def _pick(self, sslobj, server_name, ctx) -> None:
        if self._current is not ctx:
            sslobj.context = self._current
        return None

    def _pick_h2(self, sslobj, server_name, ctx) -> None:
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

    def grpc_credentials(self):
        """gRPC server credentials that take the newest pair at each new connection's handshake."""
        import grpc

        served = {"generation": self.generation}

        def config():
            cert, key = self.pem
            return grpc.ssl_server_certificate_configuration([(key, cert)])

        def fetch():  # called by gRPC before each handshake, on its own thread: read-only here
            if served["generation"] == self.generation:
                return None  # no change
            served["generation"] = self.generation
            return config()

        return grpc.dynamic_ssl_server_credentials(config(), fetch)
