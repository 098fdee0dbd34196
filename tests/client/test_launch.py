"""Submitting writes to storage before the API: a refused create leaves no photos behind (a real
MinIO; the API server is played by a fake that refuses)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dreambooth_client import Client, ClientError
from dreambooth_client.defaults import StorageSettings
from dreambooth_client.manifest import SubmitOptions, build_manifest
from dreambooth_client.photos import check_photos
from dreambooth_client.sdk import Submission
from tests.testbed.minio_server import MinioServer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-subject"


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
        assert storage.list(job_submission.photos_uri, "") == ["00-toy-0.png", "01-toy-1.png", "02-toy-2.png", "03-toy-3.png"]
