"""The one module that talks to the Kubernetes API (besides kopf's own watching and events).

Everything here is idempotent: create-if-absent, delete-if-present, patch-to-desired. Objects
are returned as plain API dicts (camelCase, as `kubectl get -o json` shows them).
"""
from __future__ import annotations

import base64
import json
import threading
from typing import Any

from dreambooth_trainer.spec import GROUP, PLURAL, VERSION

from . import builders

_lock = threading.Lock()
_api_client: Any = None


class KubeError(RuntimeError):
    pass


def _client() -> Any:
    """In-cluster config when running in a pod, else the kubeconfig (KUBECONFIG); made once."""
    global _api_client
    with _lock:
        if _api_client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _api_client = client.ApiClient()
        return _api_client


def _request(
    method: str,
    path: str,
    body: Any = None,
    query: dict[str, str] | None = None,
    content_type: str = "application/json",
    missing_ok: bool = False,
    conflict_ok: bool = False,
) -> dict[str, Any] | None:
    """One API call with a plain-dict body; None for 404 (missing_ok) or 409 (conflict_ok)."""
    api = _client()
    params = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*params)
    response.read()
    if response.status == 404 and missing_ok:
        return None
    if response.status == 409 and conflict_ok:
        return None
    if not 200 <= response.status < 300:
        raise KubeError(f"{method} {path}: {response.status} {response.data.decode(errors='replace')[:500]}")
    return json.loads(response.data) if response.data else {}


def _ns_path(api_version: str, namespace: str, plural: str, name: str = "") -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


# --- reads ------------------------------------------------------------------------------


def read_dreamboothjob(namespace: str, name: str) -> dict[str, Any] | None:
    return _request("GET", _ns_path(f"{GROUP}/{VERSION}", namespace, PLURAL, name), missing_ok=True)


def read_secret_data(namespace: str, name: str) -> dict[str, str] | None:
    secret = _request("GET", _ns_path("v1", namespace, "secrets", name), missing_ok=True)
    if secret is None:
        return None
    data = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def read_job(namespace: str, name: str) -> dict[str, Any] | None:
    return _request("GET", _ns_path("batch/v1", namespace, "jobs", name), missing_ok=True)


def list_trainer_jobs(namespace: str, job_name: str) -> list[dict[str, Any]]:
    selector = _selector(builders.selector_labels(job_name, "trainer"))
    found = _request("GET", _ns_path("batch/v1", namespace, "jobs"), query={"labelSelector": selector})
    return list((found or {}).get("items") or [])


def list_trainer_pods(namespace: str, job_name: str) -> list[dict[str, Any]]:
    selector = _selector(builders.selector_labels(job_name, "trainer"))
    found = _request("GET", _ns_path("v1", namespace, "pods"), query={"labelSelector": selector})
    return list((found or {}).get("items") or [])


def read_deployment(namespace: str, name: str) -> dict[str, Any] | None:
    return _request("GET", _ns_path("apps/v1", namespace, "deployments", name), missing_ok=True)


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


# --- writes -----------------------------------------------------------------------------

_PLURALS = {"ConfigMap": "configmaps", "Service": "services", "Job": "jobs", "Deployment": "deployments",
            "NetworkPolicy": "networkpolicies"}
# A Job's pod template is immutable: an existing one is left as it is.
_PATCHABLE = {"ConfigMap", "Service", "Deployment", "NetworkPolicy"}


def ensure(manifest: dict[str, Any]) -> bool:
    """Create the object, or bring an existing one to the manifest. True when it was created."""
    kind, api_version = manifest["kind"], manifest["apiVersion"]
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    created = _request("POST", _ns_path(api_version, namespace, _PLURALS[kind]), body=manifest, conflict_ok=True)
    if created is None and kind in _PATCHABLE:
        _request(
            "PATCH", _ns_path(api_version, namespace, _PLURALS[kind], name), body=manifest,
            content_type="application/strategic-merge-patch+json",
        )
    return created is not None


def delete_job(namespace: str, name: str) -> bool:
    """Delete a trainer Job and (in the background) its pods. False when it was already gone."""
    gone = _request(
        "DELETE", _ns_path("batch/v1", namespace, "jobs", name),
        body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}, missing_ok=True,
    )
    return gone is not None


def set_job_suspended(namespace: str, name: str, suspended: bool) -> None:
    _request(
        "PATCH", _ns_path("batch/v1", namespace, "jobs", name), body={"spec": {"suspend": suspended}},
        content_type="application/merge-patch+json", missing_ok=True,
    )


def delete_serving(namespace: str, name: str) -> None:
    _request("DELETE", _ns_path("apps/v1", namespace, "deployments", name), missing_ok=True)
    _request("DELETE", _ns_path("v1", namespace, "services", name), missing_ok=True)


def delete_dreamboothjob(namespace: str, name: str) -> None:
    _request("DELETE", _ns_path(f"{GROUP}/{VERSION}", namespace, PLURAL, name), missing_ok=True)


def patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """JSON merge patch of the status subresource (None deletes a field); a deleted job is left alone."""
    _request(
        "PATCH", _ns_path(f"{GROUP}/{VERSION}", namespace, PLURAL, name) + "/status", body={"status": status},
        content_type="application/merge-patch+json", missing_ok=True,
    )


# --- objects read and replaced whole (optimistic concurrency) --------------------------------


class Conflict(KubeError):
    """The object changed (or appeared) since it was read: read it again and retry."""


def read_object(api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    return _request("GET", _ns_path(api_version, namespace, _PLURALS[kind], name), missing_ok=True)


def create_object(manifest: dict[str, Any]) -> dict[str, Any]:
    """Create; Conflict when an object of that name exists already."""
    namespace = manifest["metadata"]["namespace"]
    created = _request("POST", _ns_path(manifest["apiVersion"], namespace, _PLURALS[manifest["kind"]]), body=manifest, conflict_ok=True)
    if created is None:
        raise Conflict(f"{manifest['kind']} {namespace}/{manifest['metadata']['name']} exists already")
    return created


def replace_object(manifest: dict[str, Any]) -> dict[str, Any]:
    """PUT with the resourceVersion it was read at; Conflict when it changed or is gone since."""
    meta = manifest["metadata"]
    path = _ns_path(manifest["apiVersion"], meta["namespace"], _PLURALS[manifest["kind"]], meta["name"])
    replaced = _request("PUT", path, body=manifest, conflict_ok=True, missing_ok=True)
    if replaced is None:
        raise Conflict(f"{manifest['kind']} {meta['namespace']}/{meta['name']} changed since it was read")
    return replaced


def delete_object(api_version: str, kind: str, namespace: str, name: str, resource_version: str | None = None) -> None:
    """Delete (dependents follow in the background); nothing when it is gone already. With
    `resource_version`: only that version of it, else Conflict."""
    options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
    if resource_version:
        options["preconditions"] = {"resourceVersion": resource_version}
    found = _request("DELETE", _ns_path(api_version, namespace, _PLURALS[kind], name), body=options, missing_ok=True, conflict_ok=True)
    if found is None and resource_version and read_object(api_version, kind, namespace, name) is not None:
        raise Conflict(f"{kind} {namespace}/{name} changed since it was read")
