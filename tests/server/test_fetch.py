"""`caffeserve fetch`: a real HTTP server on loopback serves the files."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_server.commands.fetch import FetchError, fetch, main

BODY = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(BODY).hexdigest()


class Files(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    fail_first: set[str] = set()

    def do_GET(self) -> None:  # noqa: N802
        Files.hits[self.path] = Files.hits.get(self.path, 0) + 1
        if self.path in Files.fail_first and Files.hits[self.path] == 1:
            self.send_error(503)
            return
        if self.path == "/model.caffemodel":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/chunked":  # no Content-Length: the cap must count bytes
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/short":  # promises more than it sends
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY) + 10))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[str]:
    Files.hits, Files.fail_first = {}, set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    httpd.handle_error = lambda request, address: None  # clients that hang up early are expected here
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_downloads_and_verifies(server, tmp_path):
    dest = tmp_path / "sub" / "w.caffemodel"
    got = fetch(f"{server}/model.caffemodel", dest, SHA)
    assert dest.read_bytes() == BODY and got.sha256 == SHA and got.downloaded
    assert leftovers(dest.parent) == ["w.caffemodel"]  # no temporary files left


def test_a_wrong_sha256_leaves_nothing_behind(server, tmp_path):
    dest = tmp_path / "w.caffemodel"
    with pytest.raises(FetchError, match=f"sha256 mismatch: expected {'0' * 64}, got {SHA}"):
        fetch(f"{server}/model.caffemodel", dest, "0" * 64)
    assert leftovers(tmp_path) == []


def test_a_file_already_there_is_kept(server, tmp_path):
    dest = tmp_path / "w.caffemodel"
    dest.write_bytes(BODY)
    got = fetch(f"{server}/model.caffemodel", dest, SHA)
    assert not got.downloaded and Files.hits == {}


def test_a_stale_file_is_replaced(server, tmp_path):
    dest = tmp_path / "w.caffemodel"
    dest.write_bytes(b"old weights")
    fetch(f"{server}/model.caffemodel", dest, SHA)
    assert dest.read_bytes() == BODY


@pytest.mark.parametrize("path", ["/model.caffemodel", "/chunked"])
def test_size_cap(server, tmp_path, path):
    with pytest.raises(FetchError, match="--max-bytes"):
        fetch(f"{server}{path}", tmp_path / "w", max_bytes=1000)
    assert leftovers(tmp_path) == []


def test_transient_errors_are_retried(server, tmp_path):
    Files.fail_first = {"/model.caffemodel"}
    fetch(f"{server}/model.caffemodel", tmp_path / "w", SHA, backoff_s=0.01)
    assert Files.hits["/model.caffemodel"] == 2


def test_a_truncated_body_is_an_error(server, tmp_path):
    with pytest.raises(FetchError):
        fetch(f"{server}/short", tmp_path / "w", attempts=1)
    assert leftovers(tmp_path) == []


def test_not_found_is_not_retried(server, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(f"{server}/missing", tmp_path / "w", backoff_s=0.01)
    assert Files.hits["/missing"] == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/w"])
def test_only_http_urls(url, tmp_path):
    with pytest.raises(FetchError, match="only http"):
        fetch(url, tmp_path / "w")


def test_cli_exit_codes(server, tmp_path, capsys):
    assert main(["--url", f"{server}/model.caffemodel", "--dest", str(tmp_path / "w"), "--sha256", SHA]) == 0
    assert "sha256 " + SHA in capsys.readouterr().out
    assert main(["--url", f"{server}/model.caffemodel", "--dest", str(tmp_path / "x"), "--sha256", "1" * 64]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
