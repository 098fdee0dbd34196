"""What every HTTP API does with a request once it is parsed: check it, admit it into the queue,
pick the adapter, wait for its batch while its client is still there, encode.

Each API turns the exceptions raised here into its own error shape.
"""
from __future__ import annotations

import asyncio
import io
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import HTTPException, Request

from .family import UnsupportedRequest
from .runtime import EDIT, INPAINT, EditRequest, ModelRuntime, edit_refusal
from .settings import MAX_BODY_BYTES, MAX_SEED

T = TypeVar("T")
# A client that sends nothing more but keeps its connection is polled this often (never spun on).
DISCONNECT_POLL_S = 0.1


class NotReady(RuntimeError):
    """The model is still loading or warming up, or it failed to load."""


class ClientGone(RuntimeError):
    """The client disconnected before its images were drawn; their work was dropped."""


@dataclass(frozen=True)
class EditInput:
    """What an edit starts from: one image (and mask) per drawn image, and how far to move from it."""

    images: list[Any]  # PIL RGB images, already at the drawn size
    masks: list[Any] | None  # PIL L images (white: paint here), or None for img2img
    strength: float

    @property
    def kind(self) -> str:
        return INPAINT if self.masks is not None else EDIT


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
    edit: EditInput | None = None
    fields: dict[str, str] = field(default_factory=dict)  # API field names: count, size, steps


@dataclass(frozen=True)
class Drawn:
    images: list[Any]  # PIL images, one per seed
    seeds: list[int]
    width: int
    height: int
    guidance: float


def seeds_from(first: int, count: int) -> list[int]:
    """Image i's seed: first + i, wrapping at the largest seed (every reported seed can be asked for)."""
    return [(first + index) % (MAX_SEED + 1) for index in range(count)]


def denoising_steps(order: DrawOrder) -> int:
    """Steps the denoiser actually runs: an edit starts part-way (strength of the steps)."""
    return max(1, round(order.steps * order.edit.strength)) if order.edit else order.steps


def check_budget(runtime: ModelRuntime, order: DrawOrder, width: int, height: int) -> None:
    """Refuse what no batch of this server may take: n × width × height × steps over the budget."""
    cost = order.count * width * height * denoising_steps(order)
    budget = runtime.settings.max_pixel_steps
    if cost > budget:
        names = order.fields
        raise UnsupportedRequest(names.get("count", "n"), (
            f"{names.get('count', 'n')} × {names.get('size', 'size')} × {names.get('steps', 'steps')} = {order.count} × {width}x{height} × "
            f"{denoising_steps(order)} = {cost} pixel-steps is more than this server draws for one request ({budget}, "
            "--max-pixel-steps): ask for fewer images, fewer steps or a smaller size"))


def check_edit_supported(runtime: ModelRuntime, order: DrawOrder) -> None:
    refusal = edit_refusal(runtime.pipeline, order.edit.kind) if order.edit else None
    if refusal:
        field = "mask" if order.edit.masks is not None else "image"
        raise UnsupportedRequest(field, f"{field}: this {runtime.family.name} model cannot be edited so: {refusal}")


async def draw(runtime: ModelRuntime, order: DrawOrder, request: Request | None = None) -> Drawn:
    """Images for `order`; raises NotReady, UnsupportedRequest (naming the field), UnknownModel,
    AdapterError, QueueFull, BatcherClosed, DeadlineExceeded, OutOfMemory, ClientGone (when
    `request`'s client disconnects first: its rows are not drawn)."""
    from .batcher import BatchShape

    if not runtime.ready:
        raise NotReady("model failed to load" if runtime.state == "failed" else f"model is {runtime.state}; retry shortly")
    deadline = time.monotonic() + runtime.settings.request_timeout_s
    family = runtime.family
    family.check(order.width, order.height, order.negative_prompt, order.fields.get("size"))
    width, height = order.width or family.native_side, order.height or family.native_side
    check_budget(runtime, order, width, height)
    check_edit_supported(runtime, order)
    guidance = family.default_guidance if order.guidance is None else order.guidance
    seeds = seeds_from(secrets.randbelow(MAX_SEED + 1) if order.seed is None else order.seed, order.count)
    if order.edit is None:
        shape = BatchShape(order.steps, guidance, width, height)
        requests = [EditRequest(order.prompt, order.negative_prompt, seed) for seed in seeds]
    else:
        shape = BatchShape(order.steps, guidance, width, height, order.edit.kind, order.edit.strength)
        masks = order.edit.masks or [None] * order.count
        requests = [EditRequest(order.prompt, order.negative_prompt, seed, image, mask)
                    for seed, image, mask in zip(seeds, order.edit.images, masks)]
    with runtime.batcher.admit() as admission:  # the queue's bound holds before anything is fetched
        adapter = await until_disconnected(request, runtime.adapter_for(order.model))
        images = await until_disconnected(request, runtime.batcher.submit(shape, requests, adapter, admission, deadline))
    return Drawn(images, seeds, width, height, guidance)


async def disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already: nothing else may arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def until_disconnected(request: Request | None, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (and `work` cancelled) when the client disconnects first."""
    task = asyncio.ensure_future(work)
    if request is None:
        return await task
    watcher = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone("the client disconnected")
    return task.result()


def client_gone_response() -> Any:
    """What a request whose client left gets (nobody reads it; logs and metrics count 499)."""
    from fastapi.responses import Response

    return Response(status_code=499)


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
