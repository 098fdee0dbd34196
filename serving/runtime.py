"""The model behind the APIs: the pipeline, its batcher, its adapters, and where loading stands.

States: loading -> warming -> ready, or failed (with the reason). Weights load on the batcher's
generation thread, so nothing overlaps a batch; so do adapter loads and evictions.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .adapters import AdapterError, AdapterFiles, AdapterLimits, ResidentAdapters
from .batcher import BASE, BatchShape, MicroBatcher
from .catalog import ModelCatalog
from .family import ServedFamily, served_family
from .metrics import ServerMetrics
from .settings import ServerSettings

log = logging.getLogger("dreambooth.serve")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible")
    return device


def prepare_pipeline(settings: ServerSettings) -> Any:
    """Load weights (the trainer's loader: the pipeline class of any family, from model_index.json),
    apply a fixed LoRA, then `ready_for_serving`."""
    import torch

    from dreambooth_trainer.models import load_pipeline

    device = resolve_device(settings.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipeline = load_pipeline(settings.model, seed=settings.tiny_seed, tiny_resolution=settings.tiny_resolution, dtype=dtype)
    if settings.lora:
        from dreambooth_trainer.export import apply_lora

        apply_lora(pipeline, settings.lora)
    return ready_for_serving(pipeline, device, settings.compile)


def ready_for_serving(pipeline: Any, device: str, compile: bool = False) -> Any:
    """Inference mode on the device; channels-last (and TF32) on GPU; optionally compile the denoiser."""
    import torch

    from dreambooth_trainer.families import family_of_pipeline

    parts = family_of_pipeline(pipeline).components(pipeline)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    for module in (parts.denoiser, parts.vae, *parts.text_encoders):
        module.eval().requires_grad_(False)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if hasattr(pipeline, "unet"):  # 4-D activations; transformers work on token sequences
            pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if compile:
        parts.denoiser.compile()  # in place: the pipeline keeps its denoiser
    return pipeline


class ModelRuntime:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics, load: Callable[[], Any]):
        self.settings = settings
        self.metrics = metrics
        self.load = load
        self.catalog = ModelCatalog(settings.base_name, dict(settings.adapters), Path(settings.registry) if settings.registry else None)
        self.files = AdapterFiles()
        self.pipeline: Any = None
        self.family: ServedFamily | None = None
        self.adapters: ResidentAdapters | None = None
        self.state = "loading"
        self.error: str | None = None
        self.failure: Exception | None = None
        self.batcher: MicroBatcher | None = None
        self.tasks: list[asyncio.Task] = []

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def image_side(self) -> int:
        return self.family.native_side

    def run_batch(self, shape: BatchShape, requests: list, adapters: list[str]) -> list:
        """One denoiser batch on the generation thread; row i runs with adapters[i]. Each image
        comes from its own seed (SD: the trainer's batched sampler; others: their pipeline)."""
        from dreambooth_trainer.generate import generate_images

        self.adapters.ensure(adapters, self.weights_file)
        with self.adapters.routing(adapters):
            return generate_images(self.pipeline, requests, steps=shape.steps, guidance=shape.guidance,
                                   height=shape.height, width=shape.width)

    def weights_file(self, model: str) -> Path:
        uri = self.catalog.uri(model)
        if uri is None:
            raise AdapterError(f"adapter {model} was unregistered while its request waited")
        return self.files.local_file(uri)

    async def adapter_for(self, model: str | None) -> str:
        """The adapter to run for a request's `model` (UnknownModel if none), loaded on the device
        before the request joins a batch: an adapter that cannot load fails its own requests only."""
        adapter = self.catalog.resolve(model)
        if adapter == BASE:
            return adapter
        if self.files.cached(self.catalog.uri(adapter) or "") is None:
            await asyncio.to_thread(self.weights_file, adapter)
        if adapter not in self.adapters.sizes:
            await self.batcher.run_blocking(lambda: self.adapters.ensure([adapter], self.weights_file))
        return adapter

    async def start(self) -> None:
        self.batcher = MicroBatcher(
            self.run_batch,
            max_batch=self.settings.max_batch,
            max_queue=self.settings.max_queue,
            max_wait_s=self.settings.max_wait_s,
            max_adapters=min(self.settings.max_adapters_per_batch, self.settings.max_resident_adapters),
            on_batch=self.metrics.observe_batch,
            on_queue_depth=self.metrics.queue_depth.set,
        )
        self.batcher.start()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.load_and_warm_up(), name="load-model")]
        if self.catalog.file is not None:
            self.tasks.append(loop.create_task(self.watch_registry(), name="watch-registry"))

    async def load_and_warm_up(self) -> None:
        from dreambooth_trainer.generate import ImageRequest

        started = time.perf_counter()
        try:
            self.pipeline = await self.batcher.run_blocking(self.load)
            self.family = served_family(self.pipeline)
            self.adapters = ResidentAdapters(
                self.pipeline,
                AdapterLimits(self.settings.max_resident_adapters, self.settings.max_adapter_bytes),
                on_change=self.metrics.observe_adapters, on_load=self.metrics.adapter_loads.inc,
                on_evict=self.metrics.adapter_evictions.inc,
            )
            self.state = "warming"
            shape = BatchShape(self.settings.warmup_steps, self.family.default_guidance, self.image_side, self.image_side)
            await self.batcher.submit(shape, [ImageRequest("warm-up", "", 0)])
        except Exception as error:  # the pod must say why it never gets ready
            self.state, self.error, self.failure = "failed", f"{type(error).__name__}: {error}", error
            log.error("model failed to load", extra={"model": self.settings.model, "error": self.error})
            return
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("model ready", extra={"model": self.settings.model, "seconds": round(time.perf_counter() - started, 2)})

    async def watch_registry(self) -> None:
        """Follow the registry file: count what is registered, evict what was unregistered."""
        while True:
            change = await asyncio.to_thread(self.catalog.refresh)
            self.metrics.models.set(len(self.catalog.cards()))
            if change.added or change.removed:
                log.info("registry changed", extra={"added": sorted(change.added), "removed": sorted(change.removed)})
            for model in change.removed:
                if self.adapters is not None and self.catalog.uri(model) is None:
                    await self.batcher.run_blocking(lambda model=model: self.adapters.evict(model))
            await asyncio.sleep(self.settings.registry_poll_s)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.batcher is not None:
            await self.batcher.close()
