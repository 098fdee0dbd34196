"""The operator's storage reads against a real MinIO: progress, `latest`, the instance checks."""
from __future__ import annotations

import io
import json
from typing import Any

import pytest

from dreambooth_operator import store

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 24


@pytest.fixture()
def creds(minio_server: Any) -> store.Credentials:
    return store.Credentials(minio_server.endpoint, False, minio_server.access_key, minio_server.secret_key)


def put(minio_server: Any, bucket: str, key: str, data: bytes) -> None:
    from minio import Minio

    client = Minio(minio_server.endpoint, minio_server.access_key, minio_server.secret_key, secure=False)
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def test_progress_and_latest(minio_server: Any, bucket: str, creds: store.Credentials) -> None:
    uri = f"s3://{bucket}/jobs/ns/rex/u1"
    assert store.read_progress(creds, uri) is None and store.read_latest_checkpoint(creds, uri) is None
    record = {"step": 6, "total_steps": 12, "loss": 0.5, "images_per_second": 2.0, "eta_seconds": 9.0, "time": 1.0}
    put(minio_server, bucket, "jobs/ns/rex/u1/progress.json", json.dumps(record).encode())
    put(minio_server, bucket, "jobs/ns/rex/u1/latest", b"checkpoints/step-00000006\n")
    assert store.read_progress(creds, uri) == record
    assert store.read_latest_checkpoint(creds, uri) == f"{uri}/checkpoints/step-00000006"
    put(minio_server, bucket, "jobs/ns/rex/u1/progress.json", b'{"step": 7, "tot')  # torn
    assert store.read_progress(creds, uri) is None


def test_instance_images_are_checked_and_a_bad_one_is_named(minio_server: Any, bucket: str, creds: store.Credentials,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "LISTING_REUSE_SECONDS", 0.0)  # every call lists (the reuse is tested below)
    with pytest.raises(store.StoreRefused, match="no images"):
        store.check_instance_images(creds, f"s3://{bucket}/subjects/rex")
    put(minio_server, bucket, "subjects/rex/0.png", PNG)
    put(minio_server, bucket, "subjects/rex/1.JPG", JPEG)
    put(minio_server, bucket, "subjects/rex/notes.txt", b"not an image, not looked at")
    assert store.check_instance_images(creds, f"s3://{bucket}/subjects/rex") == 2
    put(minio_server, bucket, "subjects/rex/2.jpg", b"GIF89a....")
    with pytest.raises(store.StoreRefused, match=f"s3://{bucket}/subjects/rex/2.jpg is not a readable image"):
        store.check_instance_images(creds, f"s3://{bucket}/subjects/rex")


def test_model_source_needs_a_diffusers_folder(minio_server: Any, bucket: str, creds: store.Credentials) -> None:
    store.check_model_source(creds, "tiny")
    store.check_model_source(creds, "hf://org/model")
    with pytest.raises(store.StoreRefused, match="model_index.json"):
        store.check_model_source(creds, f"s3://{bucket}/models/sd15")
    put(minio_server, bucket, "models/sd15/model_index.json", b"{}")
    store.check_model_source(creds, f"s3://{bucket}/models/sd15")


def test_wrong_credentials_are_refused_not_retried_forever(minio_server: Any, bucket: str) -> None:
    wrong = store.Credentials(minio_server.endpoint, False, minio_server.access_key, "not-the-secret")
    with pytest.raises(store.StoreRefused, match="credentials refused"):
        store.check_instance_images(wrong, f"s3://{bucket}/subjects/rex")


def test_an_unreachable_endpoint_is_temporary() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nowhere = store.Credentials(f"127.0.0.1:{port}", False, "a", "b")
    with pytest.raises(store.StoreUnavailable):
        store.check_instance_images(nowhere, "s3://bucket/subjects/rex")


def test_a_passed_check_is_reused_for_a_burst_and_then_listed_again(minio_server: Any, bucket: str, creds: store.Credentials,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    put(minio_server, bucket, "subjects/burst/0.png", PNG)
    assert store.check_instance_images(creds, f"s3://{bucket}/subjects/burst") == 1
    put(minio_server, bucket, "subjects/burst/1.png", PNG)
    assert store.check_instance_images(creds, f"s3://{bucket}/subjects/burst") == 1, "reused within the window"
    monkeypatch.setattr(store, "LISTING_REUSE_SECONDS", 0.0)
    assert store.check_instance_images(creds, f"s3://{bucket}/subjects/burst") == 2


def test_a_burst_of_checks_on_one_subject_lists_it_once(minio_server: Any, bucket: str, creds: store.Credentials,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    put(minio_server, bucket, "subjects/herd/0.png", PNG)
    listings: list[str] = []
    real = store._check_instance_images

    def counted(c: store.Credentials, uri: str) -> int:
        listings.append(uri)
        return real(c, uri)

    monkeypatch.setattr(store, "_check_instance_images", counted)
    threads = [threading.Thread(target=store.check_instance_images, args=(creds, f"s3://{bucket}/subjects/herd")) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(listings) == 1, "callers arriving while a check runs wait for it instead of listing again"
