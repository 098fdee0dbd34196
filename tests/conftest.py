"""Shared fixtures. Product code is imported from the installed packages, never this folder."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.minio_server import MinioServer, start_minio


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """One real MinIO server per test session, random credentials, free loopback port."""
    root = tmp_path_factory.mktemp("minio")
    server = start_minio(root / "data", log_path=root / "minio.log")
    yield server
    server.stop()


@pytest.fixture()
def s3_env(minio_server: MinioServer, monkeypatch: pytest.MonkeyPatch) -> MinioServer:
    """Point the storage env contract at the test MinIO for this test."""
    for key, value in minio_server.env().items():
        monkeypatch.setenv(key, value)
    return minio_server


@pytest.fixture()
def bucket(s3_env: MinioServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket named after the test."""
    from minio import Minio

    client = Minio(s3_env.endpoint, s3_env.access_key, s3_env.secret_key, secure=False)
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{os.getpid() % 10000}"
    if not client.bucket_exists(name):
        client.make_bucket(name)
    return name


@pytest.fixture(autouse=True)
def _small_torch_threads() -> None:
    """One thread: the suites share two cores with the test bed's pods, and tiny models gain nothing from a second (test_training: 108 CPU-s at one thread, 134 at two, the same wall clock)."""
    import torch

    torch.set_num_threads(1)
