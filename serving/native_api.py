"""`POST /v1/generate`: our own JSON API (one image answers the PNG itself, several answer JSON)."""
from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .adapters import AdapterError
from .batcher import BatcherClosed, DeadlineExceeded, QueueFull
from .catalog import UnknownModel
from .drawing import ClientGone, DrawOrder, Drawn, NotReady, client_gone_response, draw, encode_all, read_body
from .family import UnsupportedRequest
from .fields import GuidanceScale, Seed, Side, StepCount, json_int
from .guard import require_media_type
from .runtime import ModelRuntime, OutOfMemory
from .settings import MAX_BODY_BYTES

log = logging.getLogger("dreambooth.serve")
ImageCount = json_int(ge=1, le=8)
FIELD_NAMES = {"count": "num_images", "steps": "steps"}


class GenerateBody(BaseModel):
    """One generation request. Unknown fields and wrong types are refused (strict)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=2000, description="What to draw.")
    negative_prompt: str = Field("", max_length=2000, description="What to avoid (not for Flux: its guidance is distilled).")
    model: str | None = Field(None, min_length=1, max_length=200, description="Which model or subject (GET /v1/models); the server's base model when omitted.")
    num_images: ImageCount = Field(1, description="1 answers image/png; more answer JSON.")
    steps: StepCount = Field(25, description="Denoising steps.")
    guidance_scale: GuidanceScale | None = Field(
        None, description="Classifier-free guidance (≤ 1 turns it off); for Flux, the distilled guidance. The family's default when omitted (SD 7.5, SDXL 5, SD3 7, Flux 3.5).")
    seed: Seed | None = Field(None, description="Image i uses seed + i (wrapping at 4294967295); random when omitted.")
    width: Side | None = Field(None, description="Pixels, a multiple of 8 (16 for SD3 and Flux) up to twice the model's size (at least 1024); the model's size when omitted.")
    height: Side | None = Field(None, description="Pixels, a multiple of 8 (16 for SD3 and Flux) up to twice the model's size (at least 1024); the model's size when omitted.")


def parse_generate_body(raw: bytes) -> GenerateBody:
    """Validate the raw body ourselves: bad JSON, bad UTF-8 or a bad field all become a 422."""
    try:
        return GenerateBody.model_validate_json(raw)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


class GeneratedImage(BaseModel):
    seed: int
    png_base64: str


class GenerateResult(BaseModel):
    images: list[GeneratedImage]
    width: int
    height: int
    steps: int
    guidance_scale: float


class ErrorMessage(BaseModel):
    detail: str


class FieldError(BaseModel):
    type: str
    loc: list[str | int] = Field(description="Where: ['body', field], or ['body'] for the body as a whole.")
    msg: str


class InvalidRequest(BaseModel):
    detail: list[FieldError]


async def draw_for_native(runtime: ModelRuntime, order: DrawOrder, request: Request) -> Drawn:
    """`draw`, its failures as this API's answers (422 naming the field for what a retry cannot
    change). ClientGone passes through."""
    try:
        return await draw(runtime, order, request)
    except UnsupportedRequest as error:
        raise RequestValidationError([{"type": "unsupported_by_model", "loc": ("body", error.field), "msg": str(error)}]) from None
    except OutOfMemory as error:
        raise RequestValidationError([{"type": "out_of_memory", "loc": ("body",), "msg": str(error)}]) from None
    except NotReady as error:
        raise HTTPException(503, str(error), headers={"Retry-After": "5"}) from None
    except UnknownModel as error:
        raise HTTPException(404, str(error)) from None
    except QueueFull as error:
        raise HTTPException(429, str(error), headers={"Retry-After": "1"}) from None
    except DeadlineExceeded as error:
        raise HTTPException(503, str(error), headers={"Retry-After": "5"}) from None
    except (BatcherClosed, AdapterError) as error:
        raise HTTPException(503, str(error)) from None
    except ClientGone:
        raise
    except Exception as error:
        log.exception("request failed", extra={"error": type(error).__name__})
        raise HTTPException(500, f"internal error ({type(error).__name__}); the server log has the details") from None


def validation_errors(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; the offending input is not echoed (it may be NaN or huge)."""
    detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


SEED_HEADER = {"X-Seed": {"description": "The seed of the image", "schema": {"type": "integer"}}}


def generate_router(runtime: ModelRuntime, auth: list[Callable[..., Any]]) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/generate",
        summary="Generate images",
        response_model=GenerateResult,
        dependencies=[Depends(check) for check in auth],
        responses={
            200: {
                "description": "One image: the PNG itself (seed in X-Seed). Several: JSON with base64 PNGs and seeds.",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "headers": SEED_HEADER,
            },
            401: {"model": ErrorMessage, "description": "A token is set on the server and this one is missing or wrong."},
            404: {"model": ErrorMessage, "description": "`model` names no model of this server."},
            413: {"model": ErrorMessage, "description": f"The body is larger than {MAX_BODY_BYTES} bytes."},
            415: {"model": ErrorMessage, "description": "The body is not declared application/json."},
            422: {"model": InvalidRequest, "description": "The body is not JSON, or a field is unknown, of the wrong type, out of range, or not supported by the model's family; or the request is over the server's compute budget or does not fit in the device's memory."},
            429: {"model": ErrorMessage, "description": "The queue is full; retry later."},
            500: {"model": ErrorMessage, "description": "An unexpected error; the server log has the details."},
            503: {"model": ErrorMessage, "description": "The model is still loading, failed to load, an adapter cannot be loaded, the request was not drawn within the server's deadline, or the server is stopping."},
        },
        # The body is parsed by parse_generate_body (so even non-JSON bytes give a 422); the
        # spec still shows its schema.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": GenerateBody.model_json_schema()}},
            }
        },
    )
    async def generate(request: Request) -> Response:
        require_media_type(request, "application/json")
        body = parse_generate_body(await read_body(request))
        order = DrawOrder(body.model, body.prompt, body.negative_prompt, body.num_images, body.steps,
                          body.guidance_scale, body.seed, body.width, body.height, fields=FIELD_NAMES)
        try:
            drawn = await draw_for_native(runtime, order, request)
        except ClientGone:
            return client_gone_response()
        pngs = await encode_all(drawn.images)
        if body.num_images == 1:
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(drawn.seeds[0])})
        result = GenerateResult(
            images=[GeneratedImage(seed=s, png_base64=base64.b64encode(p).decode()) for s, p in zip(drawn.seeds, pngs)],
            width=drawn.width, height=drawn.height, steps=body.steps, guidance_scale=drawn.guidance,
        )
        return JSONResponse(result.model_dump())

    return router
