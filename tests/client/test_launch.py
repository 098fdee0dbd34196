"""Submitting writes to storage before the API: a refused create, or Ctrl-C during the upload or
before the API server made the job, leaves no photos behind; a job the API server made keeps its
photos whatever happened to the answer (a real MinIO; the API server is played by a fake)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dreambooth_client import Client, ClientError
from dreambooth_client.defaults import StorageSettings
from dreambooth_client.errors import LaunchInterrupted
from dreambooth_client.manifest import SubmitOptions, build_manifest
from dreambooth_client.photos import check_photos
from dreambooth_client.sdk import Submission
from tests.testbed.minio_server import MinioServer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-subject"
PHOTO_KEYS = ["00-toy-0.png", "01-toy-1.png", "02-toy-2.png", "03-toy-3.png"]


class RefusingApi:
    """The API calls `Client.launch` makes: the Secret is there, the create is refused."""

    default_namespace = "team-a"

    def __init__(self, minio: MinioServer, refuse: bool) -> None:
        self.minio, self.refuse, self.created = minio, refuse, []

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.minio.access_key, "AWS_SECRET_ACCESS_KEY": self.minio.secret_key}

    def create_job(self, manifest: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        if self.refuse:
            raise ClientError("admission webhook denied the request")
        self.created.append(manifest)
        return manifest

    def find_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return next((m for m in self.created if (m["metadata"]["namespace"], m["metadata"]["name"]) == (namespace, name)), None)


class InterruptedApi(RefusingApi):
    """Ctrl-C while the create is under way: `made` says whether the API server made the job
    before the client stopped waiting; `other` is a job of the same name made by someone else."""

    def __init__(self, minio: MinioServer, made: bool, other: dict[str, Any] | None = None) -> None:
        super().__init__(minio, refuse=False)
        self.made, self.created = made, [other] if other else []

    def create_job(self, manifest: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        if self.made:
            self.created.append(manifest)
        raise KeyboardInterrupt


def submission(bucket: str, minio: MinioServer) -> Submission:
    settings = StorageSettings(endpoint=minio.endpoint, bucket=bucket, credentials_secret="s3")
    uri = f"s3://{bucket}/uploads/team-a/rex/abc"
    manifest = build_manifest(SubmitOptions(token="sks", class_name="toy", model="tiny"), "team-a", "rex", uri, settings.spec())
    return Submission(manifest, check_photos(EXAMPLE, 32), settings, uri)


@pytest.mark.parametrize("refuse", [False, True], ids=["created", "refused"])
def test_photos_go_up_and_come_down_again_when_the_create_fails(s3_env: MinioServer, bucket: str, refuse: bool) -> None:
    api = RefusingApi(s3_env, refuse)
    client = Client(api=api)  # type: ignore[arg-type]
    job_submission = submission(bucket, s3_env)
    storage = client.storage_for("team-a", job_submission.storage)
    if refuse:
        with pytest.raises(ClientError, match="admission webhook denied"):
            client.launch(job_submission)
        assert storage.list(job_submission.photos_uri, "") == []
    else:
        job = client.launch(job_submission)
        assert (job.name, job.namespace) == ("rex", "team-a") and api.created == [job_submission.manifest]
        assert storage.list(job_submission.photos_uri, "") == PHOTO_KEYS


def test_ctrl_c_during_the_upload_takes_the_photos_down(s3_env: MinioServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth_trainer.storage import S3Storage

    api = RefusingApi(s3_env, refuse=False)
    client = Client(api=api)  # type: ignore[arg-type]
    job_submission = submission(bucket, s3_env)
    upload, calls = S3Storage.upload_file, []

    def interrupted_at_the_third(self: S3Storage, key: str, path: Path) -> None:
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        upload(self, key, path)

    monkeypatch.setattr(S3Storage, "upload_file", interrupted_at_the_third)
    with pytest.raises(LaunchInterrupted) as stopped:
        client.launch(job_submission)
    monkeypatch.setattr(S3Storage, "upload_file", upload)
    assert stopped.value.created is False and api.created == []
    assert client.storage_for("team-a", job_submission.storage).list(job_submission.photos_uri, "") == [], "two photos went up, none stay"
    assert str(stopped.value) == f"interrupted: DreamboothJob team-a/rex was not created and the photos uploaded to {job_submission.photos_uri} were deleted"


@pytest.mark.parametrize("made", [True, False], ids=["made", "not-made"])
def test_ctrl_c_during_the_create_keeps_the_photos_only_of_a_job_that_exists(s3_env: MinioServer, bucket: str, made: bool,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dreambooth_client.sdk.CREATE_SETTLE_SECONDS", 0.01)
    job_submission = submission(bucket, s3_env)
    # A job of the same name from another submission (other photos) is not this one.
    other = {**job_submission.manifest, "metadata": {**job_submission.manifest["metadata"],
                                                      "annotations": {"dreambooth.dev/uploaded-photos": "s3://x/elsewhere"}}}
    client = Client(api=InterruptedApi(s3_env, made, None if made else other))  # type: ignore[arg-type]
    with pytest.raises(LaunchInterrupted) as stopped:
        client.launch(job_submission)
    assert stopped.value.created is made
    left = client.storage_for("team-a", job_submission.storage).list(job_submission.photos_uri, "")
    assert left == (PHOTO_KEYS if made else [])
    if made:
        assert "created DreamboothJob team-a/rex: it runs and keeps its photos" in str(stopped.value)
        assert "dreambooth jobs follow rex -n team-a" in str(stopped.value)


def test_submit_says_what_ctrl_c_left_and_exits_130(capsys: pytest.CaptureFixture[str]) -> None:
    from dreambooth_client import commands
    from dreambooth_client.defaults import StorageFlags

    class Interrupted:
        def prepare(self, *_: Any) -> Submission:
            return Submission({"metadata": {"name": "rex", "namespace": "team-a"}}, [], None, "s3://b/uploads/team-a/rex/1")  # type: ignore[arg-type]

        def launch(self, submission: Submission) -> None:
            raise LaunchInterrupted("team-a", "rex", submission.photos_uri, None)

    code = commands.submit(EXAMPLE, SubmitOptions(token="sks", class_name="toy"), client=Interrupted(), namespace="team-a",  # type: ignore[arg-type]
                           storage_flags=StorageFlags(), out=None, dry_run=False, detach=False, plain=True, image_prompt=None)
    assert code == 130
    assert capsys.readouterr().out == ("interrupted: whether DreamboothJob team-a/rex was created could not be checked; its photos "
                                       "stay at s3://b/uploads/team-a/rex/1 (see: dreambooth jobs list -n team-a)\n")
