"""kopf handlers: thin. kopf delivers DreamboothJob events and keeps the peering records; the
runtime (`runtime.py`) queues the job, and `reconciler` converges it.

Run: `kopf run -m dreambooth_operator.handlers -A` (one replica: `--standalone`; several: `--peering=NAME`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import kopf

from dreambooth_api.v1alpha1.spec import GROUP, PLURAL, VERSION

from . import leadership, metrics
from .runtime import Runtime

# Peering records live this long without a keep-alive: a killed leader is replaced after it.
PEERING_LIFETIME = int(os.environ.get("DREAMBOOTH_OPERATOR_PEERING_LIFETIME", "10"))
_runtime: Runtime | None = None


def served_namespaces() -> list[str] | None:
    """The namespaces of a namespaced install (the chart sets them), or None for all."""
    names = [n.strip() for n in os.environ.get("DREAMBOOTH_OPERATOR_NAMESPACES", "").split(",") if n.strip()]
    return names or None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    global _runtime
    # Events come from condition transitions (runtime.EventPoster), never from log lines.
    settings.posting.enabled = False
    # kopf would log every delivered event ("Handler succeeded"); transitions are logged by us.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # With Roles limited to some namespaces (the chart's rbac.namespaces), cluster-wide
    # scanning is forbidden: skip it instead of retrying for a minute at start-up.
    settings.scanning.disabled = os.environ.get("DREAMBOOTH_OPERATOR_SCANNING", "true").lower() == "false"
    settings.peering.priority = leadership.priority_for_start(time.time())
    settings.peering.lifetime = PEERING_LIFETIME
    peering = None if settings.peering.standalone or not settings.peering.mandatory else settings.peering.name
    namespaces = served_namespaces()
    _runtime = Runtime(
        workers=int(os.environ.get("DREAMBOOTH_OPERATOR_WORKERS", "32")),
        namespaces=namespaces,
        peering=peering,
        peering_namespace=None if settings.peering.clusterwide else (namespaces or [None])[0],
        priority=settings.peering.priority,
    )
    _runtime.start()
    port = int(os.environ.get("DREAMBOOTH_OPERATOR_METRICS_PORT", "9464"))
    if port:
        metrics.serve(port)
        logger.info("metrics on :%d/metrics", port)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_job_event(event: dict[str, Any], **_: Any) -> None:
    if _runtime is not None:
        _runtime.job_event(event.get("type"), event["object"])


@kopf.on.probe(id="unwatched_namespaces")
def unwatched_namespaces(**_: Any) -> dict[str, str]:
    """Served namespaces whose children cannot be watched (the others are served): on /healthz,
    which stays healthy (a restart would not give the operator a Role it lost)."""
    return _runtime.children.failing() if _runtime is not None else {}


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    if _runtime is not None:
        _runtime.stop()
