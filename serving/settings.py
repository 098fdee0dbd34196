"""What one server is: its base model, its adapters, its batching and its limits.

`run_server` fills `ServerSettings` from the command line and the env; tests build it directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

TOKEN_ENV = "DREAMBOOTH_API_TOKEN"
# The token's second header: the Kubernetes API server's service proxy keeps Authorization for itself.
TOKEN_HEADER = "X-Dreambooth-Token"
MAX_SEED = 2**32 - 1
# The API's ceiling for any family; each family's own limit is checked per request (family.py).
MAX_SIDE = 2048
MAX_BODY_BYTES = 64 * 1024
# Edits carry their images: up to this many bytes of multipart body.
MAX_EDIT_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    model: str = "tiny"
    # The name clients give as `model` for the base model; default: `model` itself.
    model_name: str | None = None
    device: str = "auto"
    max_batch: int = 8
    max_queue: int = 64
    max_wait_s: float = 0.02
    lora: str | None = None
    compile: bool = False
    api_token: str | None = None
    warmup_steps: int = 2
    tiny_seed: int = 0
    tiny_resolution: int = 32
    # Adapters by model name: fixed ones (name, uri) and a registry file the operator keeps.
    adapters: tuple[tuple[str, str], ...] = ()
    registry: str | None = None
    registry_poll_s: float = 2.0
    max_resident_adapters: int = 32
    max_adapter_bytes: int = 2 * 1024**3
    # Distinct adapters one UNet batch may hold (1: every batch runs one adapter).
    max_adapters_per_batch: int = 8
    # Where it listens; a loopback address without a token makes it check Host names (guard.py).
    listen_host: str = "127.0.0.1"
    # Host names a server without a token answers besides loopback names and IP addresses.
    allowed_hosts: tuple[str, ...] = ()
    # Web origins whose pages may call the APIs (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    # Seconds a request may wait and be drawn; then its work is dropped (the OpenAI SDK gives up at 600).
    request_timeout_s: float = 300.0
    # One request's images × width × height × denoising steps: 10 images of 1024x1024 at 50 steps.
    max_pixel_steps: int = 10 * 1024 * 1024 * 50

    @property
    def base_name(self) -> str:
        return self.model_name or self.model


ALLOWED_HOSTS_ENV = "DREAMBOOTH_ALLOWED_HOSTS"
CORS_ORIGINS_ENV = "DREAMBOOTH_CORS_ORIGINS"


def api_token_from_env() -> str | None:
    """The bearer token from DREAMBOOTH_API_TOKEN; None (open server) when unset or empty."""
    return os.environ.get(TOKEN_ENV) or None


def names_from_env(variable: str) -> tuple[str, ...]:
    """A comma-separated list from the environment (DREAMBOOTH_ALLOWED_HOSTS, DREAMBOOTH_CORS_ORIGINS)."""
    return tuple(item.strip() for item in (os.environ.get(variable) or "").split(",") if item.strip())
