"""Storage settings: the chart's published defaults, overridden field by field by flags."""
from __future__ import annotations

import pytest

from dreambooth_client.defaults import StorageFlags, StorageSettings, resolve_storage, settings_from_configmap
from dreambooth_client.errors import NoStorageDefaults

CONFIGMAP = {
    "metadata": {"name": "dreambooth-defaults", "namespace": "dreambooth-system"},
    "data": {"DREAMBOOTH_STORAGE_ENDPOINT": "minio.storage.svc:9000", "DREAMBOOTH_STORAGE_BUCKET": "dreambooth",
             "DREAMBOOTH_STORAGE_SECURE": "false", "DREAMBOOTH_STORAGE_CREDENTIALS_SECRET": "team-s3",
             "DREAMBOOTH_STORAGE_CLIENT_ENDPOINT": "minio.example.org:443", "DREAMBOOTH_TRAINER_IMAGE": "x/trainer:1"},
}


def test_the_published_defaults() -> None:
    settings = settings_from_configmap(CONFIGMAP)
    assert settings == StorageSettings(endpoint="minio.storage.svc:9000", bucket="dreambooth", credentials_secret="team-s3",
                                       secure=False, client_endpoint="minio.example.org:443",
                                       source="ConfigMap dreambooth-system/dreambooth-defaults")
    assert settings.upload_endpoint == "minio.example.org:443"
    assert settings.spec() == {"endpoint": "minio.storage.svc:9000", "bucket": "dreambooth", "secure": False,
                               "credentialsSecretRef": {"name": "team-s3"}}


def test_an_installation_without_storage_publishes_none() -> None:
    assert settings_from_configmap({"data": {"DREAMBOOTH_STORAGE_ENDPOINT": "", "DREAMBOOTH_STORAGE_BUCKET": ""}}) is None


def test_flags_alone_need_no_cluster() -> None:
    settings = resolve_storage(StorageFlags(endpoint="10.0.0.5:9000", bucket="mine", secure=True), kube=None)
    assert (settings.endpoint, settings.bucket, settings.secure, settings.credentials_secret) == ("10.0.0.5:9000", "mine", True, "dreambooth-s3")
    assert settings.upload_endpoint == "10.0.0.5:9000"
    with pytest.raises(NoStorageDefaults, match="pass --storage-endpoint and --bucket"):
        resolve_storage(StorageFlags(bucket="mine"), kube=None)
