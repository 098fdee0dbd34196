"""Every s3:// path against a real MinIO server (no S3 mocks), and the local twin."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dreambooth_trainer.data import list_images, read_images
from dreambooth_trainer.errors import UserInputError
from dreambooth_trainer.storage import LocalStorage, S3Storage, StorageError, open_storage, with_retries


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    bucket = request.getfixturevalue("bucket")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_write_read_list_exists_delete(storage) -> None:
    storage.write_text("a/one.txt", "1")
    storage.write_bytes("a/b/two.bin", b"\x00\x01")
    storage.write_text("top.json", "{}")
    assert storage.read_text("a/one.txt") == "1"
    assert storage.list() == ["a/b/two.bin", "a/one.txt", "top.json"]
    assert storage.list("a") == ["a/b/two.bin", "a/one.txt"]
    assert storage.exists("top.json") and not storage.exists("nope.json")
    storage.delete_prefix("a")
    assert storage.list() == ["top.json"]
    assert storage.child("x").describe().endswith("/x")


def test_missing_object_names_it(storage) -> None:
    with pytest.raises(StorageError, match=r"/missing\.txt does not exist"):
        storage.read_bytes("missing.txt")


def test_big_file_goes_up_as_a_parallel_multipart_upload(bucket: str, tmp_path: Path) -> None:
    storage = open_storage(f"s3://{bucket}/big")
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(40 * 1024 * 1024))  # 3 parts of 16 MiB
    storage.upload_file("weights.bin", source)
    stat = storage.client.stat_object(bucket, "big/weights.bin")
    assert stat.size == source.stat().st_size
    assert "-" in stat.etag.strip('"'), "a multipart upload has an etag of the form <md5>-<parts>"
    back = tmp_path / "back.bin"
    storage.download_file("weights.bin", back)
    assert back.read_bytes() == source.read_bytes()


def test_tree_round_trip(bucket: str, tmp_path: Path) -> None:
    folder = tmp_path / "tree"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text('{"a": 1}')
    storage = open_storage(f"s3://{bucket}/final")
    storage.upload_tree("", folder)
    restored = storage.download_tree("", tmp_path / "restored")
    assert (restored / "unet" / "config.json").read_text() == '{"a": 1}'


def test_bad_credentials_name_the_bucket(s3_env, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key")
    storage = open_storage(f"s3://{bucket}/x")
    with pytest.raises(StorageError, match=rf"bucket '{bucket}': credentials refused \(SignatureDoesNotMatch\)"):
        storage.list()
    assert "wrong-secret-key" not in str(storage.__dict__)


def test_missing_bucket_is_named(s3_env) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        open_storage("s3://no-such-bucket/photos").list()


def test_missing_endpoint_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    with pytest.raises(StorageError, match="needs AWS_ENDPOINT_URL"):
        open_storage("s3://bucket/photos")


def test_empty_prefix_and_corrupt_image_are_named(bucket: str) -> None:
    empty = open_storage(f"s3://{bucket}/nothing-here")
    with pytest.raises(UserInputError, match=rf"instance image prefix s3://{bucket}/nothing-here holds no images"):
        list_images(empty, "instance image")
    photos = open_storage(f"s3://{bucket}/dog")
    photos.write_bytes("3.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserInputError, match=rf"instance image s3://{bucket}/dog/3.jpg is not a readable image"):
        read_images(photos, list_images(photos, "instance image"), "instance image")


def test_transient_failures_are_retried_with_backoff() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert with_retries(flaky, "s3://b/k", attempts=4) == "ok"
    assert len(calls) == 3


def test_an_outage_longer_than_the_retries_names_the_object() -> None:
    def down() -> None:
        raise ConnectionRefusedError("refused")

    with pytest.raises(StorageError, match=r"s3://b/k: storage unreachable after 2 attempts"):
        with_retries(down, "s3://b/k", attempts=2)


def test_a_stopped_server_is_retried_until_it_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MinIO is down when the write starts and comes back during the backoff."""
    import threading

    from tests.testbed.minio_server import free_port, start_minio

    port = free_port()
    server = start_minio(tmp_path / "data", port=port)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    storage = S3Storage("outage", "")
    storage.ensure_bucket()
    server.stop()
    restarted = {}

    def restart() -> None:
        restarted["server"] = start_minio(tmp_path / "data", port=port, credentials=(server.access_key, server.secret_key))

    timer = threading.Timer(1.0, restart)
    timer.start()
    try:
        storage.write_text("after-outage.txt", "still here")
        assert storage.read_text("after-outage.txt") == "still here"
    finally:
        timer.join()
        restarted["server"].stop()
