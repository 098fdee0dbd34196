"""What keeps a web page from using the server: the Host names a server without a token answers,
and the content types its POSTs take.

DNS rebinding points a page's own name at this server, so its requests are same-origin for the
browser; they still carry the page's name as Host. A server without a token that listens on a
loopback address (a laptop), or that was given names (`--allowed-host`), answers only Host names
that are loopback, IP literals or those names. A server listening on every address without names
was exposed on purpose: the token and the NetworkPolicy guard it (as Ollama does). A cross-origin
page can POST without asking first only as text/plain, a form or multipart: the JSON APIs refuse
anything but JSON (415), so such a POST never starts work.
"""
from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request

LOOPBACK_NAMES = ("localhost",)
ANY_HOST = "*"


def host_name(header: str) -> str:
    """The name part of a Host header: `[::1]:8080` -> `::1`, `Example.org.:80` -> `example.org`."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(header: str | None, allowed: tuple[str, ...]) -> bool:
    """Loopback names, IP literals and the configured names (`*` allows every name)."""
    if ANY_HOST in allowed:
        return True
    name = host_name(header or "")
    if not name:
        return False
    if is_ip_literal(name) or name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    return name in {host_name(item) for item in allowed}


def checks_host(token: str | None, listen_host: str, allowed: tuple[str, ...]) -> bool:
    """Whether Host names are checked: only without a token, on a loopback address or with names given."""
    if token:
        return False
    if allowed:
        return ANY_HOST not in allowed
    return listen_host in LOOPBACK_NAMES or (is_ip_literal(listen_host) and ipaddress.ip_address(listen_host).is_loopback)


class HostCheck:
    """Pure ASGI middleware answering 403 (JSON) to a Host name this server does not answer to."""

    def __init__(self, app: Any, allowed: tuple[str, ...], body: Callable[[str, str], dict[str, Any]]):
        self.app = app
        self.allowed = allowed
        self.body = body  # (path, message) -> the JSON error body that path's API speaks

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"host"), None)
        if host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        message = (f"Host {host_name(host or '')!r} is not a name of this server; without a token it answers only loopback "
                   "names, IP addresses and the names given with --allowed-host")
        payload = json.dumps(self.body(scope["path"], message)).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()


def require_media_type(request: Request, wanted: str) -> None:
    """415 unless the body is declared `wanted` (application/json, multipart/form-data)."""
    given = media_type(request)
    if given != wanted:
        raise HTTPException(415, f"Content-Type must be {wanted}" + (f", not {given}" if given else " (none was given)"))
