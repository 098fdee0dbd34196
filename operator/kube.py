"""The one module that talks to the Kubernetes API (besides kopf's own watching and events).

Everything here is idempotent: create-if-absent, delete-if-present, patch-to-desired; and it only
ever changes or deletes objects this job controls (owner reference with `controller: true`), never
adopts one it finds. Every call has a timeout. Objects are plain API dicts (camelCase, as
`kubectl get -o json` shows them).
"""
from __future__ import annotations

import base64
import json
import os
import threading
from typing import Any

from dreambooth_api.v1alpha1.spec import GROUP, PLURAL, VERSION

from . import builders, metrics

_lock = threading.Lock()
_api_client: Any = None
# (connect, read) seconds for every call: a hung API server must not hold a worker.
REQUEST_TIMEOUT = (float(os.environ.get("DREAMBOOTH_API_CONNECT_TIMEOUT", "5")),
                   float(os.environ.get("DREAMBOOTH_API_READ_TIMEOUT", "20")))


class KubeError(RuntimeError):
    """The API could not do it now (network, 5xx, 409 on a write): retry later."""


class KubeRejected(KubeError):
    """The API refused the object for good (422/400): the message names the field."""


class Conflict(KubeError):
    """A precondition (resourceVersion) failed: someone changed the object since it was read."""


class NotOwned(RuntimeError):
    """An object this job would create exists and is not controlled by it (nothing was changed)."""

    def __init__(self, kind: str, namespace: str, name: str, owner: str) -> None:
        self.kind, self.namespace, self.name = kind, namespace, name
        super().__init__(f"{kind} {namespace}/{name} already exists and is {owner}, not this DreamboothJob's: "
                         "nothing was created or changed; rename or delete it and the job goes on")


def client() -> Any:
    """In-cluster config when running in a pod, else the kubeconfig (KUBECONFIG); made once."""
    global _api_client
    with _lock:
        if _api_client is None:
            from kubernetes import client as k8s_client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            configuration = k8s_client.Configuration.get_default_copy()
            # One pool per worker thread and watcher, so no call waits for a free connection.
            configuration.connection_pool_maxsize = 32
            _api_client = k8s_client.ApiClient(configuration)
        return _api_client


def request(
    method: str,
    path: str,
    body: Any = None,
    query: dict[str, str] | None = None,
    content_type: str = "application/json",
    missing_ok: bool = False,
    conflict_ok: bool = False,
    timeout: tuple[float, float] | float = REQUEST_TIMEOUT,
) -> dict[str, Any] | None:
    """One API call with a plain-dict body; None for 404 (missing_ok) or 409 (conflict_ok)."""
    api = client()
    metrics.API_REQUESTS.labels(verb=method).inc()
    params = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    try:
        response = api.call_api(*params, _request_timeout=timeout)
        response.read()
    except Exception as error:  # urllib3 timeouts and connection errors
        raise KubeError(f"{method} {path}: {type(error).__name__}: {error}") from None
    if response.status == 404 and missing_ok:
        return None
    if response.status == 409 and conflict_ok:
        return None
    if not 200 <= response.status < 300:
        text = response.data.decode(errors="replace")[:800]
        if response.status == 409:
            raise Conflict(f"{method} {path}: {response.status} {text}")
        if response.status in (400, 422):
            raise KubeRejected(_api_message(text))
        raise KubeError(f"{method} {path}: {response.status} {text}")
    return json.loads(response.data) if response.data else {}


def _api_message(text: str) -> str:
    try:
        return str(json.loads(text).get("message") or text)
    except (ValueError, AttributeError):
        return text


def ns_path(api_version: str, namespace: str, plural: str, name: str = "") -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def cluster_path(api_version: str, plural: str, name: str = "") -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/{plural}/{name}" if name else f"{prefix}/{plural}"


def selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


# --- reads ------------------------------------------------------------------------------


def read_dreamboothjob(namespace: str, name: str) -> dict[str, Any] | None:
    return request("GET", ns_path(f"{GROUP}/{VERSION}", namespace, PLURAL, name), missing_ok=True)


def list_dreamboothjobs(namespace: str | None = None) -> list[dict[str, Any]]:
    path = ns_path(f"{GROUP}/{VERSION}", namespace, PLURAL) if namespace else cluster_path(f"{GROUP}/{VERSION}", PLURAL)
    return list((request("GET", path) or {}).get("items") or [])


class SecretValueUnreadable(ValueError):
    """A key the job names holds bytes that are not text (the message names the key, never the value)."""


def read_secret_data(namespace: str, name: str, keys: tuple[str, ...]) -> dict[str, str] | None:
    """The named keys of a Secret, decoded; None when the Secret does not exist."""
    secret = request("GET", ns_path("v1", namespace, "secrets", name), missing_ok=True)
    return None if secret is None else decode_secret_keys(secret, keys)


def decode_secret_keys(secret: dict[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    """Only the keys asked for: any other key may hold anything (a ca.p12, a keytab) and is never
    decoded. A named key that is not UTF-8 text raises SecretValueUnreadable."""
    data = secret.get("data") or {}
    decoded: dict[str, str] = {}
    for key in keys:
        if key in (secret.get("stringData") or {}):
            decoded[key] = secret["stringData"][key]
        elif key in data:
            try:
                decoded[key] = base64.b64decode(data[key]).decode()
            except (ValueError, UnicodeDecodeError):
                raise SecretValueUnreadable(f"Secret {secret.get('metadata', {}).get('name', '')} key {key!r} is not text (UTF-8)") from None
    return decoded


def list_trainer_pods(namespace: str, job_name: str) -> list[dict[str, Any]]:
    found = request("GET", ns_path("v1", namespace, "pods"),
                    query={"labelSelector": selector(builders.selector_labels(job_name, "trainer"))})
    return list((found or {}).get("items") or [])


def node_ready(name: str) -> bool | None:
    """True/False from the Node's Ready condition; False when the Node is gone; None if unreadable."""
    try:
        node = request("GET", cluster_path("v1", "nodes", name), missing_ok=True)
    except KubeError:
        return None  # e.g. a namespaced install, which may not read nodes
    if node is None:
        return False
    ready = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    return ready is not None and ready.get("status") == "True"


def serves(api_version: str, plural: str) -> bool | None:
    """Whether the API server serves `plural` in `api_version` (discovery); None when it cannot tell."""
    try:
        found = request("GET", f"/apis/{api_version}", missing_ok=True)
    except Exception:  # discovery failing (or no cluster configured) must not stop a gang: unknown
        return None
    return found is not None and any(r.get("name") == plural for r in found.get("resources") or [])


def latest_event_message(namespace: str, uid: str, reason: str) -> str:
    """The newest Event of `reason` about the object `uid` (e.g. a Job's FailedCreate: why the Job
    controller could not make a pod), or ""."""
    found = request("GET", ns_path("v1", namespace, "events"),
                    query={"fieldSelector": f"involvedObject.uid={uid},reason={reason}", "limit": "50"})
    items = (found or {}).get("items") or []
    newest = max(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "", default=None)
    return str((newest or {}).get("message") or "")


# --- writes -----------------------------------------------------------------------------

_PLURALS = {"ConfigMap": "configmaps", "Service": "services", "Job": "jobs", "Deployment": "deployments",
            "NetworkPolicy": "networkpolicies", "PodGroup": "podgroups"}
# Brought to the manifest when they exist: replaced whole (an edit that removes an env var or a
# volume removes it), or, for a Service (whose clusterIP is the server's), merged.
# A Job's pod template is immutable: an existing one is left as it is.
_REPLACED = {"ConfigMap", "Deployment", "NetworkPolicy"}
_MERGED = {"Service"}


def _controller_of(obj: dict[str, Any]) -> str:
    refs = [r for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("controller")]
    return f"controlled by {refs[0].get('kind')} {refs[0].get('name')}" if refs else "not controlled by anything"


def ensure(manifest: dict[str, Any], owner_uid: str) -> bool:
    """Create the object, or bring an existing one this job controls to the manifest; never adopt.

    True when it was created. NotOwned when the name is taken by an object it does not control."""
    kind, api_version = manifest["kind"], manifest["apiVersion"]
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    created = request("POST", ns_path(api_version, namespace, _PLURALS[kind]), body=manifest, conflict_ok=True)
    if created is not None:
        return True
    existing = request("GET", ns_path(api_version, namespace, _PLURALS[kind], name), missing_ok=True)
    if existing is None:
        raise KubeError(f"{kind} {namespace}/{name} was being deleted; it is created again next time")
    from .lifecycle import owned_by

    if not owned_by(existing, owner_uid):
        raise NotOwned(kind, namespace, name, _controller_of(existing))
    if existing["metadata"].get("deletionTimestamp"):
        raise KubeError(f"{kind} {namespace}/{name} is being deleted; it is created again next time")
    body = dict(manifest)
    body["metadata"] = {**manifest["metadata"], "resourceVersion": existing["metadata"]["resourceVersion"]}
    path = ns_path(api_version, namespace, _PLURALS[kind], name)
    if kind in _REPLACED:
        request("PUT", path, body=body)
    elif kind in _MERGED:
        request("PATCH", path, body=body, content_type="application/strategic-merge-patch+json")
    return False


def delete_owned(api_version: str, kind: str, namespace: str, name: str, owner_uid: str) -> bool:
    """Delete an object only if this job controls it (uid precondition: never a same-named stranger)."""
    path = ns_path(api_version, namespace, _PLURALS[kind], name)
    existing = request("GET", path, missing_ok=True)
    if existing is None:
        return False
    from .lifecycle import owned_by

    if not owned_by(existing, owner_uid):
        return False
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background",
            "preconditions": {"uid": existing["metadata"]["uid"]}}
    return request("DELETE", path, body=body, missing_ok=True, conflict_ok=True) is not None


def delete_job(namespace: str, name: str, owner_uid: str) -> bool:
    """Delete a trainer Job and (in the background) its pods. False when it was already gone."""
    return delete_owned("batch/v1", "Job", namespace, name, owner_uid)


def force_delete_pod(namespace: str, name: str) -> None:
    """Grace period 0: for a pod whose node is gone (its kubelet will never confirm the deletion)."""
    request("DELETE", ns_path("v1", namespace, "pods", name),
            body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}, missing_ok=True)


def set_job_suspended(namespace: str, name: str, suspended: bool) -> None:
    request(
        "PATCH", ns_path("batch/v1", namespace, "jobs", name), body={"spec": {"suspend": suspended}},
        content_type="application/merge-patch+json", missing_ok=True,
    )


def delete_serving(namespace: str, name: str, owner_uid: str) -> None:
    delete_owned("apps/v1", "Deployment", namespace, name, owner_uid)
    delete_owned("v1", "Service", namespace, name, owner_uid)


def set_finalizers(job: dict[str, Any], finalizers: list[str]) -> None:
    """Replace a DreamboothJob's finalizers, only if it is still the version read (Conflict if not)."""
    meta = job["metadata"]
    request("PATCH", ns_path(f"{GROUP}/{VERSION}", meta["namespace"], PLURAL, meta["name"]),
            body={"metadata": {"finalizers": finalizers, "resourceVersion": meta.get("resourceVersion")}},
            content_type="application/merge-patch+json", missing_ok=True)


def delete_dreamboothjob(namespace: str, name: str, uid: str) -> None:
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}}
    request("DELETE", ns_path(f"{GROUP}/{VERSION}", namespace, PLURAL, name), body=body, missing_ok=True, conflict_ok=True)


def patch_status(namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None) -> dict[str, Any] | None:
    """JSON merge patch of the status subresource (None deletes a field); the patched object, or
    None when the job is gone. With `resource_version`, Conflict if the job changed since."""
    body: dict[str, Any] = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    return request(
        "PATCH", ns_path(f"{GROUP}/{VERSION}", namespace, PLURAL, name) + "/status", body=body,
        content_type="application/merge-patch+json", missing_ok=True,
    )


def create_event(involved: dict[str, Any], event_type: str, reason: str, message: str, component: str, instance: str,
                 now: str) -> None:
    """A core/v1 Event about a DreamboothJob (what `kubectl describe dbj` shows)."""
    meta = involved["metadata"]
    body = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": involved.get("apiVersion", f"{GROUP}/{VERSION}"), "kind": involved.get("kind", "DreamboothJob"),
                           "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid", "")},
        "type": event_type, "reason": reason, "message": message[:1024],
        "source": {"component": component}, "reportingComponent": component, "reportingInstance": instance,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
    request("POST", ns_path("v1", meta["namespace"], "events"), body=body)


# --- objects read and replaced whole (optimistic concurrency) --------------------------------


def read_object(api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    return request("GET", ns_path(api_version, namespace, _PLURALS[kind], name), missing_ok=True)


def create_object(manifest: dict[str, Any]) -> dict[str, Any]:
    """Create; Conflict when an object of that name exists already."""
    namespace = manifest["metadata"]["namespace"]
    created = request("POST", ns_path(manifest["apiVersion"], namespace, _PLURALS[manifest["kind"]]), body=manifest, conflict_ok=True)
    if created is None:
        raise Conflict(f"{manifest['kind']} {namespace}/{manifest['metadata']['name']} exists already")
    return created


def replace_object(manifest: dict[str, Any]) -> dict[str, Any]:
    """PUT with the resourceVersion it was read at; Conflict when it changed or is gone since."""
    meta = manifest["metadata"]
    path = ns_path(manifest["apiVersion"], meta["namespace"], _PLURALS[manifest["kind"]], meta["name"])
    replaced = request("PUT", path, body=manifest, conflict_ok=True, missing_ok=True)
    if replaced is None:
        raise Conflict(f"{manifest['kind']} {meta['namespace']}/{meta['name']} changed since it was read")
    return replaced


def delete_object(api_version: str, kind: str, namespace: str, name: str, resource_version: str | None = None) -> None:
    """Delete (dependents follow in the background); nothing when it is gone already. With
    `resource_version`: only that version of it, else Conflict."""
    options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
    if resource_version:
        options["preconditions"] = {"resourceVersion": resource_version}
    found = request("DELETE", ns_path(api_version, namespace, _PLURALS[kind], name), body=options, missing_ok=True, conflict_ok=True)
    if found is None and resource_version and read_object(api_version, kind, namespace, name) is not None:
        raise Conflict(f"{kind} {namespace}/{name} changed since it was read")


def read_deployment(namespace: str, name: str) -> dict[str, Any] | None:
    return read_object("apps/v1", "Deployment", namespace, name)


# --- asking a server ------------------------------------------------------------------------


def read_secret_key(namespace: str, name: str, key: str) -> str | None:
    """One key of a Secret as text, no other key decoded; None when the Secret or the key is missing."""
    secret = request("GET", ns_path("v1", namespace, "secrets", name), missing_ok=True) or {}
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    value = (secret.get("data") or {}).get(key)
    return base64.b64decode(value).decode(errors="replace") if value else None


def list_pods(namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    found = request("GET", ns_path("v1", namespace, "pods"), query={"labelSelector": selector(labels)})
    return list((found or {}).get("items") or [])


def pod_get_status(namespace: str, pod: str, port: int, path: str, headers: dict[str, str], timeout: float = 5.0) -> int:
    """The HTTP status a pod answers to GET `path`, through the API server's pod proxy; 0 when none came."""
    api = client()
    params = api.param_serialize(method="GET", resource_path=ns_path("v1", namespace, "pods", f"{pod}:{port}") + "/proxy" + path,
                                 header_params={"Accept": "application/json", **headers}, auth_settings=["BearerToken"])
    try:
        response = api.call_api(*params, _request_timeout=timeout)
        response.read()
    except Exception:  # urllib3 timeouts and connection errors: no answer
        return 0
    return int(response.status)
