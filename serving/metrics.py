"""Prometheus metrics of one server, in a registry of its own (one per app: tests never collide)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Paths counted by name; anything else is counted as "other" (no unbounded label values).
KNOWN_PATHS = {"/", "/v1/generate", "/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/models",
               "/healthz", "/readyz", "/metrics",
               "/docs", "/openapi.json"}


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dreambooth_http_requests", "HTTP requests by path and status code", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "dreambooth_http_request_seconds", "HTTP request latency", ["path"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.images = Counter("dreambooth_images_generated", "Images generated", registry=self.registry)
        self.queue_depth = Gauge("dreambooth_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.batch_images = Histogram(
            "dreambooth_batch_images", "Images per UNet batch", registry=self.registry,
            buckets=(1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64),
        )
        self.ready = Gauge("dreambooth_ready", "1 once weights are loaded and warmed up", registry=self.registry)
        self.models = Gauge("dreambooth_models", "Models this server answers to (base + adapters)", registry=self.registry)
        self.adapters_resident = Gauge("dreambooth_adapters_resident", "LoRA adapters loaded on the device", registry=self.registry)
        self.adapter_bytes = Gauge("dreambooth_adapter_bytes", "Bytes of LoRA weights on the device", registry=self.registry)
        self.adapter_loads = Counter("dreambooth_adapter_loads", "Adapters loaded onto the device", registry=self.registry)
        self.adapter_evictions = Counter("dreambooth_adapter_evictions", "Adapters evicted from the device", registry=self.registry)

    def observe_batch(self, images: int) -> None:
        self.batch_images.observe(images)
        self.images.inc(images)

    def observe_adapters(self, count: int, size: int) -> None:
        self.adapters_resident.set(count)
        self.adapter_bytes.set(size)


class RequestMetricsMiddleware:
    """Counts every HTTP response by path and status and times it (pure ASGI, no buffering)."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)
