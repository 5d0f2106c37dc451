"""A real S3 API on loopback for tests: moto in server mode (`python -m moto.server`), a separate
process speaking S3 over HTTP, with the digits example's files uploaded to a bucket.

Credentials are fixed test values; the environment given to every S3 client here turns off the
EC2 instance-metadata lookup and the shared config files, so nothing but loopback is ever asked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from caffe_testing.servers import free_port, stop_process

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "caffe-test-key", "AWS_SECRET_ACCESS_KEY": "caffe-test-secret"}
# no instance metadata (169.254.169.254), no ~/.aws files: an S3 client asks loopback only
ISOLATED_ENV = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_env(with_credentials: bool = True) -> dict[str, str]:
    """The test's environment without any AWS_* variable of its own, plus ISOLATED_ENV (and CREDENTIALS)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(ISOLATED_ENV)
    if with_credentials:
        env.update(CREDENTIALS)
    return env


class MotoS3:
    """`python -m moto.server` on a free loopback port; `endpoint` once started. A context manager."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])

    def __enter__(self) -> MotoS3:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, env=s3_env())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited:\n{self.log.read_text()}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"moto server not up:\n{self.log.read_text()}")

    def __exit__(self, *exc):
        stop_process(self.proc, 5)

    def client(self):
        import boto3

        session = boto3.session.Session(aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                        region_name="us-east-1")
        return session.client("s3", endpoint_url=self.endpoint)

    def upload(self, bucket: str, prefix: str, files: dict[str, Path | bytes]) -> None:
        """Create `bucket` (if needed) and put each file under `prefix`/name."""
        c = self.client()
        if bucket not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
            c.create_bucket(Bucket=bucket)
        for name, data in files.items():
            body = data.read_bytes() if isinstance(data, Path) else data
            c.put_object(Bucket=bucket, Key=f"{prefix.strip('/')}/{name}" if prefix else name, Body=body)
