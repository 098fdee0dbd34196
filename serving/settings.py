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

    @property
    def base_name(self) -> str:
        return self.model_name or self.model


def api_token_from_env() -> str | None:
    """The bearer token from DREAMBOOTH_API_TOKEN; None (open server) when unset or empty."""
    return os.environ.get(TOKEN_ENV) or None
