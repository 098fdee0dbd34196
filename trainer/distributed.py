"""The distributed env contract (set by the operator) and the rendezvous wait.

MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE; all optional for a single process.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UserInputError


@dataclass(frozen=True)
class DistEnv:
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1
    attempt: int | None = None  # DREAMBOOTH_ATTEMPT: the gang's execution attempt (fences its writes)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int_env(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserInputError(f"env {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise UserInputError(f"env {name}={value} must be >= {minimum}")
    return value


def dist_env_from(env: Mapping[str, str] = os.environ) -> DistEnv:
    nnodes = _int_env(env, "NNODES", 1, 1)
    node_rank = _int_env(env, "NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise UserInputError(f"env NODE_RANK={node_rank} must be < NNODES={nnodes}")
    return DistEnv(
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int_env(env, "MASTER_PORT", 29500, 1),
        nnodes=nnodes,
        node_rank=node_rank,
        nproc_per_node=_int_env(env, "NPROC_PER_NODE", 1, 1),
        attempt=_int_env(env, "DREAMBOOTH_ATTEMPT", -1, 0) if env.get("DREAMBOOTH_ATTEMPT") else None,
    )


def wait_for_master(env: DistEnv, timeout: float = 600.0, poll: float = 0.5) -> None:
    """Block until MASTER_ADDR resolves and (for ranks > 0) MASTER_PORT accepts connections.

    Pods of a gang start in any order and DNS records appear late; initialising the process
    group before the master listens fails fast with a confusing error, so wait first.
    """
    if not env.is_distributed:
        return
    deadline = time.monotonic() + timeout
    need_port = env.node_rank > 0
    last_error = ""
    while time.monotonic() < deadline:
        try:
            address = socket.getaddrinfo(env.master_addr, env.master_port, type=socket.SOCK_STREAM)[0][4]
            if not need_port:
                return
            with socket.create_connection(address[:2], timeout=2):
                return
        except OSError as error:
            last_error = str(error)
        time.sleep(poll)
    what = "resolve" if not need_port else "accept connections on port"
    raise TimeoutError(
        f"master {env.master_addr}:{env.master_port} did not {what} within {timeout:.0f} s ({last_error})"
    )
