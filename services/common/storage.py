"""Object storage for inputs and outputs: a local directory or any S3-compatible store.

Both backends speak in keys like ``edits/<job id>/output_0.png``; nothing outside this
module knows where bytes really live.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from services.common.settings import Settings


class StorageError(Exception):
    """The store could not be reached or refused the operation."""


class ObjectNotFound(StorageError):
    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} does not exist")
        self.key = key


class Storage(Protocol):
    def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (a folder: it ends with "/"); returns how
        many there were (file storage: 1 when the folder existed)."""
        ...

    def list(self, prefix: str) -> list[str]: ...
    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL a client can GET directly, or None when the store has none (files)."""
        ...

    def ping(self) -> None: ...


@contextlib.contextmanager
def _os_errors(action: str, key: str) -> Iterator[None]:
    # A full disk or a permission problem is the store failing, not a bug: callers handle
    # StorageError (fail the job, answer 503) and would crash on a bare OSError.
    try:
        yield
    except FileNotFoundError:
        raise ObjectNotFound(key) from None
    except OSError as exc:
        raise StorageError(f"could not {action} {key!r}: {exc}") from exc


def _check_prefix(prefix: str) -> str:
    if not prefix.endswith("/"):
        raise ValueError(f"a prefix to delete is a folder ending in '/': {prefix!r}")
    _check_key(prefix[:-1])
    return prefix


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class FileStorage:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        with _os_errors("write", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write-then-rename so a reader never sees half an image.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def get(self, key: str) -> bytes:
        with _os_errors("read", key):
            return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with _os_errors("delete", key):
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        path = self._path(_check_prefix(prefix)[:-1])
        with _os_errors("delete", prefix):
            if not path.is_dir():
                return 0
            shutil.rmtree(path)
            return 1

    def list(self, prefix: str) -> list[str]:
        if not self.root.exists():
            return []
        keys = (
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )
        return sorted(k for k in keys if k.startswith(prefix))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return None

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage directory {self.root} is not writable")


class S3Storage:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Path-style addressing: MinIO and most self-hosted stores do not serve
        # virtual-host buckets.
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
        )
        session = boto3.session.Session()
        self._client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._signer = (
            session.client(
                "s3", endpoint_url=public_endpoint_url, region_name=region, config=config
            )
            if public_endpoint_url
            else self._client
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call(
            self._client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            ContentType=content_type,
        )

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(key) from None
            raise StorageError(str(exc)) from exc
        except BotoCoreError as exc:  # endpoint unreachable, read timeout, no credentials
            raise StorageError(str(exc)) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StorageError(str(exc)) from exc
        except BotoCoreError as exc:
            raise StorageError(str(exc)) from exc

    def delete(self, key: str) -> None:
        self._call(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        _check_prefix(prefix)
        keys = self.list(prefix)
        # DeleteObjects takes up to 1,000 keys a call.
        for start in range(0, len(keys), 1000):
            objects = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            reply = self._call(
                self._client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": objects, "Quiet": True},
            )
            if reply.get("Errors"):
                raise StorageError(f"could not delete under {prefix!r}: {reply['Errors'][0]}")
        return len(keys)

    def list(self, prefix: str) -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []

        def collect() -> None:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))

        self._call(collect)
        return sorted(keys)

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self._call(
            self._signer.generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )

    def ping(self) -> None:
        self._call(self._client.head_bucket, Bucket=self.bucket)

    @staticmethod
    def _call(fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(str(exc)) from exc


# Keys under this prefix are the readiness probe's own; no job or run writes there.
PROBE_PREFIX = "_probe/"


def check_writable(storage: Storage) -> None:
    """Raise StorageError unless `storage` takes a write: a small probe object is put and
    deleted again (a store can answer reads, ping included, and still refuse writes: a
    read-only mount, a full disk, a bucket policy or credentials that only read)."""
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        storage.put(key, b"probe", "text/plain")
    finally:
        with contextlib.suppress(StorageError):
            storage.delete(key)


def open_storage(settings: Settings) -> Storage:
    url = urlparse(settings.storage_url)
    if url.scheme == "file":
        # file://./var/x is relative (netloc "."), file:///abs/x is absolute.
        return FileStorage((url.netloc + url.path) if url.netloc else url.path)
    if url.scheme == "s3":
        if not url.netloc:
            raise ValueError(f"storage URL {settings.storage_url!r} names no bucket")
        return S3Storage(
            url.netloc,
            url.path,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.s3_region,
        )
    raise ValueError(
        f"unsupported storage URL {settings.storage_url!r}: use file://<dir> or s3://<bucket>[/prefix]"
    )
