"""The job's bucket as this machine sees it: photos up, progress, samples and models down.

Uses `dreambooth_trainer.storage.S3Storage` (one storage module for the product) with a MinIO client
of the client's own: short timeouts, credentials from the job's Secret, never from the environment.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_trainer.storage import S3Storage, StorageError, split_s3_uri

from .errors import ClientError, StorageUnreachable, connection_reason
from .photos import Photo

PROBE_ATTEMPTS = 1


class UnsafeObjectKey(ClientError):
    """An object key that would be written outside the folder it is downloaded into."""


def local_path(folder: Path, relative: str, key: str) -> Path:
    """Where object `key` (`relative` to the prefix being downloaded) lands under `folder`;
    UnsafeObjectKey for an absolute name, a backslash or a `.`/`..` segment (stores such as S3
    and Ceph accept those keys, and joining them would write outside `folder`)."""
    parts = relative.split("/")
    if (not relative or relative.startswith("/") or "\\" in relative or "\0" in relative
            or any(part in (".", "..") for part in parts)):
        raise UnsafeObjectKey(f"object {key!r} would be written outside {folder}; nothing was downloaded from there")
    path = folder.joinpath(*[part for part in parts if part])
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UnsafeObjectKey(f"object {key!r} would be written outside {folder} (through a link); nothing was downloaded from there")
    return path


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


def credentials_from_secret(data: dict[str, str], name: str, access_key_key: str = "AWS_ACCESS_KEY_ID",
                            secret_key_key: str = "AWS_SECRET_ACCESS_KEY") -> Credentials:
    missing = [key for key in (access_key_key, secret_key_key) if not data.get(key)]
    if missing:
        raise StorageUnreachable(f"storage credentials Secret {name} has no key {', '.join(missing)}")
    return Credentials(data[access_key_key], data[secret_key_key])


def minio_client(endpoint: str, secure: bool, credentials: Credentials, region: str | None = None) -> Any:
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=60),
        retries=urllib3.Retry(total=2, backoff_factor=0.3, status_forcelist=(500, 502, 503, 504)),
        maxsize=8,
    )
    return Minio(endpoint, access_key=credentials.access_key, secret_key=credentials.secret_key, secure=secure,
                 region=region, http_client=http)


class JobStorage:
    """One bucket through one MinIO client; URIs are s3://bucket/prefix as the job status gives them."""

    def __init__(self, client: Any, endpoint: str) -> None:
        self.client = client
        self.endpoint = endpoint

    def at(self, uri: str) -> S3Storage:
        bucket, prefix = split_s3_uri(uri)
        return S3Storage(bucket, prefix, client=self.client)

    def check_bucket(self, bucket: str) -> None:
        """StorageUnreachable in one line when the endpoint, the credentials or the bucket is wrong."""
        try:
            present = self.client.bucket_exists(bucket)
        except Exception as error:  # urllib3 errors after the retries, S3Error for bad credentials
            code = getattr(error, "code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise StorageUnreachable(f"storage at {self.endpoint} refused the credentials ({code})") from None
            raise StorageUnreachable(f"storage at {self.endpoint} is not reachable from here ({connection_reason(error)}); "
                                     "pass --upload-endpoint, or set the chart's defaults.storage.clientEndpoint") from None
        if not present:
            raise StorageUnreachable(f"bucket {bucket!r} does not exist at {self.endpoint}")

    def upload_photos(self, uri: str, photos: list[Photo]) -> None:
        """Upload every photo under `uri`; on any failure or Ctrl-C, delete what went up and re-raise."""
        target = self.at(uri)
        try:
            for index, photo in enumerate(photos):
                target.upload_file(f"{index:02d}-{_safe_name(photo.path.name)}", photo.path)
        except (StorageError, OSError) as error:
            self.delete(uri)
            raise StorageUnreachable(f"uploading photos to {uri} failed ({error}); nothing was created") from None
        except BaseException:
            self.delete(uri)
            raise

    def delete(self, uri: str) -> None:
        try:
            self.at(uri).delete_prefix("")
        except (StorageError, OSError):
            pass  # best effort: the caller reports the original failure

    def read_json(self, uri: str, key: str) -> dict[str, Any] | None:
        try:
            storage = self.at(uri)
            if not storage.exists(key):
                return None
            record = json.loads(storage.read_text(key))
        except (StorageError, OSError, ValueError):
            return None  # progress is best effort: the job status still tells the story
        return record if isinstance(record, dict) else None

    def list(self, uri: str, prefix: str) -> list[str]:
        try:
            return self.at(uri).list(prefix)
        except (StorageError, OSError):
            return []

    def download(self, uri: str, key: str, path: Path) -> Path:
        self.at(uri).download_file(key, path)
        return path

    def download_tree(self, uri: str, prefix: str, folder: Path) -> list[Path]:
        """Every object under `prefix` into `folder`; every key is checked before the first download."""
        storage = self.at(uri)
        targets = [(key, local_path(folder, key[len(prefix):].lstrip("/"), key)) for key in storage.list(prefix)]
        for key, path in targets:
            storage.download_file(key, path)
        return [path for _, path in targets]


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
