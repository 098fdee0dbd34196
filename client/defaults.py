"""Where a job's data goes: the installation's storage defaults, read from the cluster, or flags.

The Helm chart publishes the same values it gives the operator's environment in a ConfigMap
(`dreambooth-defaults`, label `dreambooth.dev/installation-defaults=true`, in the release's
namespace) that every authenticated user may read. Its keys are the operator's env var names, plus
`DREAMBOOTH_STORAGE_CLIENT_ENDPOINT` for clients outside the cluster when the in-cluster address
is not reachable from there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from .errors import AccessDenied, ClientError, NoStorageDefaults
from .kube import KubeApi

DEFAULTS_CONFIGMAP = "dreambooth-defaults"
DEFAULTS_LABEL = "dreambooth.dev/installation-defaults"
# Looked at when the user may not list ConfigMaps cluster-wide (the docs' install namespace).
CONVENTIONAL_NAMESPACES = ("dreambooth-system",)
INSTALLATION_NAMESPACE_ENV = "DREAMBOOTH_INSTALLATION_NAMESPACE"


@dataclass(frozen=True)
class StorageSettings:
    """The bucket a job uses: `endpoint` as pods reach it, `client_endpoint` as this machine does."""

    endpoint: str
    bucket: str
    credentials_secret: str
    secure: bool = False
    client_endpoint: str = ""
    client_secure: bool | None = None
    region: str | None = None
    source: str = "flags"

    @property
    def upload_endpoint(self) -> str:
        return self.client_endpoint or self.endpoint

    @property
    def upload_secure(self) -> bool:
        return self.secure if self.client_secure is None else self.client_secure

    def spec(self) -> dict[str, Any]:
        """The job's `spec.storage` (camelCase)."""
        storage: dict[str, Any] = {"endpoint": self.endpoint, "bucket": self.bucket, "secure": self.secure,
                                   "credentialsSecretRef": {"name": self.credentials_secret}}
        if self.region:
            storage["region"] = self.region
        return storage


@dataclass(frozen=True)
class StorageFlags:
    """What the user gave on the command line (or to `Client.submit`); None means 'the default'."""

    endpoint: str | None = None
    bucket: str | None = None
    credentials_secret: str | None = None
    secure: bool | None = None
    client_endpoint: str | None = None


def settings_from_configmap(configmap: dict[str, Any]) -> StorageSettings | None:
    """The storage the installation defaults to, or None when it has none (endpoint or bucket empty)."""
    data = configmap.get("data") or {}
    endpoint, bucket = data.get("DREAMBOOTH_STORAGE_ENDPOINT", ""), data.get("DREAMBOOTH_STORAGE_BUCKET", "")
    if not endpoint or not bucket:
        return None
    client_secure = data.get("DREAMBOOTH_STORAGE_CLIENT_SECURE", "")
    meta = configmap.get("metadata") or {}
    return StorageSettings(
        endpoint=endpoint, bucket=bucket,
        credentials_secret=data.get("DREAMBOOTH_STORAGE_CREDENTIALS_SECRET") or "dreambooth-s3",
        secure=_true(data.get("DREAMBOOTH_STORAGE_SECURE", "")),
        client_endpoint=data.get("DREAMBOOTH_STORAGE_CLIENT_ENDPOINT", ""),
        client_secure=_true(client_secure) if client_secure else None,
        source=f"ConfigMap {meta.get('namespace')}/{meta.get('name')}",
    )


def _true(text: str) -> bool:
    return text.strip().lower() == "true"


def find_defaults_configmap(kube: KubeApi, namespace: str | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """(the installation's defaults ConfigMap or None, where it was looked for)."""
    namespace = namespace or os.environ.get(INSTALLATION_NAMESPACE_ENV)
    if namespace:
        return kube.get_configmap(namespace, DEFAULTS_CONFIGMAP), [namespace]
    try:
        found = kube.list_configmaps(f"{DEFAULTS_LABEL}=true")
    except AccessDenied:
        found = None
    if found is not None:
        found = [cm for cm in found if cm["metadata"]["name"] == DEFAULTS_CONFIGMAP]
        if len(found) > 1:
            where = ", ".join(sorted(cm["metadata"]["namespace"] for cm in found))
            raise ClientError(f"several installations publish defaults (namespaces {where}); "
                              "pass --installation-namespace")
        return (found[0] if found else None), ["all namespaces"]
    for candidate in CONVENTIONAL_NAMESPACES:
        try:
            configmap = kube.get_configmap(candidate, DEFAULTS_CONFIGMAP)
        except AccessDenied:
            continue
        if configmap is not None:
            return configmap, [candidate]
    return None, list(CONVENTIONAL_NAMESPACES)


def resolve_storage(flags: StorageFlags, kube: KubeApi | None, installation_namespace: str | None = None) -> StorageSettings:
    """Flags win field by field over the installation's defaults; NoStorageDefaults when neither says
    where the data goes."""
    if flags.endpoint and flags.bucket:
        base = StorageSettings(endpoint=flags.endpoint, bucket=flags.bucket,
                               credentials_secret=flags.credentials_secret or "dreambooth-s3")
    else:
        if kube is None:
            raise NoStorageDefaults("no storage given: pass --storage-endpoint and --bucket")
        configmap, searched = find_defaults_configmap(kube, installation_namespace)
        if configmap is None:
            raise NoStorageDefaults(
                f"no storage defaults installed: no ConfigMap {DEFAULTS_CONFIGMAP} (label {DEFAULTS_LABEL}=true) "
                f"in {', '.join(searched)}; install the chart with defaults.storage.endpoint and .bucket "
                "(or minio.enabled), or pass --storage-endpoint and --bucket")
        settings = settings_from_configmap(configmap)
        if settings is None:
            meta = configmap["metadata"]
            raise NoStorageDefaults(
                f"no storage defaults installed: ConfigMap {meta['namespace']}/{meta['name']} has no storage endpoint "
                "or bucket (the chart's defaults.storage is empty); pass --storage-endpoint and --bucket")
        base = settings
    return replace(
        base,
        endpoint=flags.endpoint or base.endpoint,
        bucket=flags.bucket or base.bucket,
        credentials_secret=flags.credentials_secret or base.credentials_secret,
        secure=base.secure if flags.secure is None else flags.secure,
        client_endpoint=flags.client_endpoint or (base.client_endpoint if not flags.endpoint else ""),
    )
