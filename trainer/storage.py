"""The one storage module: local folders and s3:// (MinIO client), same interface.

Keys are '/'-separated paths relative to a storage root (`file:///x/out` or `s3://bucket/prefix`).
S3 credentials come from the env contract the operator fills from a Secret:
AWS_ENDPOINT_URL (http(s)://host:port), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
"""
from __future__ import annotations

import io
import logging
import os
import random
import shutil
import time
import fcntl
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 6
MULTIPART_PART_SIZE = 16 * 1024 * 1024
PARALLEL_UPLOADS = 4
# S3 error codes that will not heal on a retry.
PERMANENT_S3_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "NoSuchKey",
    "InvalidBucketName", "AllAccessDisabled", "InvalidArgument",
    "PreconditionFailed", "ConditionalRequestConflict",  # a conditional write lost: re-read, not retry
}


class StorageError(RuntimeError):
    """A storage failure a user can act on: names the object, prefix or bucket."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object was created or replaced since it was read."""


# Object metadata (x-amz-meta-*) naming the execution attempt that wrote an object.
ATTEMPT_METADATA = "dreambooth-attempt"


@dataclass(frozen=True)
class Version:
    """One version of an object: its ETag and the attempt that wrote it (None: not recorded)."""

    etag: str
    attempt: int | None = None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join_key(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part and part.strip("/"))


def with_retries(action: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """Run a storage call, retrying transient failures (network, 5xx, throttling) with backoff."""
    from minio.error import S3Error

    delay = 0.25
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except S3Error as error:
            if error.code in PERMANENT_S3_CODES or attempt == attempts:
                raise
            reason = error.code
        except (OSError, ConnectionError) as error:  # urllib3 errors subclass these
            if attempt == attempts:
                raise StorageError(f"{what}: storage unreachable after {attempts} attempts ({error})") from None
            reason = type(error).__name__
        except Exception as error:  # urllib3.MaxRetryError and friends are not OSErrors
            if "urllib3" not in type(error).__module__ or attempt == attempts:
                raise
            reason = type(error).__name__
        log.warning("storage retry", extra={"what": what, "attempt": attempt, "reason": reason})
        time.sleep(delay * (1 + random.random() / 2))
        delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


class Storage:
    """Common interface; `open_storage(uri)` returns the right one."""

    uri: str

    def child(self, key: str) -> "Storage":
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def upload_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def download_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to this root) under prefix, sorted, recursive."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        raise NotImplementedError

    def describe(self, key: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def version(self, key: str) -> Version | None:
        """The object's current version, or None when it does not exist."""
        raise NotImplementedError

    def write_if(self, key: str, data: bytes, expected: Version | None, attempt: int) -> None:
        """Write only over `expected` (None: only if the object does not exist), recording
        `attempt`; PreconditionFailed when another writer got there first (If-Match/If-None-Match)."""
        raise NotImplementedError

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def upload_tree(self, key: str, folder: Path) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.upload_file(join_key(key, path.relative_to(folder).as_posix()), path)

    def download_tree(self, key: str, folder: Path) -> Path:
        keys = self.list(key)
        if not keys:
            raise StorageError(f"{self.describe(key)} is empty or does not exist")
        for item in keys:
            relative = item[len(key):].lstrip("/") if key else item
            self.download_file(item, folder / relative)
        return folder


class LocalStorage(Storage):
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def child(self, key: str) -> "LocalStorage":
        return LocalStorage(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.describe(key)} does not exist") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see a half-written file

    def upload_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        shutil.copyfile(path, tmp)
        tmp.replace(target)

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise StorageError(f"{self.describe(key)} does not exist") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _attempt_path(self, key: str) -> Path:
        path = self._path(key)
        return path.with_name(f".{path.name}.attempt")  # dot files are never listed

    def version(self, key: str) -> Version | None:
        path = self._path(key)
        try:
            etag = hashlib.md5(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            return None
        try:
            attempt: int | None = int(self._attempt_path(key).read_text())
        except (FileNotFoundError, ValueError):
            attempt = None
        return Version(etag, attempt)

    def write_if(self, key: str, data: bytes, expected: Version | None, attempt: int) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # compare and swap, as the object store does it
            current = self.version(key)
            if (current is None) != (expected is None) or (current and expected and current.etag != expected.etag):
                raise PreconditionFailed(f"{self.describe(key)} changed since it was read")
            self._attempt_path(key).write_text(str(attempt))
            self.write_bytes(key, data)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str, client: "object | None" = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or s3_client_from_env()

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def child(self, key: str) -> "S3Storage":
        return S3Storage(self.bucket, self._key(key), self.client)

    def _call(self, action: Callable[[], T], key: str) -> T:
        from minio.error import S3Error

        try:
            return with_retries(action, self.describe(key))
        except S3Error as error:
            raise StorageError(self._explain(error, key)) from None

    def _explain(self, error: "object", key: str) -> str:
        code = getattr(error, "code", "")
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return f"bucket {self.bucket!r}: credentials refused ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        if code == "AccessDenied":
            return f"{self.describe(key)}: access denied"
        if code == "NoSuchBucket":
            return f"bucket {self.bucket!r} does not exist"
        if code == "NoSuchKey":
            return f"{self.describe(key)} does not exist"
        return f"{self.describe(key)}: {code or error}"

    def read_bytes(self, key: str) -> bytes:
        def action() -> bytes:
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(action, key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(
            lambda: self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data)), key
        )

    def upload_file(self, key: str, path: Path) -> None:
        # Big files go up as a parallel multipart upload; MinIO/S3 make the object visible
        # only when the upload completes, so a reader never sees a partial object.
        self._call(
            lambda: self.client.fput_object(
                self.bucket, self._key(key), str(path),
                part_size=MULTIPART_PART_SIZE, num_parallel_uploads=PARALLEL_UPLOADS,
            ),
            key,
        )

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(lambda: self.client.fget_object(self.bucket, self._key(key), str(path)), key)

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        search = full + "/" if full and not full.endswith("/") else full

        def action() -> list[str]:
            names = [o.object_name for o in self.client.list_objects(self.bucket, prefix=search, recursive=True)]
            if full and not names:  # `prefix` may name one object
                names = [o.object_name for o in self.client.list_objects(self.bucket, prefix=full) if o.object_name == full]
            return names

        names = self._call(action, prefix)
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(name[cut:] for name in names)

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            with_retries(lambda: self.client.stat_object(self.bucket, self._key(key)), self.describe(key))
            return True
        except S3Error as error:
            if error.code in {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}:
                return False
            raise StorageError(self._explain(error, key)) from None

    def version(self, key: str) -> Version | None:
        from minio.error import S3Error

        try:
            stat = with_retries(lambda: self.client.stat_object(self.bucket, self._key(key)), self.describe(key))
        except S3Error as error:
            if error.code in {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}:
                return None
            raise StorageError(self._explain(error, key)) from None
        recorded = (stat.metadata or {}).get(f"x-amz-meta-{ATTEMPT_METADATA}")
        return Version(stat.etag, int(recorded) if recorded and str(recorded).isdigit() else None)

    def write_if(self, key: str, data: bytes, expected: Version | None, attempt: int) -> None:
        from minio.error import S3Error

        # PutObject with a precondition (S3 and MinIO answer 412 PreconditionFailed when it fails).
        headers = {"If-Match": f'"{expected.etag}"'} if expected else {"If-None-Match": "*"}
        headers[f"x-amz-meta-{ATTEMPT_METADATA}"] = str(attempt)
        try:
            with_retries(lambda: self.client._put_object(self.bucket, self._key(key), data, headers), self.describe(key))
        except S3Error as error:
            if error.code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                raise PreconditionFailed(f"{self.describe(key)} changed since it was read") from None
            raise StorageError(self._explain(error, key)) from None

    def delete_prefix(self, prefix: str) -> None:
        from minio.deleteobjects import DeleteObject

        keys = [DeleteObject(self._key(key)) for key in self.list(prefix)]
        if keys:
            errors = list(self._call(lambda: list(self.client.remove_objects(self.bucket, iter(keys))), prefix))
            if errors:
                raise StorageError(f"{self.describe(prefix)}: could not delete {len(errors)} objects")

    def ensure_bucket(self) -> None:
        if not self._call(lambda: self.client.bucket_exists(self.bucket), ""):
            self._call(lambda: self.client.make_bucket(self.bucket), "")


def s3_client_from_env() -> "object":
    """A MinIO client from AWS_* env vars (the one place that reads them)."""
    from minio import Minio

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT")
    if not endpoint:
        raise StorageError("s3:// storage needs AWS_ENDPOINT_URL (e.g. http://minio:9000)")
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    access = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise StorageError("s3:// storage needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return Minio(
        parsed.netloc,
        access_key=access,
        secret_key=secret,
        secure=parsed.scheme == "https",
        region=os.environ.get("AWS_REGION") or None,
    )


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.strip("/")


def open_storage(uri: str) -> Storage:
    if is_s3(uri):
        bucket, prefix = split_s3_uri(uri)
        return S3Storage(bucket, prefix)
    return LocalStorage(Path(uri.removeprefix("file://")))

