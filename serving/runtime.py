"""The model behind the APIs: the pipeline, its batcher, its adapters, and where loading stands.

States: loading -> warming -> ready, or failed (its error class is public, the reason is logged).
Weights load on the batcher's generation thread, so nothing overlaps a batch; so do adapter loads
and evictions. Between denoising steps the denoiser asks the batcher whether anyone still waits
for the running chunk, and stops when nobody does.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_trainer.generate import ImageRequest

from .adapters import AdapterError, AdapterFiles, AdapterLimits, ResidentAdapters
from .batcher import BASE, BatchShape, ChunkAbandoned, MicroBatcher
from .catalog import ModelCatalog
from .family import ServedFamily, denoiser, served_family
from .metrics import ServerMetrics
from .settings import ServerSettings

log = logging.getLogger("dreambooth.serve")
GENERATE, EDIT, INPAINT = "generate", "edit", "inpaint"


class OutOfMemory(RuntimeError):
    """A batch did not fit in the device's memory (the batcher then tries its requests alone)."""


@dataclass(frozen=True)
class EditRequest(ImageRequest):
    """An image to edit (and, for inpainting, the mask of where to paint: white), both already at
    the batch's size."""

    image: Any = None
    mask: Any = None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible")
    return device


def prepare_pipeline(settings: ServerSettings) -> Any:
    """Load weights (the trainer's loader: the pipeline class of any family, from model_index.json),
    fuse a fixed LoRA into them, then `ready_for_serving`."""
    import torch

    from dreambooth_trainer.models import load_pipeline

    device = resolve_device(settings.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipeline = load_pipeline(settings.model, seed=settings.tiny_seed, tiny_resolution=settings.tiny_resolution, dtype=dtype)
    if settings.lora:
        fuse_fixed_lora(pipeline, settings.lora)
    return ready_for_serving(pipeline, device, settings.compile)


def fuse_fixed_lora(pipeline: Any, uri: str) -> None:
    """`--lora`: its update is added into the base weights and its layers removed, so it stays
    on for every request whatever adapters load later (a loaded adapter of its own would be
    switched off by the first of them)."""
    from dreambooth_trainer.export import apply_lora

    apply_lora(pipeline, uri)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()


def ready_for_serving(pipeline: Any, device: str, compile: bool = False) -> Any:
    """Inference mode on the device; the VAE decodes image by image (and tile by tile on a GPU);
    channels-last (and TF32) on GPU; optionally compile the denoiser."""
    import torch

    from dreambooth_trainer.families import family_of_pipeline

    parts = family_of_pipeline(pipeline).components(pipeline)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    for module in (parts.denoiser, parts.vae, *parts.text_encoders):
        module.eval().requires_grad_(False)
    # One image at a time through the decoder: a batch's decode needs one image's memory, not n.
    if hasattr(parts.vae, "enable_slicing"):
        parts.vae.enable_slicing()
    if device.startswith("cuda"):
        if hasattr(parts.vae, "enable_tiling"):  # only sizes above the VAE's tile are tiled
            parts.vae.enable_tiling()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if hasattr(pipeline, "unet"):  # 4-D activations; transformers work on token sequences
            pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if compile:
        parts.denoiser.compile()  # in place: the pipeline keeps its denoiser
    return pipeline


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error)))


def free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def edit_pipeline(pipeline: Any, kind: str) -> Any:
    """The family's img2img or inpainting pipeline over the same modules (no copies, LoRA included)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto = AutoPipelineForInpainting if kind == INPAINT else AutoPipelineForImage2Image
    variant = auto.from_pipe(pipeline)
    variant.set_progress_bar_config(disable=True)
    return variant


# Latent channels the SD3 inpainting pipeline takes (its VAE's 16, or an inpainting model's 33).
SD3_INPAINT_CHANNELS = (16, 33)


def edit_refusal(pipeline: Any, kind: str) -> str | None:
    """Why this model cannot do an img2img/inpainting edit, or None: diffusers has no such variant
    of its family's pipeline, or the variant does not take this denoiser."""
    from diffusers.pipelines.auto_pipeline import AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, AUTO_INPAINT_PIPELINES_MAPPING, _get_task_class

    mapping = AUTO_INPAINT_PIPELINES_MAPPING if kind == INPAINT else AUTO_IMAGE2IMAGE_PIPELINES_MAPPING
    what = "inpainting" if kind == INPAINT else "img2img"
    try:
        _get_task_class(mapping, type(pipeline).__name__)
    except ValueError:
        return f"diffusers has no {what} pipeline for {type(pipeline).__name__}"
    channels = getattr(getattr(pipeline, "transformer", None), "config", None)
    if kind == INPAINT and type(pipeline).__name__ == "StableDiffusion3Pipeline" and channels.in_channels not in SD3_INPAINT_CHANNELS:
        return f"diffusers' SD3 inpainting takes {' or '.join(map(str, SD3_INPAINT_CHANNELS))} latent channels; this model has {channels.in_channels}"
    return None


def run_edit(pipeline: Any, variant: Any, shape: BatchShape, requests: list[EditRequest]) -> list[Any]:
    """One batch of edits through the family's variant pipeline; each image from its own seed."""
    import torch

    from dreambooth_trainer.families import family_of_pipeline

    family = family_of_pipeline(pipeline)
    kwargs = family.call_kwargs(pipeline, [request.negative_prompt for request in requests], shape.guidance)
    kwargs.update(prompt=[request.prompt for request in requests], image=[request.image for request in requests],
                  strength=shape.strength, num_inference_steps=shape.steps, output_type="pil",
                  generator=[torch.Generator("cpu").manual_seed(request.seed) for request in requests],
                  height=shape.height, width=shape.width)
    if shape.kind == INPAINT:
        kwargs["mask_image"] = [request.mask for request in requests]
    accepted = inspect.signature(variant.__call__).parameters
    return list(variant(**{key: value for key, value in kwargs.items() if key in accepted}).images)


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
        self.variants: dict[str, Any] = {}  # edit kind -> the family's variant pipeline
        self.state = "loading"
        self.error: str | None = None
        self.failure: Exception | None = None
        self.batcher: MicroBatcher | None = None
        self.tasks: list[asyncio.Task] = []

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def error_class(self) -> str | None:
        """What the probes tell: the class of the load failure (paths and URIs stay in the log)."""
        return type(self.failure).__name__ if self.failure is not None else None

    @property
    def image_side(self) -> int:
        return self.family.native_side

    def run_batch(self, shape: BatchShape, requests: list, adapters: list[str]) -> list:
        """One denoiser batch on the generation thread; row i runs with adapters[i]. A row whose
        adapter cannot be loaded gets its AdapterError; the other rows are drawn."""
        failed = self.adapters.ensure_each(adapters, self.weights_file)
        for key, error in failed.items():
            log.warning("adapter cannot be loaded", extra={"model": self.adapters.label(key), "error": error.detail})
        rows = [index for index, adapter in enumerate(adapters) if adapter not in failed]
        results: list[Any] = [failed.get(adapter) for adapter in adapters]
        if rows:
            drawn = self.draw_rows(shape, [requests[i] for i in rows], [adapters[i] for i in rows])
            for index, image in zip(rows, drawn):
                results[index] = image
        return results

    def draw_rows(self, shape: BatchShape, requests: list, adapters: list[str]) -> list:
        """Each image from its own seed (SD: the trainer's batched sampler; others and edits: their pipeline)."""
        from dreambooth_trainer.generate import generate_images

        try:
            with self.adapters.routing(adapters):
                if shape.kind == GENERATE:
                    return generate_images(self.pipeline, requests, steps=shape.steps, guidance=shape.guidance,
                                           height=shape.height, width=shape.width)
                return run_edit(self.pipeline, self.variant(shape.kind), shape, requests)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            free_device_memory()
            raise OutOfMemory(f"{len(requests)} image(s) of {shape.width}x{shape.height} at {shape.steps} steps do not fit "
                              "in the device's memory; ask for fewer images, fewer steps or a smaller size") from None

    def variant(self, kind: str) -> Any:
        if kind not in self.variants:
            self.variants[kind] = edit_pipeline(self.pipeline, kind)
        return self.variants[kind]

    def stop_if_abandoned(self, *_: Any) -> None:
        """Forward pre-hook of the denoiser (once per denoising step): nobody waits, so stop."""
        if self.batcher is not None and self.batcher.chunk_abandoned():
            raise ChunkAbandoned("every caller of this batch went away")

    def weights_file(self, key: str) -> Path:
        return self.files.local_file(key, self.adapters.label(key) if self.adapters else key)

    async def adapter_for(self, model: str | None) -> str:
        """The adapter key (its URI; BASE for the base model) for a request's `model`
        (UnknownModel if none), its weights fetched to local disk off the generation thread.
        Loading onto the device happens in the request's batch: a failure there fails its rows only."""
        name = self.catalog.resolve(model)
        if name == BASE:
            return BASE
        uri = self.catalog.uri(name)
        if uri is None:
            from .catalog import UnknownModel

            raise UnknownModel(name, [card.id for card in self.catalog.cards()])
        self.adapters.labels[uri] = name
        if self.files.cached(uri) is None:
            await asyncio.to_thread(self.files.local_file, uri, name)
        return uri

    async def start(self) -> None:
        self.batcher = MicroBatcher(
            self.run_batch,
            max_batch=self.settings.max_batch,
            max_queue=self.settings.max_queue,
            max_wait_s=self.settings.max_wait_s,
            max_adapters=min(self.settings.max_adapters_per_batch, self.settings.max_resident_adapters),
            on_batch=self.metrics.observe_batch,
            on_queue_depth=self.metrics.queue_depth.set,
            retry_alone=lambda error: isinstance(error, OutOfMemory),
        )
        self.batcher.start()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.load_and_warm_up(), name="load-model")]
        if self.catalog.file is not None:
            self.tasks.append(loop.create_task(self.watch_registry(), name="watch-registry"))

    async def load_and_warm_up(self) -> None:
        import torch

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
            # Outside any compiled graph: the check reads the clock and the batcher.
            denoiser(self.pipeline).register_forward_pre_hook(torch.compiler.disable(self.stop_if_abandoned))
            self.state = "warming"
            shape = BatchShape(self.settings.warmup_steps, self.family.default_guidance, self.image_side, self.image_side)
            await self.batcher.submit(shape, [ImageRequest("warm-up", "", 0)])
        except Exception as error:  # the pod must say why it never gets ready (in its log)
            self.state, self.error, self.failure = "failed", f"{type(error).__name__}: {error}", error
            log.error("model failed to load", extra={"model": self.settings.model, "error": self.error})
            return
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("model ready", extra={"model": self.settings.model, "seconds": round(time.perf_counter() - started, 2)})

    async def watch_registry(self) -> None:
        """Follow the registry file: count what is registered, evict weights nothing names any more
        (an unregistered subject, or the old weights of a re-pointed one)."""
        while True:
            change = await asyncio.to_thread(self.catalog.refresh)
            self.metrics.models.set(len(self.catalog.cards()))
            if change.added or change.removed or change.changed:
                log.info("registry changed", extra={"added": sorted(change.added), "removed": sorted(change.removed),
                                                    "changed": sorted(change.changed)})
            if self.adapters is not None:
                named = self.catalog.uris()
                for key in [key for key in self.adapters.sizes if key not in named]:
                    await self.batcher.run_blocking(lambda key=key: self.adapters.evict(key))
            await asyncio.sleep(self.settings.registry_poll_s)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.batcher is not None:
            await self.batcher.close()
