"""The object store: S3 through boto3 with an explicit endpoint URL, so AWS S3, MinIO and SeaweedFS all work.

Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an IAM
role); nothing here logs them. Every boto3 error is wrapped into :mod:`edgeloop_core.errors` with its cause kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from edgeloop_core.errors import BucketNotFound, ObjectNotFound, StoreError, StoreUnavailable, VersionExists

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_EXISTS_CODES = {"412", "PreconditionFailed", "ConditionalRequestConflict"}


class ObjectStore:
    """One bucket at one endpoint.

    Args:
        bucket: bucket name.
        endpoint_url: e.g. ``http://127.0.0.1:8333`` for a local SeaweedFS; ``None`` for AWS S3.
        region: signing region (``us-east-1`` works for SeaweedFS and MinIO).
        client: an existing boto3 S3 client to reuse (tests, custom sessions).
        connect_timeout_s, read_timeout_s, max_attempts: how long one request may take at worst (about
            ``max_attempts`` × the timeouts); the device keeps them short so a hung endpoint falls back to the cache.
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: S3Client | None = None,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url or None
        self._where = f"bucket {bucket!r} at {self.endpoint_url or 'AWS S3'}"
        # A session of its own: boto3's default session caches the credentials it resolved first.
        self.client = client or boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                s3={"addressing_style": "path"},
            ),
        )

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        what = f"s3://{self.bucket}/{key}" if key else self._where
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise BucketNotFound(
                    f"{self._where} does not exist: create it or point the bucket setting elsewhere"
                ) from exc
            if code in _NOT_FOUND_CODES:
                raise ObjectNotFound(f"{what} does not exist") from exc
            if code in _DENIED_CODES:
                raise StoreUnavailable(
                    f"{self._where} refused our credentials ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                ) from exc
            if code in _EXISTS_CODES:
                raise VersionExists(f"{what} already exists: versions are immutable") from exc
            raise StoreError(f"S3 error {code or 'unknown'} on {what}") from exc
        except NoCredentialsError as exc:
            raise StoreUnavailable(
                f"no S3 credentials for {self._where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from exc
        except EndpointConnectionError as exc:
            raise StoreUnavailable(f"cannot reach {self._where}: is the S3 endpoint up?") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 request to {self._where} failed: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        with self._errors():
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                    raise
            self.client.create_bucket(Bucket=self.bucket)

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            return False
        return True

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``."""
        keys: list[str] = []
        with self._errors(prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def list_prefixes(self, prefix: str) -> list[str]:
        """The next-level "folders" under ``prefix`` (which should end with ``/``), without the prefix."""
        names: list[str] = []
        with self._errors(prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                names.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        return names

    def open_range(self, key: str, offset: int = 0) -> StreamingBody:
        """A streaming body of ``key`` from byte ``offset`` on (a ranged GET, for resumable downloads)."""
        with self._errors(key):
            if offset:
                return self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-")["Body"]
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]

    def get_bytes(self, key: str) -> bytes:
        """The whole object (for small objects: manifests, channel pointers)."""
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The whole object and its ETag, for a write conditional on it (:meth:`replace_if_unchanged`)."""
        with self._errors(key):
            found = self.client.get_object(Bucket=self.bucket, Key=key)
            return found["Body"].read(), found["ETag"]

    def replace_if_unchanged(self, key: str, data: bytes, etag: str, *,
                             content_type: str = "application/octet-stream") -> bool:
        """Write ``data`` over ``key`` only while it still has ``etag`` (``If-Match``); ``False`` when someone wrote
        it since it was read (the store answers 412), so their newer object stays."""
        try:
            with self._errors(key):
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, IfMatch=etag)
        except VersionExists:  # 412 Precondition Failed: not the object we read any more
            return False
        return True

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream",
                  if_absent: bool = False) -> None:
        """Write ``data`` to ``key``; with ``if_absent`` the write is conditional (``If-None-Match: *``)."""
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, **extra)

    def put_file(self, key: str, path: str | Path, *, content_type: str = "application/octet-stream") -> None:
        """Upload a local file (multipart for large files)."""
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"ContentType": content_type})

    def download_file(self, key: str, dest: str | Path) -> Path:
        """Download ``key`` to ``dest`` atomically: a temporary file in the same folder, renamed when complete."""
        from edgeloop_core.files import atomic_output

        dest = Path(dest)
        with atomic_output(dest) as tmp, self._errors(key):
            self.client.download_file(self.bucket, key, str(tmp))
        return dest
