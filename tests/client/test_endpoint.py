"""Reaching the inference server: Service URLs, the local port in front of it, what to paste."""
from __future__ import annotations

import json
import shlex
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dreambooth_client.endpoint import Endpoint, Forwarder, ServiceRef, call_lines, service_ref
from dreambooth_client.errors import ClientError, EndpointError
from dreambooth_client.status import JobStatus

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def test_service_urls() -> None:
    assert service_ref("http://rex-serve.team-a.svc:8080") == ServiceRef("rex-serve", "team-a", 8080, "http://rex-serve.team-a.svc:8080")
    assert service_ref("http://sd15.team-a.svc.cluster.local:8080/").name == "sd15"
    with pytest.raises(ClientError, match="is not a Service URL"):
        service_ref("http://example.org:8080")


class FakeServer(BaseHTTPRequestHandler):
    """Plays the inference server: a PNG for a prompt, a 422 for an empty one."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not body.get("prompt", "").strip():
            self.reply(422, b'{"detail": [{"loc": ["body", "prompt"], "msg": "empty"}]}', "application/json")
        else:
            self.reply(200, PNG, "image/png", {"X-Seed": str(body.get("seed", 7)), "X-Model": str(body.get("model"))})

    def do_GET(self) -> None:
        self.reply(200, json.dumps({"paths": {"/v1/generate": {}, "/healthz": {}}}).encode(), "application/json")

    def reply(self, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture()
def endpoint() -> Iterator[Endpoint]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield Endpoint(kube=None, service=ServiceRef("rex-serve", "team-a", 8080, url), direct=True)  # type: ignore[arg-type]
    server.shutdown()
    server.server_close()


def test_generate_returns_the_png_and_its_seed(endpoint: Endpoint) -> None:
    assert endpoint.generate("a photo of sks dog", seed=42) == (PNG, 42)
    with pytest.raises(EndpointError, match=r"answered 422: \[\{\"loc\""):
        endpoint.generate(" ")
    assert endpoint.paths() == {"/v1/generate", "/healthz"}


def test_the_local_port_relays_requests_and_maps_proxied_links_back(endpoint: Endpoint) -> None:
    with Forwarder(endpoint) as forwarder:
        request = urllib.request.Request(f"{forwarder.url}/v1/generate", data=b'{"prompt": "x", "seed": 3}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.read() == PNG and response.headers["X-Seed"] == "3"
        proxied = f"{forwarder.url}/api/v1/namespaces/team-a/services/rex-serve:8080/proxy/openapi.json"
        assert "/v1/generate" in json.loads(urllib.request.urlopen(proxied, timeout=10).read())["paths"]


def test_what_to_paste() -> None:
    status = JobStatus("rex", "team-a", phase="Succeeded", endpoint="http://rex-serve.team-a.svc:8080")
    lines = call_lines(status, "a photo of sks dog's toy", port=8081, openai=True)
    assert lines[0] == "Endpoint (inside the cluster): http://rex-serve.team-a.svc:8080"
    assert "  dreambooth jobs port-forward rex -n team-a --port 8081 &" in lines
    curl = " ".join(line.rstrip(" \\") for line in lines[lines.index("Then:") + 1:][:2])
    words = shlex.split(curl)
    assert words[:2] == ["curl", "-sf"] and words[2] == "http://127.0.0.1:8081/v1/generate"
    assert json.loads(words[words.index("-d") + 1]) == {"prompt": "a photo of sks dog's toy", "steps": 25, "seed": 42}
    python = shlex.split(next(line for line in lines if line.strip().startswith("python -c")))
    compile(python[2], "<openai call>", "exec")
    assert "base_url='http://127.0.0.1:8081/v1'" in python[2] and "model='rex'" in python[2]
    assert not any("OpenAI" in line for line in call_lines(status, "p", openai=False))


def test_a_job_on_a_shared_server_asks_for_its_own_subject(endpoint: Endpoint) -> None:
    seen: list[str] = []
    request = endpoint.request

    def recording(*args: object, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = request(*args, **kwargs)
        seen.append(headers.get("X-Model", ""))
        return status, headers, body

    endpoint.request = recording  # type: ignore[method-assign]
    endpoint.model = "rex"
    endpoint.generate("a photo of sks dog")
    assert seen == ["rex"]
    shared = JobStatus("rex", "team-a", phase="Succeeded", endpoint="http://sd15-shared.team-a.svc:8080", model_name="rex")
    curl = next(line for line in call_lines(shared, "p") if line.strip().startswith("-d"))
    assert json.loads(shlex.split(curl)[1])["model"] == "rex"
