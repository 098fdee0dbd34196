"""Safe by default: a web page cannot start work with a simple cross-origin POST, cannot rebind
a name onto a server without a token, gets no CORS grant unless one is configured; probes and
errors name no path; log lines keep their fields, as JSON when asked."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TOKEN, LiveServer, SharedServer

BIN = Path(sys.executable).parent


def no_model() -> object:
    raise RuntimeError("this test needs no model")


def app_with(**settings: object) -> object:
    from dreambooth_serving.app import ServerSettings, create_app

    return create_app(ServerSettings(device="cpu", **settings), load=no_model)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
def test_a_post_that_is_not_json_starts_no_work(live_server: LiveServer, content_type: str | None) -> None:
    """What a page may send cross-origin without a preflight is refused (415) before any work."""
    before = live_server.metrics()["dreambooth_images_generated_total"]
    body = json.dumps({"prompt": "a dog", "steps": 1}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/generate", "/v1/images/generations"):
        answer = httpx.post(f"{live_server.url}{path}", content=body, headers=headers, timeout=30)
        assert answer.status_code == 415, (path, answer.text)
        assert "application/json" in answer.text
    assert live_server.metrics()["dreambooth_images_generated_total"] == before
    assert httpx.post(f"{live_server.url}/v1/images/generations", content=body, headers={"Content-Type": "application/json; charset=utf-8"},
                      timeout=60).status_code == 200


def raw_get(url: str, host: str, path: str = "/v1/models") -> tuple[int, bytes]:
    """A GET with exactly this Host header (a page's own name after DNS rebinding)."""
    address = httpx.URL(url)
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_a_server_without_a_token_answers_only_its_own_names(live_server: LiveServer) -> None:
    port = httpx.URL(live_server.url).port
    for rebound in ("rebind.example.org", f"rebind.example.org:{port}", "127.0.0.1.nip.example"):
        status, body = raw_get(live_server.url, rebound)
        assert status == 403, rebound
        assert json.loads(body)["error"]["code"] == "host_not_allowed"
    assert raw_get(live_server.url, "rebind.example.org", "/v1/generate")[0] == 403
    for own in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "10.0.0.7:8080", "web.localhost"):
        assert raw_get(live_server.url, own)[0] == 200, own


def test_names_given_are_answered_and_a_token_makes_the_check_unneeded(shared_server: SharedServer) -> None:
    from dreambooth_serving.guard import checks_host

    with TestClient(app_with(allowed_hosts=("sd15-shared.team-a.svc",)), base_url="http://sd15-shared.team-a.svc:8080") as client:
        assert client.get("/readyz").status_code in (200, 503)  # reached the app: not 403
        assert client.get("/readyz", headers={"Host": "rebind.example.org"}).status_code == 403
    # With a token, every name reaches the token check (a page does not know the token).
    assert raw_get(shared_server.url, "rebind.example.org")[0] == 401
    assert checks_host(None, "127.0.0.1", ()) and checks_host(None, "localhost", ())
    assert not checks_host(None, "0.0.0.0", ())  # exposed on purpose (a pod): the token and the NetworkPolicy guard it
    assert checks_host(None, "0.0.0.0", ("sd15-shared",)) and not checks_host(TOKEN, "127.0.0.1", ())


def test_no_cross_origin_grant_unless_configured() -> None:
    preflight = {"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,x-dreambooth-token"}
    with TestClient(app_with(), base_url="http://localhost") as client:
        answer = client.options("/v1/images/generations", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "https://app.example.org"}).headers
    with TestClient(app_with(cors_origins=("https://app.example.org",)), base_url="http://localhost") as client:
        answer = client.options("/v1/images/generations", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example.org"
        assert "x-dreambooth-token" in answer.headers["access-control-allow-headers"].lower()
        other = client.options("/v1/images/generations", headers={**preflight, "Origin": "https://evil.example.org"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example.org"


def test_log_lines_keep_their_fields_as_json_in_a_pod(tmp_path: Path) -> None:
    """`dreambooth serve` as the operator runs it (DREAMBOOTH_LOG_FORMAT=json): every line is a
    JSON object, and the failure names the model and the error in fields of its own."""
    env = {**os.environ, "DREAMBOOTH_LOG_FORMAT": "json", "DREAMBOOTH_CACHE": str(tmp_path)}
    result = subprocess.run([str(BIN / "dreambooth"), "serve", "--model", str(tmp_path / "no-such-model"), "--port", "0", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode in (1, 2), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert len(lines) >= 3 and all({"time", "level", "logger", "message"} <= set(r) for r in records), result.stderr
    failure = next(r for r in records if r["message"] == "model failed to load")
    assert failure["model"] == str(tmp_path / "no-such-model") and "no-such-model" in failure["error"]
    assert any(r["logger"].startswith("uvicorn") for r in records), "uvicorn's own lines are JSON too"


def test_text_log_lines_keep_their_fields_too() -> None:
    from dreambooth_serving.logs import TextWithFields

    record = logging.LogRecord("dreambooth.serve", logging.INFO, __file__, 1, "adapter loaded", None, None)
    record.model, record.bytes = "rex", 4096
    assert TextWithFields().format(record).endswith("INFO dreambooth.serve adapter loaded model=rex bytes=4096")
