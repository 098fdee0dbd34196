"""Reaching a job's inference server from wherever the user is.

Inside the cluster (a pod, a notebook server) the Service's own URL works. Outside, requests go
through the API server's service proxy with the kubeconfig's credentials — what `kubectl` itself
can reach, so no extra port or ingress is needed; `port_forward` puts that behind a local port for
curl, the OpenAI SDK and the web page.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from dreambooth_serving.settings import TOKEN_HEADER

from .errors import ClientError, EndpointError
from .kube import KubeApi, UnsafeProxyPath
from .status import JobStatus

GENERATE_PATH = "/v1/generate"
OPENAI_PATH = "/v1/images/generations"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "proxy-authenticate",
              "proxy-authorization", "te", "trailer", "content-encoding"}
# Never relayed to the API server: they would act with the user's Kubernetes identity.
KUBE_ONLY = {"authorization", "cookie", "impersonate-user", "impersonate-group", "impersonate-uid"}
KUBE_ONLY_PREFIX = "impersonate-extra-"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
GENERATE_TIMEOUT = 600.0
UNAVAILABLE_RETRIES = 10
UNAVAILABLE_WAIT_SECONDS = 3.0
# A shared server learns of a new subject when the kubelet rewrites its registry (about a minute).
SUBJECT_WAIT_SECONDS = 150.0


@dataclass(frozen=True)
class ServiceRef:
    """A Service as `http://<name>.<namespace>.svc:<port>` names it."""

    name: str
    namespace: str
    port: int
    url: str


def service_ref(url: str) -> ServiceRef:
    parsed = urlparse(url)
    host = parsed.hostname or ""
    parts = host.split(".")
    if len(parts) < 3 or parts[2] != "svc":
        raise ClientError(f"endpoint {url!r} is not a Service URL (http://<service>.<namespace>.svc:<port>)")
    return ServiceRef(name=parts[0], namespace=parts[1], port=parsed.port or 80, url=url.rstrip("/"))


class Endpoint:
    """One inference server: direct when its name resolves from here, else via the API server."""

    def __init__(self, kube: KubeApi, service: ServiceRef, direct: bool | None = None, model: str | None = None,
                 token: str | None = None) -> None:
        self.kube = kube
        self.service = service
        self.direct = _resolves(service) if direct is None else direct
        self.model = model  # the job's subject on the server (status.serving.model): a shared server serves many
        self.token = token  # the server's API token, when it has one

    def token_headers(self) -> dict[str, str]:
        """The token as the server takes it: in X-Dreambooth-Token (the one header the API server's
        proxy passes on) and, only when talking to the server directly, as a bearer token too."""
        if not self.token:
            return {}
        return {TOKEN_HEADER: self.token, **({"Authorization": f"Bearer {self.token}"} if self.direct else {})}

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = GENERATE_TIMEOUT) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one HTTP request to the server, whatever the status."""
        if not self.direct:
            return self.kube.service_proxy(method, self.service.namespace, self.service.name, str(self.service.port),
                                           path, body=body, headers=headers, timeout=timeout)
        request = urllib.request.Request(self.service.url + path, data=body, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()
        except OSError as error:
            raise EndpointError(f"{self.service.url}: {error}") from None

    def generate(self, prompt: str, **params: Any) -> tuple[bytes, int | None]:
        """One PNG (and its seed) from POST /v1/generate; EndpointError with the server's reason.
        Retried while the server is busy or warming up, and for a while when the subject is not
        on a shared server yet (its registry reaches the server a minute after ServingReady)."""
        payload = {"prompt": prompt, "model": self.model, **params}
        payload = {key: value for key, value in payload.items() if value is not None}
        headers_out = {"Content-Type": "application/json", "Accept": "image/png", **self.token_headers()}
        unavailable, arrived, subject_deadline = 0, False, time.monotonic() + SUBJECT_WAIT_SECONDS
        while True:
            status, headers, body = self.request("POST", GENERATE_PATH, json.dumps(payload).encode(), headers_out)
            # 503: the server is warming up, or the proxy has no ready endpoint yet; 429: a full queue.
            if status in (429, 503) and unavailable < UNAVAILABLE_RETRIES:
                unavailable += 1
            elif status == 404 and time.monotonic() < subject_deadline:
                known = self.subject_known()
                if known is None or (known and arrived):
                    break
                # Not there yet: wait for it. There by now: it arrived between the two requests, ask once more.
                arrived = arrived or known
            else:
                break
            time.sleep(UNAVAILABLE_WAIT_SECONDS)
        if status == 401:
            raise EndpointError(f"the endpoint {self.service.url} wants a token ({_detail(body)}): "
                                + ("the one sent is wrong" if self.token else "set DREAMBOOTH_API_TOKEN or let the client read the job's token Secret"))
        if status != 200:
            raise EndpointError(f"the endpoint {self.service.url} answered {status}: {_detail(body)}")
        if not body.startswith(b"\x89PNG"):
            raise EndpointError(f"the endpoint {self.service.url} answered without a PNG")
        seed = {k.lower(): v for k, v in headers.items()}.get("x-seed")
        return body, int(seed) if seed and seed.isdigit() else None

    def subject_known(self) -> bool | None:
        """Whether the server lists a model of this job's name: False when it answers OpenAI's
        model_not_found (not there yet), None when it cannot say (no model named, another error)."""
        if not self.model:
            return None
        status, _, body = self.request("GET", f"/v1/models/{self.model}", headers=self.token_headers(), timeout=30)
        if status == 200:
            return True
        try:
            missing = status == 404 and (json.loads(body).get("error") or {}).get("code") == "model_not_found"
        except (ValueError, AttributeError):
            missing = False
        return False if missing else None

    def paths(self) -> set[str]:
        """The HTTP paths the server offers (from its OpenAPI document); empty when it has none."""
        status, _, body = self.request("GET", "/openapi.json", timeout=30)
        try:
            return set(json.loads(body).get("paths") or {}) if status == 200 else set()
        except ValueError:
            return set()


def _resolves(service: ServiceRef) -> bool:
    """Only inside the cluster do Service names resolve (and are its pods routable)."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return False
    try:
        socket.getaddrinfo(urlparse(service.url).hostname or "", service.port)
        return True
    except OSError:
        return False


def _detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:300] or "no detail"
    detail = data.get("detail") if isinstance(data, dict) else data
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        detail = data["error"].get("message")
    return detail if isinstance(detail, str) else json.dumps(detail)[:300]


# --- a local port in front of the endpoint -------------------------------------------------


class Forwarder:
    """`http://127.0.0.1:<port>` relaying every request to the endpoint, in a background thread."""

    def __init__(self, endpoint: Endpoint, port: int = 0, host: str = "127.0.0.1") -> None:
        self.endpoint = endpoint
        self.server = ThreadingHTTPServer((host, port), _handler_for(endpoint))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="dreambooth-port-forward", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Forwarder":
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Forwarder":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.close()


def is_loopback_host(value: str | None) -> bool:
    """A Host header (or an Origin's host) naming this machine: what a DNS-rebinding page cannot send."""
    if not value:
        return False
    host = urlparse(f"//{value}").hostname if "//" not in value else urlparse(value).hostname
    return host in LOOPBACK_NAMES


def local_request_refusal(target: str, host: str | None, origin: str | None) -> tuple[int, str] | None:
    """Why the local port refuses a request ((status, reason)), or None: only origin-form paths,
    only loopback Host names, only loopback (or no) Origin, as `kubectl proxy` accepts by default."""
    if not target.startswith("/"):
        return 400, f"request target {target[:80]!r} is not a path"
    if not is_loopback_host(host):
        return 403, f"Host {host!r} is not this machine (use http://127.0.0.1:<port>)"
    if origin is not None and not is_loopback_host(origin):
        return 403, f"Origin {origin!r} may not use this port"
    return None


def relayed_headers(headers: Any) -> dict[str, str]:
    """The client's headers as sent on: no hop-by-hop ones, nothing the API server would act on;
    a bearer token for the inference server travels in TOKEN_HEADER (the API server keeps
    Authorization for itself)."""
    relayed = {k: v for k, v in headers.items()
               if k.lower() not in HOP_BY_HOP | KUBE_ONLY | {"host"} and not k.lower().startswith(KUBE_ONLY_PREFIX)}
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip() and not any(k.lower() == TOKEN_HEADER.lower() for k in relayed):
        relayed[TOKEN_HEADER] = token.strip()
    return relayed


def _handler_for(endpoint: Endpoint) -> type[BaseHTTPRequestHandler]:
    service = endpoint.service
    # Links in HTML pages come back rewritten by the API server's proxy: map them back.
    proxy_prefix = f"/api/v1/namespaces/{service.namespace}/services/{service.name}:{service.port}/proxy"

    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            refusal = local_request_refusal(self.path, self.headers.get("Host"), self.headers.get("Origin"))
            try:
                if refusal:
                    raise UnsafeProxyPath(refusal[1])
                path = self.path.removeprefix(proxy_prefix) or "/"
                status, reply_headers, reply = endpoint.request(self.command, path, body, relayed_headers(self.headers))
            except UnsafeProxyPath as error:
                status, reply_headers, reply = refusal[0] if refusal else 400, {"Content-Type": "text/plain"}, f"{error}\n".encode()
            except ClientError as error:
                status, reply_headers, reply = 502, {"Content-Type": "text/plain"}, f"{error}\n".encode()
            self.send_response(status)
            for key, value in reply_headers.items():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = relay

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the user's terminal shows the command's own lines

    return Relay


# --- what to paste ---------------------------------------------------------------------------


def call_lines(status: JobStatus, prompt: str, port: int = 8080, openai: bool = False,
               flags: str = "") -> list[str]:
    """How to call the endpoint: in the cluster, then from this machine with curl, the OpenAI SDK
    (when the server speaks its Images API) and this SDK; with the token from the job's Secret
    in DREAMBOOTH_API_TOKEN when the server has one (never the token itself)."""
    name, namespace = status.name, status.namespace
    local = f"http://127.0.0.1:{port}"
    body = json.dumps({"prompt": prompt, **({"model": status.model_name} if status.model_name else {}), "steps": 25, "seed": 42})
    auth = ' -H "Authorization: Bearer $DREAMBOOTH_API_TOKEN"' if status.token_secret else ""
    lines = [
        f"Endpoint (inside the cluster): {status.endpoint}",
        "From this machine, keep a local port open to it (through the Kubernetes API server):",
        f"  dreambooth jobs port-forward {name} -n {namespace} --port {port}{flags} &",
    ]
    if status.token_secret:
        secret, key = status.token_secret
        jsonpath = "{.data." + key.replace(".", "\\.") + "}"
        lines += ["The server wants its token (from the job's Secret, into this shell):",
                  f"  export DREAMBOOTH_API_TOKEN=\"$(kubectl -n {namespace} get secret {secret} -o jsonpath={shlex.quote(jsonpath)} | base64 -d)\""]
    lines += [
        "Then:",
        f"  curl -sf {local}{GENERATE_PATH} -H 'Content-Type: application/json'{auth} \\",
        f"    -d {shlex.quote(body)} -o {name}.png",
    ]
    if openai:
        model = status.model_name or name
        key = "os.environ['DREAMBOOTH_API_TOKEN']" if status.token_secret else "'none'"
        code = (f"import base64, os; from openai import OpenAI; r = OpenAI(base_url={local + '/v1'!r}, api_key={key})"
                f".images.generate(model={model!r}, prompt={prompt!r}, response_format='b64_json'); "
                f"open({name + '.png'!r}, 'wb').write(base64.b64decode(r.data[0].b64_json))")
        lines += ["Or with the OpenAI SDK:", f"  python -c {shlex.quote(code)}"]
    lines += [
        "Python (no port needed; the token is read from the job's Secret):" if status.token_secret else "Python (no port needed):",
        "  from dreambooth_client import Client",
        f"  Client().job({name!r}, namespace={namespace!r}).generate({prompt!r}).save({name + '.png'!r})",
    ]
    return lines
