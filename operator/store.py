"""The one module that reads object storage for the operator (through dreambooth_trainer.storage).

Credentials come from the job's Secret (read by `kube`), never from the operator's own env.
Reads are small: progress.json, `latest`, the first bytes of instance images.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dreambooth_trainer.storage import S3Storage, StorageError, join_key, split_s3_uri, with_retries

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
}
# One attempt with short timeouts: a reconcile must not hold a worker during an outage; the next
# reconcile retries. After a failure the endpoint is not tried again for BREAKER_SECONDS.
ATTEMPTS = 1
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
BREAKER_SECONDS = 10.0
# A passed instance-data check is reused this long (a later change is seen after at most this).
LISTING_REUSE_SECONDS = 5.0


class StoreUnavailable(RuntimeError):
    """Storage could not be reached now; retry later."""


class StoreRefused(RuntimeError):
    """Storage answered, and the answer makes the job unrunnable (the message names the object)."""


@dataclass(frozen=True)
class Credentials:
    endpoint: str
    secure: bool
    access_key: str
    secret_key: str
    region: str | None = None


_clients: dict[Credentials, Any] = {}
_clients_lock = threading.Lock()


def _client(creds: Credentials) -> Any:
    import urllib3
    from minio import Minio

    with _clients_lock:
        if creds not in _clients:
            # Short timeouts, no retries here: an outage must not hold a reconcile.
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
                retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0),
                maxsize=16,
            )
            _clients[creds] = Minio(
                creds.endpoint, access_key=creds.access_key, secret_key=creds.secret_key,
                secure=creds.secure, region=creds.region, http_client=http,
            )
        return _clients[creds]


class _OperatorS3(S3Storage):
    """dreambooth_trainer.storage's S3 access with the operator's shorter retry budget."""

    def _call(self, action: Any, key: str) -> Any:
        from minio.error import S3Error

        try:
            return with_retries(action, self.describe(key), attempts=ATTEMPTS)
        except S3Error as error:
            raise StorageError(self._explain(error, key)) from None

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            with_retries(lambda: self.client.stat_object(self.bucket, self._key(key)), self.describe(key), attempts=ATTEMPTS)
            return True
        except S3Error as error:
            if error.code in {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}:
                return False
            raise StorageError(self._explain(error, key)) from None


def _storage(creds: Credentials, uri: str) -> S3Storage:
    try:
        bucket, prefix = split_s3_uri(uri)
    except StorageError as error:
        raise StoreRefused(str(error)) from None
    return _OperatorS3(bucket, prefix, client=_client(creds))


def _classify(error: Exception) -> Exception:
    text = str(error)
    if "unreachable" in text or isinstance(error, (OSError, ConnectionError)) or "urllib3" in type(error).__module__:
        return StoreUnavailable(text)
    return StoreRefused(text)


class _Breaker:
    """Per endpoint: after it failed, fail fast for a while instead of waiting on timeouts again."""

    def __init__(self) -> None:
        self._open_until: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def check(self, endpoint: str) -> None:
        with self._lock:
            until, why = self._open_until.get(endpoint, (0.0, ""))
        if time.monotonic() < until:
            raise StoreUnavailable(f"storage {endpoint} unreachable ({why}); retried in {until - time.monotonic():.0f} s")

    def failed(self, endpoint: str, why: str) -> None:
        with self._lock:
            self._open_until[endpoint] = (time.monotonic() + BREAKER_SECONDS, why[:200])

    def succeeded(self, endpoint: str) -> None:
        with self._lock:
            self._open_until.pop(endpoint, None)


_breaker = _Breaker()
# (endpoint, bucket, object, ETag) of images whose first bytes were read and looked like an image.
_readable: dict[tuple[str, str, str, str], None] = {}
MAX_READABLE_KEPT = 20000
_checked: dict[tuple[Credentials, str], tuple[float, int]] = {}  # (creds, uri) -> (when it passed, images)
_checked_lock = threading.Lock()
_checking: dict[tuple[Credentials, str], threading.Lock] = {}  # one check of a prefix at a time
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")


def _guarded(creds: Credentials, call: Any) -> Any:
    """Run one storage read through the endpoint's breaker."""
    _breaker.check(creds.endpoint)
    try:
        result = call()
    except StoreUnavailable as error:
        _breaker.failed(creds.endpoint, str(error))
        raise
    _breaker.succeeded(creds.endpoint)
    return result


def read_progress(creds: Credentials, output_uri: str) -> dict[str, Any] | None:
    return _guarded(creds, lambda: _read_progress(creds, output_uri))


def read_latest_checkpoint(creds: Credentials, output_uri: str) -> str | None:
    return _guarded(creds, lambda: _read_latest_checkpoint(creds, output_uri))


def is_exported(creds: Credentials, output_uri: str, prefix: str) -> bool:
    """The export folder `prefix` of the output is complete (its dreambooth.json is written last)."""
    return _guarded(creds, lambda: _read_optional(creds, output_uri, f"{prefix}/dreambooth.json") is not None)


def check_instance_images(creds: Credentials, instance_uri: str) -> int:
    """Count the readable images under the instance prefix (an image already read, with the same
    ETag, is not read again; a passed check is reused for LISTING_REUSE_SECONDS, and callers
    arriving while one runs wait for it: a burst of jobs on one subject costs one listing)."""
    key = (creds, instance_uri)
    with _checked_lock:
        if len(_checking) > MAX_READABLE_KEPT:
            _checking.clear()
        one_at_a_time = _checking.setdefault(key, threading.Lock())
    with one_at_a_time:
        with _checked_lock:
            passed = _checked.get(key)
        if passed is not None and time.monotonic() - passed[0] < LISTING_REUSE_SECONDS:
            return passed[1]
        count = _guarded(creds, lambda: _check_instance_images(creds, instance_uri))
        with _checked_lock:
            if len(_checked) > MAX_READABLE_KEPT:
                _checked.clear()
            _checked[key] = (time.monotonic(), count)
        return count


def check_model_source(creds: Credentials, source: str) -> None:
    _guarded(creds, lambda: _check_model_source(creds, source))


def delete_objects(creds: Credentials, uri: str, suffixes: tuple[str, ...] = ()) -> int:
    """Delete every object under `uri` (only those ending in `suffixes`, when given); returns how
    many. Deletion is idempotent: a retry after a partial one deletes the rest."""
    return _guarded(creds, lambda: _delete_objects(creds, uri, suffixes))


def _delete_objects(creds: Credentials, uri: str, suffixes: tuple[str, ...]) -> int:
    from minio.deleteobjects import DeleteObject

    storage = _storage(creds, uri)
    prefix = join_key(storage.prefix, "")
    search = prefix + "/" if prefix and not prefix.endswith("/") else prefix
    try:
        names = [o.object_name for o in storage.client.list_objects(storage.bucket, prefix=search, recursive=True)
                 if not suffixes or o.object_name.lower().endswith(suffixes)]
        for start in range(0, len(names), 1000):  # DeleteObjects takes 1,000 keys a call
            errors = list(storage.client.remove_objects(storage.bucket, iter(DeleteObject(n) for n in names[start:start + 1000])))
            if errors:
                raise StoreRefused(f"{storage.describe()}: {len(errors)} objects could not be deleted ({errors[0].code})")
    except StoreRefused:
        raise
    except Exception as error:  # S3Error, network errors
        if "S3Error" in type(error).__name__:
            raise StoreRefused(storage._explain(error, "")) from None
        raise _classify(error) from None
    return len(names)


def _read_progress(creds: Credentials, output_uri: str) -> dict[str, Any] | None:
    """progress.json written by rank 0, or None before the first record."""
    text = _read_optional(creds, output_uri, "progress.json")
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None  # a torn read of a record being replaced; the next tick gets a whole one
    return record if isinstance(record, dict) else None


def _read_latest_checkpoint(creds: Credentials, output_uri: str) -> str | None:
    """The `latest` pointer as a full URI (s3://.../checkpoints/step-NNNNNNNN), or None."""
    text = _read_optional(creds, output_uri, "latest")
    if not text or not text.strip():
        return None
    return f"{output_uri.rstrip('/')}/{text.strip().strip('/')}"


def _read_optional(creds: Credentials, uri: str, key: str) -> str | None:
    storage = _storage(creds, uri)
    try:
        if not storage.exists(key):
            return None
        return storage.read_text(key)
    except StorageError as error:
        if "does not exist" in str(error):
            return None
        raise _classify(error) from None
    except Exception as error:  # network errors that escaped the retries
        raise _classify(error) from None


def _check_instance_images(creds: Credentials, instance_uri: str) -> int:
    """Count the readable images under the instance prefix; refuse with the object's name."""
    storage = _storage(creds, instance_uri)
    prefix = join_key(storage.prefix, "")
    search = prefix + "/" if prefix and not prefix.endswith("/") else prefix
    try:
        listed = with_retries(lambda: list(storage.client.list_objects(storage.bucket, prefix=search, recursive=True)),
                              storage.describe(), attempts=ATTEMPTS)
    except Exception as error:  # S3Error, StorageError, or network errors
        if "S3Error" in type(error).__name__:
            raise StoreRefused(storage._explain(error, "")) from None
        raise _classify(error) from None
    images = [(o.object_name[len(search):], o.etag or "") for o in listed if o.object_name.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise StoreRefused(f"no images (*.jpg, *.png, *.webp) under {instance_uri}")
    unread = [(key, etag) for key, etag in images if (creds.endpoint, storage.bucket, join_key(storage.prefix, key), etag) not in _readable]
    # The first bytes of each image not read before, a few at a time (small parallel GETs).
    for (key, etag), head in zip(unread, _pool.map(lambda item: _head(storage, item[0]), unread)):
        if not _looks_like_image(head):
            raise StoreRefused(f"instance image {storage.describe(key)} is not a readable image (unknown header {head[:8].hex()})")
        if len(_readable) > MAX_READABLE_KEPT:
            _readable.clear()
        _readable[(creds.endpoint, storage.bucket, join_key(storage.prefix, key), etag)] = None
    return len(images)


def _check_model_source(creds: Credentials, source: str) -> None:
    """s3:// sources must hold a diffusers model (model_index.json); others are checked by the trainer."""
    if not source.startswith("s3://"):
        return
    storage = _storage(creds, source)
    try:
        present = storage.exists("model_index.json")
    except Exception as error:
        raise _classify(error) from None
    if not present:
        raise StoreRefused(f"model source {source} holds no model_index.json (not a diffusers model folder)")


def _head(storage: S3Storage, key: str, size: int = 16) -> bytes:
    def action() -> bytes:
        response = storage.client.get_object(storage.bucket, join_key(storage.prefix, key), offset=0, length=size)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    try:
        return with_retries(action, storage.describe(key), attempts=ATTEMPTS)
    except StorageError as error:
        raise _classify(error) from None
    except Exception as error:
        if "S3Error" in type(error).__name__:
            raise StoreRefused(f"instance image {storage.describe(key)} cannot be read ({getattr(error, 'code', error)})") from None
        raise _classify(error) from None


def _looks_like_image(head: bytes) -> bool:
    if any(head.startswith(magic) for magic in MAGIC):
        return True
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
