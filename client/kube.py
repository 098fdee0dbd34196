"""The client's one door to the Kubernetes API (kubeconfig or in-cluster), with errors a user reads.

Objects come and go as plain API dicts (camelCase, as `kubectl get -o json` shows them). Every call
has a timeout, and an unreachable server is reported in one line instead of retried for minutes.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dreambooth_api.v1alpha1.spec import GROUP, KIND, PLURAL, VERSION

from .errors import AccessDenied, ClientError, ClusterUnreachable, NotFound, connection_reason

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
JOB_PATH = f"/apis/{GROUP}/{VERSION}"
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Percent-decoding rounds a path may go through on its way (client, API server, service).
DECODE_ROUNDS = 3


class UnsafeProxyPath(ClientError):
    """A path that could leave the service proxy (dot segments, an absolute URL, a backslash)."""


def service_proxy_path(path: str) -> str:
    """`path` (with its query) as sent to a Service through the API server's proxy, refused when
    any decoding of it holds a `.` or `..` segment: normalising those would leave the proxy prefix
    and reach any API path with the user's credentials."""
    if not path.startswith("/") or path.startswith("//"):
        raise UnsafeProxyPath(f"request path {path[:80]!r} is not a path on the server (it must start with one /)")
    route = urlsplit(path).path
    for _ in range(DECODE_ROUNDS):
        if "\\" in route or any(ord(char) < 0x20 for char in route):
            raise UnsafeProxyPath(f"request path {path[:80]!r} holds a backslash or a control character")
        if any(segment in (".", "..") for segment in route.split("/")):
            raise UnsafeProxyPath(f"request path {path[:80]!r} holds a '.' or '..' segment")
        decoded = unquote(route)
        if decoded == route:
            break
        route = decoded
    else:
        raise UnsafeProxyPath(f"request path {path[:80]!r} is percent-encoded more than {DECODE_ROUNDS} times")
    return path


class KubeApi:
    """A loaded Kubernetes configuration and the calls the client makes."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        self.api_client, self.default_namespace = _load_config(kubeconfig, context)
        self.server = self.api_client.configuration.host

    # --- the one request function ------------------------------------------------------

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                content_type: str = "application/json", accept: str = "application/json",
                timeout: float | tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
                stream: bool = False) -> Any:
        """One call; returns the response (status < 300). Raises NotFound, AccessDenied,
        ClusterUnreachable or ClientError with the server's own message."""
        params = self.api_client.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": accept}, body=body, auth_settings=["BearerToken"],
        )
        try:
            response = self.api_client.call_api(*params, _request_timeout=timeout)
        except Exception as error:  # urllib3 connection errors, TLS errors, timeouts
            if _is_connection_error(error):
                raise ClusterUnreachable(f"cannot reach the Kubernetes API at {self.server} ({connection_reason(error)}); "
                                         "check KUBECONFIG or --context") from None
            raise
        if response.status >= 300 or not stream:
            response.read()
        if response.status < 300:
            return response
        raise _api_error(method, path, response.status, response.data)

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.request(method, path, **kwargs)
        return json.loads(response.data) if response.data else {}

    # --- DreamboothJobs ------------------------------------------------------------------

    def jobs_path(self, namespace: str | None, name: str = "") -> str:
        path = f"{JOB_PATH}/namespaces/{namespace}/{PLURAL}" if namespace else f"{JOB_PATH}/{PLURAL}"
        return f"{path}/{name}" if name else path

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self.json("GET", self.jobs_path(namespace, name))
        except NotFound:
            raise NotFound(f"DreamboothJob {namespace}/{name} not found") from None

    def find_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.json("GET", self.jobs_path(namespace, name))
        except NotFound:
            return None

    def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        return list(self.json("GET", self.jobs_path(namespace)).get("items") or [])

    def create_job(self, manifest: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        namespace = manifest["metadata"]["namespace"]
        query = {"dryRun": "All", "fieldValidation": "Strict"} if dry_run else {"fieldValidation": "Strict"}
        return self.json("POST", self.jobs_path(namespace), body=manifest, query=query)

    def delete_job(self, namespace: str, name: str) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self.json("DELETE", self.jobs_path(namespace, name), body=body)
        except NotFound:
            raise NotFound(f"DreamboothJob {namespace}/{name} not found") from None

    # --- core objects ----------------------------------------------------------------------

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.json("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        except NotFound:
            return None

    def list_configmaps(self, label_selector: str) -> list[dict[str, Any]]:
        """Across all namespaces (needs a cluster-wide list grant; AccessDenied otherwise)."""
        return list(self.json("GET", "/api/v1/configmaps", query={"labelSelector": label_selector}).get("items") or [])

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        import base64

        try:
            secret = self.json("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except NotFound:
            raise NotFound(f"Secret {namespace}/{name} not found") from None
        return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector}
        return list(self.json("GET", f"/api/v1/namespaces/{namespace}/pods", query=query).get("items") or [])

    def list_events(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        query = {"fieldSelector": f"involvedObject.kind={kind},involvedObject.name={name}"}
        return list(self.json("GET", f"/api/v1/namespaces/{namespace}/events", query=query).get("items") or [])

    def pod_log(self, namespace: str, pod: str, container: str | None = None, tail: int | None = None,
                follow: bool = False) -> Iterator[bytes]:
        """The pod's log in chunks; with `follow`, until the container stops (or Ctrl-C)."""
        query = {key: value for key, value in (("container", container), ("tailLines", str(tail) if tail else None),
                                               ("follow", "true" if follow else None)) if value}
        response = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log", query=query,
                                accept="*/*", stream=True, timeout=(CONNECT_TIMEOUT, None if follow else READ_TIMEOUT))
        try:
            yield from response.response.stream(4096)
        finally:
            response.response.release_conn()

    def service_proxy(self, method: str, namespace: str, service: str, port: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None, timeout: float = 300.0) -> tuple[int, dict[str, str], bytes]:
        """An HTTP request to a Service through the API server's proxy (works from outside the
        cluster with the kubeconfig's credentials): (status, headers, body), whatever the status.
        UnsafeProxyPath for a path that could leave the Service's proxy prefix."""
        prefix = f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy"
        url = f"{self.server}{prefix}{service_proxy_path(path)}"
        if not urlsplit(url).path.startswith(prefix + "/"):  # never sent anywhere but the Service
            raise UnsafeProxyPath(f"request path {path[:80]!r} leaves the service proxy")
        request_headers = dict(headers or {})
        self.api_client.update_params_for_auth(request_headers, [], ["BearerToken"], url, method, body)
        pool = self.api_client.rest_client.pool_manager
        try:
            response = pool.request(method, url, body=body, headers=request_headers, timeout=_urllib3_timeout(timeout),
                                    retries=False, preload_content=True)
        except Exception as error:
            if _is_connection_error(error):
                raise ClusterUnreachable(f"cannot reach the Kubernetes API at {self.server} ({connection_reason(error)})") from None
            raise
        return response.status, dict(response.headers), response.data


def _load_config(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """(ApiClient, default namespace): the kubeconfig when there is one, else the pod's own account."""
    from kubernetes import client, config

    configuration = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
    if Path(path).exists():
        try:
            config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
            _, active = config.list_kube_config_contexts(config_file=path)
            if context:
                active = next((c for c in config.list_kube_config_contexts(config_file=path)[0] if c["name"] == context), active)
        except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as error:
            raise ClusterUnreachable(f"kubeconfig {path}: {str(error).splitlines()[0]}") from None
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as error:
            raise ClusterUnreachable(f"in-cluster config: {error}") from None
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.exists() else "default"
    else:
        raise ClusterUnreachable(f"no Kubernetes config: {path} does not exist and this is not a pod; "
                                 "set KUBECONFIG or pass --kubeconfig")
    configuration.retries = False  # fail fast on a dead server; callers that poll retry themselves
    return client.ApiClient(configuration), namespace


def _is_connection_error(error: BaseException) -> bool:
    import urllib3

    return isinstance(error, (urllib3.exceptions.HTTPError, OSError))


def _urllib3_timeout(seconds: float) -> Any:
    import urllib3

    return urllib3.Timeout(connect=CONNECT_TIMEOUT, read=seconds)


def _api_error(method: str, path: str, status: int, data: bytes) -> ClientError:
    try:
        message = json.loads(data).get("message") or ""
    except (ValueError, AttributeError):
        message = data.decode(errors="replace")[:300]
    if status == 404:
        return NotFound(message or f"{path} not found")
    if status in (401, 403):
        return AccessDenied(f"the API server refused {method} {path}: {message or status}")
    return ClientError(message or f"{method} {path}: HTTP {status}")


def job_manifest(namespace: str, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}
