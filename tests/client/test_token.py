"""The server's token end to end on the client's side: read from the job's Secret (or
DREAMBOOTH_API_TOKEN), sent in the header the API server's proxy passes on, printed as lines
that work; and a subject a shared server does not know yet is waited for, for a bounded time."""
from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

import pytest

import dreambooth_client.endpoint as endpoint_module
from dreambooth_client.endpoint import Endpoint, ServiceRef, call_lines
from dreambooth_client.errors import EndpointError
from dreambooth_client.sdk import Job
from dreambooth_client.status import JobStatus, job_status
from tests.client.test_endpoint import PNG, FakeServer

JSON = "application/json"
TOKEN = "s3cret-token"


class TokenServer(FakeServer):
    """A server with a token whose registry learns of `rex` at time.monotonic() `known_from`."""

    known_from = 0.0
    seen: list[dict[str, str]] = []

    def authorised(self) -> bool:
        headers = {k.lower(): v for k, v in self.headers.items()}
        type(self).seen.append(headers)
        return TOKEN in (headers.get("x-dreambooth-token"), headers.get("authorization", "").removeprefix("Bearer "))

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if not self.authorised():
            return self.reply(401, b'{"detail": "missing token"}', JSON)
        if time.monotonic() < type(self).known_from:
            return self.reply(404, b'{"detail": "the model \'rex\' does not exist on this server"}', JSON)
        self.reply(200, PNG, "image/png", {"X-Seed": "3"})

    def do_GET(self) -> None:
        if not self.authorised():
            return self.reply(401, b'{"error": {"code": "invalid_api_key"}}', JSON)
        if time.monotonic() < type(self).known_from:
            return self.reply(404, b'{"error": {"message": "no rex", "code": "model_not_found"}}', JSON)
        self.reply(200, b'{"id": "rex", "object": "model"}', JSON)


@contextmanager
def serving(handler: type[TokenServer]) -> Iterator[str]:
    """`handler` on a loopback port for the block; its URL."""
    TokenServer.seen, TokenServer.known_from = [], 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def url() -> Iterator[str]:
    with serving(TokenServer) as address:
        yield address


def endpoint(url: str, token: str | None = TOKEN, direct: bool = True) -> Endpoint:
    return Endpoint(kube=None, service=ServiceRef("sd15-shared", "team-a", 8080, url), direct=direct, model="rex", token=token)  # type: ignore[arg-type]


def test_the_token_is_sent_and_a_missing_one_is_explained(url: str) -> None:
    assert endpoint(url).generate("a photo of sks dog") == (PNG, 3)
    assert TokenServer.seen[0]["x-dreambooth-token"] == TOKEN and TokenServer.seen[0]["authorization"] == f"Bearer {TOKEN}"
    with pytest.raises(EndpointError, match="wants a token.*DREAMBOOTH_API_TOKEN"):
        endpoint(url, token=None).generate("a photo of sks dog")


def test_through_the_api_servers_proxy_the_token_goes_only_in_its_own_header() -> None:
    proxied = endpoint("http://unused", direct=False).token_headers()
    assert proxied == {"X-Dreambooth-Token": TOKEN}, "Authorization belongs to the API server there"
    assert endpoint("http://unused").token_headers()["Authorization"] == f"Bearer {TOKEN}"


def test_a_subject_the_shared_server_does_not_know_yet_is_waited_for(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoint_module, "UNAVAILABLE_WAIT_SECONDS", 0.01)
    TokenServer.known_from = time.monotonic() + 0.3
    assert endpoint(url).generate("a photo of sks dog") == (PNG, 3)
    assert time.monotonic() >= TokenServer.known_from
    monkeypatch.setattr(endpoint_module, "SUBJECT_WAIT_SECONDS", 0.2)
    TokenServer.known_from = time.monotonic() + 3600
    with pytest.raises(EndpointError, match="answered 404"):
        endpoint(url).generate("a photo of sks dog")


class ArrivingServer(TokenServer):
    """A registry that learns of `rex` between a POST and the GET that follows it: the POST's
    first `posts_missing` answers are 404, the model list has it all along."""

    posts_missing = 1

    def do_POST(self) -> None:
        if type(self).posts_missing > 0:
            self.rfile.read(int(self.headers["Content-Length"]))
            type(self).posts_missing -= 1
            return self.reply(404, b'{"detail": "the model \'rex\' does not exist on this server"}', JSON)
        super().do_POST()


@pytest.mark.parametrize("posts_missing, served", [(1, True), (10**6, False)])
def test_a_subject_that_arrives_between_the_request_and_the_check_is_asked_for_once_more(
        monkeypatch: pytest.MonkeyPatch, posts_missing: int, served: bool) -> None:
    monkeypatch.setattr(endpoint_module, "UNAVAILABLE_WAIT_SECONDS", 0.01)
    ArrivingServer.posts_missing = posts_missing
    with serving(ArrivingServer) as url:
        started = time.monotonic()
        if served:
            assert endpoint(url).generate("a photo of sks dog") == (PNG, 3)
        else:
            with pytest.raises(EndpointError, match="answered 404"):
                endpoint(url).generate("a photo of sks dog")
            assert ArrivingServer.posts_missing == 10**6 - 2, "asked once more, not until the deadline"
        assert time.monotonic() - started < 5


class SecretsApi:
    def __init__(self, secrets: dict[str, dict[str, str]]) -> None:
        self.secrets = secrets

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        from dreambooth_client.errors import NotFound

        if name not in self.secrets:
            raise NotFound(f"Secret {namespace}/{name} not found")
        return self.secrets[name]


class StubClient:
    def __init__(self, secrets: dict[str, dict[str, str]]) -> None:
        self.kube = SecretsApi(secrets)


BODY = {"metadata": {"name": "rex", "namespace": "team-a"},
        "spec": {"serving": {"server": "sd15", "auth": {"tokenSecretRef": {"name": "sd15-token"}}}},
        "status": {"phase": "Succeeded", "serving": {"url": "http://sd15-shared.team-a.svc:8080", "model": "rex"}}}


def test_the_token_comes_from_the_jobs_secret_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DREAMBOOTH_API_TOKEN", raising=False)
    status = job_status(BODY)
    assert status.token_secret == ("sd15-token", "token")
    job = Job(StubClient({"sd15-token": {"token": TOKEN}}), "rex", "team-a")  # type: ignore[arg-type]
    assert job.api_token(status) == TOKEN
    with pytest.raises(EndpointError, match="Secret team-a/sd15-token .*DREAMBOOTH_API_TOKEN"):
        Job(StubClient({}), "rex", "team-a").api_token(status)  # type: ignore[arg-type]
    monkeypatch.setenv("DREAMBOOTH_API_TOKEN", "from-env")
    assert Job(StubClient({}), "rex", "team-a").api_token(status) == "from-env"  # type: ignore[arg-type]
    assert Job(StubClient({}), "rex", "team-a").api_token(JobStatus("rex", "team-a")) == "from-env"  # type: ignore[arg-type]


def test_the_printed_lines_carry_the_token_without_showing_it() -> None:
    status = job_status(BODY)
    lines = call_lines(status, "a photo of sks dog", port=8081, openai=True)
    export = next(line.strip() for line in lines if line.strip().startswith("export DREAMBOOTH_API_TOKEN="))
    assert shlex.split(export)[1] == ("DREAMBOOTH_API_TOKEN=$(kubectl -n team-a get secret sd15-token "
                                      "-o jsonpath='{.data.token}' | base64 -d)")
    curl = next(line for line in lines if line.strip().startswith("curl -sf"))
    assert '-H "Authorization: Bearer $DREAMBOOTH_API_TOKEN"' in curl
    python = shlex.split(next(line for line in lines if line.strip().startswith("python -c")))[2]
    assert "api_key=os.environ['DREAMBOOTH_API_TOKEN']" in python
    compile(python, "<openai call>", "exec")
    assert not any(TOKEN in line for line in lines)
    open_server = call_lines(JobStatus("rex", "team-a", endpoint="http://rex-serve.team-a.svc:8080"), "p", openai=True)
    assert not any("DREAMBOOTH_API_TOKEN" in line for line in open_server)
    assert json.loads(shlex.split(next(line for line in lines if line.strip().startswith("-d")))[1])["model"] == "rex"
