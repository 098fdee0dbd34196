"""Downloads never write outside their folder, whatever keys the bucket holds (S3 and Ceph accept
`..` in object keys; MinIO does not, so the store here is a stand-in that lists what it is given)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dreambooth_client.sdk import Job
from dreambooth_client.storage import JobStorage, UnsafeObjectKey

URI = "s3://bucket/jobs/team-a/rex/uid"


@dataclass
class Listed:
    object_name: str


class KeysStore:
    """The few MinIO client calls downloads make, over a dict of key -> bytes."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def list_objects(self, bucket: str, prefix: str = "", recursive: bool = False) -> list[Listed]:
        return [Listed(key) for key in self.objects if key.startswith(prefix)]

    def fget_object(self, bucket: str, key: str, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(self.objects[key])


def storage(*keys: str) -> JobStorage:
    return JobStorage(KeysStore({f"jobs/team-a/rex/uid/{key}": b"x" for key in keys}), "s3.example.org")


ESCAPING_KEYS = ["final/../../../../escaped.txt", "final/lora/../../../escaped.txt", "final//../../escaped.txt",
                 "final/./x.bin", "final/a\\..\\..\\escaped.txt"]


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_download_tree_refuses_keys_that_leave_the_folder(tmp_path: Path, key: str) -> None:
    folder = tmp_path / "deep" / "model"
    with pytest.raises(UnsafeObjectKey, match="outside"):
        storage("final/model_index.json", key).download_tree(URI, "final", folder)
    assert not list(tmp_path.rglob("*.*")), "nothing downloaded, inside or out"


def test_download_tree_keeps_the_tree_under_the_folder(tmp_path: Path) -> None:
    paths = storage("final/model_index.json", "final/unet/weights.safetensors").download_tree(URI, "final", tmp_path / "m")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == ["m/model_index.json", "m/unet/weights.safetensors"]


class StubClient:
    def __init__(self, store: JobStorage) -> None:
        self.store = store

    def job_storage_settings(self, body: dict) -> None:
        raise AssertionError("the stub's storage is given")


def test_samples_refuse_keys_that_leave_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth_client.status import JobStatus

    job = Job(StubClient(None), "rex", "team-a", storage("samples/step-1.png", "samples/../../../../escaped.png"))  # type: ignore[arg-type]
    monkeypatch.setattr(Job, "status", property(lambda self: JobStatus("rex", "team-a", output_uri=URI)))
    with pytest.raises(UnsafeObjectKey, match="escaped.png"):
        job.samples(tmp_path / "out" / "samples")
    assert not list(tmp_path.rglob("*.png"))
