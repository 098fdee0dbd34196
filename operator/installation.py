"""The installation's defaults (the chart's images and storage), and their snapshot in a job's status.

The operator reads them from its environment (the one place it reads env for jobs). A job takes
the defaults as they are when it is accepted and keeps that snapshot (`status.installationDefaults`)
for the rest of its life, so a `helm upgrade` never changes the image, bucket or endpoint of a
job that already runs or ran.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dreambooth_api.v1alpha1.spec import with_operator_defaults

# status.installationDefaults key -> (operator env var, spec field it defaults)
FIELDS: dict[str, tuple[str, str]] = {
    "trainerImage": ("DREAMBOOTH_TRAINER_IMAGE", "resources.image"),
    "inferenceImage": ("DREAMBOOTH_INFERENCE_IMAGE", "serving.image"),
    "storageEndpoint": ("DREAMBOOTH_STORAGE_ENDPOINT", "storage.endpoint"),
    "storageBucket": ("DREAMBOOTH_STORAGE_BUCKET", "storage.bucket"),
    "storageSecure": ("DREAMBOOTH_STORAGE_SECURE", "storage.secure"),
    "storageCredentialsSecret": ("DREAMBOOTH_STORAGE_CREDENTIALS_SECRET", "storage.credentialsSecretRef"),
    "storageServingCredentialsSecret": ("DREAMBOOTH_STORAGE_SERVING_CREDENTIALS_SECRET", "storage.servingCredentialsSecretRef"),
}
# Defaults that name a Secret ({"name": ...} in the spec).
SECRET_FIELDS = ("storageCredentialsSecret", "storageServingCredentialsSecret")


def current(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The installation's defaults now, as a status snapshot (only those that are set)."""
    snapshot: dict[str, Any] = {}
    for key, (var, _) in FIELDS.items():
        value: Any = (environ.get(var) or "").strip()
        if key == "storageSecure":
            value = {"true": True, "false": False}.get(value.lower())
        if value not in ("", None):
            snapshot[key] = value
    return snapshot


def spec_defaults(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot as dotted spec paths -> values (what `with_operator_defaults` takes)."""
    defaults: dict[str, Any] = {}
    for key, (_, path) in FIELDS.items():
        value = snapshot.get(key)
        if value is None:
            continue
        defaults[path] = {"name": value} if key in SECRET_FIELDS else value
    return defaults


def spec_with_defaults(raw: dict[str, Any], snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The job's spec completed by the defaults; `secure` goes with the endpoint that is used, and
    the read-only serving Secret with the installation's read-write one."""
    defaults = spec_defaults(snapshot)
    storage = raw.get("storage") or {}
    if "endpoint" in storage:
        defaults.pop("storage.secure", None)
    if "credentialsSecretRef" in storage:
        defaults.pop("storage.servingCredentialsSecretRef", None)
    return with_operator_defaults(raw, defaults)


def for_job(status: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The snapshot an accepted job keeps; the current defaults for a job not yet accepted."""
    if status.get("acceptedGeneration") is not None and status.get("installationDefaults") is not None:
        return dict(status["installationDefaults"])
    return current(environ)
