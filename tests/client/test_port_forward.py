"""`dreambooth jobs port-forward` against a fake Kubernetes API server, with raw request lines: the
local port reaches the job's Service and nothing else, only from this machine's names, and never
hands the API server a header it would act on."""
from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dreambooth_client.endpoint import Endpoint, Forwarder, ServiceRef
from dreambooth_client.kube import KubeApi

KUBE_TOKEN = "kube-user-token-3a9"
PREFIX = "/api/v1/namespaces/team-a/services/rex-serve:8080/proxy"


@dataclass
class FakeApiServer:
    """Answers every request 200 and remembers what reached it (path and headers)."""

    url: str
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)


@pytest.fixture(scope="module")
def api_server_running() -> Iterator[FakeApiServer]:
    state = FakeApiServer("")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            state.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            body = json.dumps({"kind": "Secret", "data": {"token": "c2VjcmV0"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = answer

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture()
def api_server(api_server_running: FakeApiServer) -> FakeApiServer:
    api_server_running.seen.clear()
    return api_server_running


@pytest.fixture(scope="module")
def forwarder(api_server_running: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forwarder]:
    tmp_path = tmp_path_factory.mktemp("kube")
    api_server = api_server_running
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": api_server.url}}],
        "users": [{"name": "user", "user": {"token": KUBE_TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "user", "namespace": "team-a"}}],
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    kube = KubeApi(str(tmp_path / "kubeconfig"))
    endpoint = Endpoint(kube, ServiceRef("rex-serve", "team-a", 8080, "http://rex-serve.team-a.svc:8080"), direct=False)
    with Forwarder(endpoint) as running:
        yield running


def raw_request(forwarder: Forwarder, request_line: str, *headers: str) -> int:
    """Send one request exactly as written (no client normalises it); the answer's status code."""
    host, port = forwarder.server.server_address[:2]
    lines = [request_line, *(headers or (f"Host: 127.0.0.1:{port}",)), "Connection: close", "", ""]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


ESCAPES = [
    "GET /../../../../../../../apis/apps/v1/deployments HTTP/1.1",
    "GET /v1/../../../../../../../api/v1/namespaces/team-a/secrets HTTP/1.1",
    "GET /%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/api/v1/secrets HTTP/1.1",
    "GET /..%2f..%2f..%2f..%2f..%2f..%2f..%2fapi/v1/secrets HTTP/1.1",
    "GET /%252e%252e/%252e%252e/%252e%252e/%252e%252e/%252e%252e/%252e%252e/%252e%252e/api/v1/secrets HTTP/1.1",
    "DELETE /./../../../../../../../api/v1/namespaces/team-a/pods/x HTTP/1.1",
    "GET /..\\..\\..\\..\\api\\v1\\secrets HTTP/1.1",
    "GET http://127.0.0.1:1/api/v1/secrets HTTP/1.1",
]


@pytest.mark.parametrize("request_line", ESCAPES)
def test_no_request_line_leaves_the_service_proxy(forwarder: Forwarder, api_server: FakeApiServer, request_line: str) -> None:
    assert raw_request(forwarder, request_line) == 400
    assert api_server.seen == [], "the request reached the API server"


def test_only_this_machines_names_may_use_the_port(forwarder: Forwarder, api_server: FakeApiServer) -> None:
    port = forwarder.server.server_address[1]
    assert raw_request(forwarder, "GET /v1/models HTTP/1.1", "Host: rebind.example.org") == 403
    assert raw_request(forwarder, "GET /v1/models HTTP/1.1", "Host: 127.0.0.1@rebind.example.org") == 403
    assert raw_request(forwarder, "POST /v1/generate HTTP/1.1", f"Host: 127.0.0.1:{port}", "Origin: https://evil.example.org",
                       "Content-Length: 0") == 403
    assert raw_request(forwarder, "GET /v1/models HTTP/1.0", "User-Agent: no-host") == 403
    assert api_server.seen == []
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert raw_request(forwarder, "GET /v1/models HTTP/1.1", f"Host: {host}", f"Origin: http://{host}") == 200
    assert [path for path, _ in api_server.seen] == [f"{PREFIX}/v1/models"] * 3


def test_the_api_server_gets_the_users_credentials_and_nothing_the_client_sent_for_it(
        forwarder: Forwarder, api_server: FakeApiServer) -> None:
    port = forwarder.server.server_address[1]
    status = raw_request(forwarder, "GET /v1/models?limit=1 HTTP/1.1", f"Host: 127.0.0.1:{port}",
                         "Authorization: Bearer server-token-77", "Impersonate-User: system:admin",
                         "Impersonate-Group: system:masters", "Impersonate-Extra-Scopes: all", "Cookie: session=1")
    assert status == 200
    [(path, headers)] = api_server.seen
    assert path == f"{PREFIX}/v1/models?limit=1"
    assert headers["authorization"] == f"Bearer {KUBE_TOKEN}"
    assert headers["x-dreambooth-token"] == "server-token-77"  # the inference server's token, beside the API server's
    assert not [name for name in headers if name.startswith("impersonate") or name == "cookie"]


def test_the_proxy_path_check_itself() -> None:
    from dreambooth_client.kube import UnsafeProxyPath, service_proxy_path

    assert service_proxy_path("/v1/images/generations?x=1") == "/v1/images/generations?x=1"
    assert service_proxy_path("/docs/oauth2-redirect.html") == "/docs/oauth2-redirect.html"
    for path in ("/a/../b", "/a/%2E%2E/b", "v1/models", "//host/api", "/a/%2e", "/a\\b", "/a\u0000b"):
        with pytest.raises(UnsafeProxyPath):
            service_proxy_path(path)
