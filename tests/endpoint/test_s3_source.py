"""`source.s3`: model files from a real S3 API (moto in server mode, its own process on loopback),
fetched the way the init containers fetch them (`caffeserve fetch --url s3://...`) and the way
local mode does (`caffeserve up` on a manifest with `source.s3` and its Secret)."""

from __future__ import annotations

import base64
import subprocess

import pytest
import yaml

from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.local import UpProcess
from caffe_testing.s3 import CREDENTIALS, ISOLATED_ENV, MotoS3, s3_env
from caffe_testing.servers import CAFFESERVE, REPO, http_json

SERVER = yaml.safe_load((DIGITS_DIR / "server.yaml").read_text())
PROTOTXT_SHA, WEIGHTS_SHA = SERVER["model"]["prototxtSha256"], SERVER["model"]["weightsSha256"]
FILES = {name: DIGITS_DIR / name for name in ("deploy.prototxt", "digits.caffemodel", "labels.txt")}
IMAGES, LABELS = digits_data.held_out()


@pytest.fixture(scope="module")
def s3():
    with MotoS3() as server:
        server.upload("models", "zoo/digits/v1", FILES)
        yield server


def fetch(s3, key: str, dest, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`caffeserve fetch` exactly as an init container runs it."""
    return subprocess.run(CAFFESERVE + ["fetch", "--url", f"s3://models/{key}", "--dest", str(dest),
                                        "--s3-endpoint", s3.endpoint, "--attempts", "1", *extra],
                          cwd=REPO, env=env or s3_env(), capture_output=True, text=True, timeout=60)


def test_fetch_from_s3_checks_the_sha256_and_keeps_a_good_file(s3, tmp_path):
    # the credentials as the init container has them: the Secret's keys as files, none in the environment
    secret = tmp_path / "secret"
    secret.mkdir()
    for key, value in CREDENTIALS.items():
        (secret / key).write_text(value)
    dest = tmp_path / "models" / "digits.caffemodel"
    got = fetch(s3, "zoo/digits/v1/digits.caffemodel", dest, "--sha256", WEIGHTS_SHA,
                "--s3-credentials-dir", str(secret), env=s3_env(with_credentials=False))
    assert got.returncode == 0, got.stderr
    assert dest.read_bytes() == FILES["digits.caffemodel"].read_bytes()
    assert f"sha256 {WEIGHTS_SHA}" in got.stdout
    again = fetch(s3, "zoo/digits/v1/digits.caffemodel", dest, "--sha256", WEIGHTS_SHA)
    assert again.returncode == 0 and "already has sha256" in again.stdout  # a restarted init container


def test_a_wrong_checksum_leaves_no_file(s3, tmp_path):
    dest = tmp_path / "digits.caffemodel"
    got = fetch(s3, "zoo/digits/v1/digits.caffemodel", dest, "--sha256", "0" * 64)
    assert got.returncode == 1
    assert (f"fetch: s3://models/zoo/digits/v1/digits.caffemodel: sha256 mismatch: "
            f"expected {'0' * 64}, got {WEIGHTS_SHA}") in got.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


def test_a_missing_key_bucket_or_credentials_says_which(s3, tmp_path):
    got = fetch(s3, "zoo/digits/v2/digits.caffemodel", tmp_path / "w")
    assert got.returncode == 1
    assert "no object with key 'zoo/digits/v2/digits.caffemodel' in bucket 'models' (NoSuchKey)" in got.stderr
    got = subprocess.run(CAFFESERVE + ["fetch", "--url", "s3://no-such-bucket/x", "--dest", str(tmp_path / "x"),
                                       "--s3-endpoint", s3.endpoint, "--attempts", "1"],
                         cwd=REPO, env=s3_env(), capture_output=True, text=True, timeout=60)
    assert got.returncode == 1 and "no bucket 'no-such-bucket' (NoSuchBucket)" in got.stderr
    got = fetch(s3, "zoo/digits/v1/labels.txt", tmp_path / "labels.txt", env=s3_env(with_credentials=False))
    assert got.returncode == 1 and "no S3 credentials: give source.s3.secretRef" in got.stderr


def manifest(s3, weights_sha: str = WEIGHTS_SHA) -> str:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"}, "type": "Opaque",
              "data": {k: base64.b64encode(v.encode()).decode() for k, v in CREDENTIALS.items()}}
    service = yaml.safe_load((DIGITS_DIR / "service.yaml").read_text())
    service["spec"]["replicas"] = 1
    service["spec"]["source"] = {"s3": {"bucket": "models", "prefix": "zoo/digits/v1", "endpoint": s3.endpoint,
                                        "secretRef": {"name": "s3-creds"}}}
    service["spec"]["model"]["weightsSha256"] = weights_sha
    return yaml.safe_dump_all([secret, service])


def test_local_mode_reads_an_s3_source_like_the_cluster(s3, tmp_path, monkeypatch):
    for key in [k for k in list(__import__("os").environ) if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in ISOLATED_ENV.items():  # the credentials come from the manifest's Secret only
        monkeypatch.setenv(key, value)
    path = tmp_path / "service.yaml"
    path.write_text(manifest(s3))
    up = UpProcess(str(path), "--cache-dir", str(tmp_path / "cache"))
    try:
        up.wait_ready(timeout=90)
        assert "digits: digits.caffemodel downloaded" in up.output
        status, body = http_json("POST", up.url + "/v2/models/digits/infer", {
            "inputs": [{"name": "data", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(digits_data.render_png(IMAGES[0], 32)).decode()]}],
            "outputs": [{"name": "prob", "parameters": {"classification": 1}}]})
        assert status == 200 and body["outputs"][0]["data"][0].split(":")[2] == str(LABELS[0])
    finally:
        up.terminate()
    # the same manifest with a wrong sha256 stops with fetch's message
    path.write_text(manifest(s3, weights_sha="1" * 64))
    bad = UpProcess(str(path), "--cache-dir", str(tmp_path / "cache2"))
    assert bad.proc.wait(60) == 1
    bad._reader.join(5)
    assert "digits: model.weights: s3://models/zoo/digits/v1/digits.caffemodel: sha256 mismatch" in bad.output
