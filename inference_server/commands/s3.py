"""Reading one object from S3 or an S3-compatible store (MinIO, Ceph RGW, ...), for `caffeserve fetch`.

The library is boto3, AWS's own SDK: maintained by AWS with releases every week, it signs requests
(SigV4) the way every S3-compatible store expects and finds credentials where Kubernetes users put
them: a Secret's keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) mounted as files in
the fetch containers (`--s3-credentials-dir`, `read_credentials`; files rather than environment
variables, so they are not in every process's environment), the environment, EKS IAM Roles for Service
Accounts (AWS_WEB_IDENTITY_TOKEN_FILE), EKS Pod Identity and instance profiles, and a custom endpoint
with path-style addressing for stores that
are not AWS. obstore (smaller, also GCS and Azure) was the alternative; boto3's credential chain and
its years in production decided it. It is an optional dependency (`caffe-serving[s3]`), imported
only when an `s3://` URL is fetched.

The object is streamed (`GetObject`'s body read in chunks): `fetch.py` hashes and writes it exactly
as it does an http(s) download, with the same size cap, deadline, retries, sha256 check and atomic
rename. Errors are `FetchError`s that say what happened in S3's words (NoSuchKey, AccessDenied, ...),
transient (throttling, 5xx, connection errors) or not.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestTimeTooSkewed"}


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None  # e.g. http://minio.storage:9000; None: AWS
    region: str | None = None
    credentials: dict[str, str] | None = None  # AWS_ACCESS_KEY_ID/... (local mode's Secret); None: the default chain


CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION")


def read_credentials(folder: str | None) -> dict[str, str] | None:
    """The credentials in a mounted Secret's folder (one file per key); None without a folder."""
    if not folder:
        return None
    out = {}
    for key in CREDENTIAL_KEYS:
        path = os.path.join(folder, key)
        if os.path.isfile(path):
            with open(path) as f:
                out[key] = f.read().strip()
    if "AWS_ACCESS_KEY_ID" not in out or "AWS_SECRET_ACCESS_KEY" not in out:
        raise OSError(f"{folder} has no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY files: the Secret named by "
                      "source.s3.secretRef needs those keys")
    return out


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` → (bucket, key)."""
    parts = urllib.parse.urlsplit(url)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if parts.scheme != "s3" or not bucket or not key:
        raise ValueError(f"{url}: an S3 URL is s3://BUCKET/KEY")
    return bucket, key


def s3_url(bucket: str, prefix: str, name: str) -> str:
    """The URL of `name` under `prefix` in `bucket`."""
    key = f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name
    return f"s3://{bucket}/{key}"


def open_object(url: str, options: S3Options, read_timeout_s: float, error):
    """(ContentLength, read(n), close) of the object at `url`; `error(message, transient)` makes the
    exception to raise (fetch.FetchError)."""
    try:
        import boto3
        import botocore.config
        import botocore.exceptions as bx
    except ImportError:
        raise error(f"{url}: s3:// sources need boto3 (pip install 'caffe-serving[s3]')", False) from None
    bucket, key = parse_s3_url(url)
    creds = options.credentials or {}
    session = boto3.session.Session(
        aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=creds.get("AWS_SESSION_TOKEN"),
        region_name=options.region or creds.get("AWS_REGION") or creds.get("AWS_DEFAULT_REGION"),
    )
    config = botocore.config.Config(
        connect_timeout=min(read_timeout_s, 10.0), read_timeout=read_timeout_s,
        retries={"mode": "standard", "max_attempts": 2},  # fetch.py retries too, with its own backoff
        s3={"addressing_style": "path"} if options.endpoint else None,
        user_agent_extra="caffeserve-fetch",
    )
    where = f" at {options.endpoint}" if options.endpoint else ""
    try:
        client = session.client("s3", endpoint_url=options.endpoint or None, config=config)
        answer = client.get_object(Bucket=bucket, Key=key)
    except bx.NoCredentialsError:
        raise error(f"{url}: no S3 credentials: give source.s3.secretRef (a Secret with AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY) or the pods an identity (IRSA, Pod Identity)", False) from None
    except bx.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = e.response.get("Error", {}).get("Message") or ""
        what = {"NoSuchKey": f"no object with key '{key}' in bucket '{bucket}'",
                "NoSuchBucket": f"no bucket '{bucket}'"}.get(code) or message or code
        transient = code in TRANSIENT_CODES or status >= 500 or status == 429
        raise error(f"{url}{where}: {what} ({code or status})", transient) from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError) as e:
        raise error(f"{url}{where}: {e}", True) from None
    except bx.BotoCoreError as e:
        raise error(f"{url}{where}: {e}", False) from None
    body = answer["Body"]

    def read(n: int) -> bytes:
        try:
            return body.read(n)
        except (bx.BotoCoreError, OSError) as e:
            raise OSError(str(e)) from None

    return answer.get("ContentLength"), read, body.close
