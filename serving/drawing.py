"""What both HTTP APIs do with a request once it is parsed: pick the adapter, queue, encode.

Each API turns the exceptions raised here into its own error shape.
"""
from __future__ import annotations

import asyncio
import io
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from .runtime import ModelRuntime
from .settings import MAX_BODY_BYTES, MAX_SEED


class NotReady(RuntimeError):
    """The model is still loading or warming up, or it failed to load."""


@dataclass(frozen=True)
class DrawOrder:
    model: str | None
    prompt: str
    negative_prompt: str
    count: int
    steps: int
    guidance: float | None  # None: the family's default
    seed: int | None
    width: int | None
    height: int | None


@dataclass(frozen=True)
class Drawn:
    images: list[Any]  # PIL images, one per seed
    seeds: list[int]
    width: int
    height: int
    guidance: float


async def draw(runtime: ModelRuntime, order: DrawOrder, size_field: str | None = None) -> Drawn:
    """Images for `order`; raises NotReady, UnsupportedRequest (naming the field, `size_field` for
    both sides when they came as one), UnknownModel, AdapterError, QueueFull, BatcherClosed."""
    from dreambooth_trainer.generate import ImageRequest

    from .batcher import BatchShape

    if not runtime.ready:
        raise NotReady("model failed to load" if runtime.state == "failed" else f"model is {runtime.state}; retry shortly")
    family = runtime.family
    family.check(order.width, order.height, order.negative_prompt, size_field)
    adapter = await runtime.adapter_for(order.model)
    width, height = order.width or family.native_side, order.height or family.native_side
    guidance = family.default_guidance if order.guidance is None else order.guidance
    first_seed = secrets.randbelow(MAX_SEED + 1) if order.seed is None else order.seed
    seeds = [first_seed + index for index in range(order.count)]
    requests = [ImageRequest(order.prompt, order.negative_prompt, seed) for seed in seeds]
    images = await runtime.batcher.submit(BatchShape(order.steps, guidance, width, height), requests, adapter)
    return Drawn(images, seeds, width, height, guidance)


def encode_image(image: Any, image_format: str = "png", quality: int | None = None) -> bytes:
    """PNG (lossless), JPEG or WebP bytes; `quality` 0-100 for the lossy two."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=image_format.upper(), quality=100 if quality is None else quality)
    return buffer.getvalue()


async def encode_all(images: list[Any], image_format: str = "png", quality: int | None = None) -> list[bytes]:
    return await asyncio.to_thread(lambda: [encode_image(image, image_format, quality) for image in images])


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
