"""The OpenAI Images API subset real clients speak: `POST /v1/images/generations`, `GET /v1/models`.

Point any OpenAI SDK at the server (`OpenAI(base_url="http://HOST:8080/v1", api_key=TOKEN)`);
`model` picks the subject. Request and response follow OpenAI's shapes; images come back as
`b64_json` only (`url` is refused: the server keeps no images to link to). Extensions, sent as
extra body fields: `negative_prompt`, `seed`, `steps` (or `num_inference_steps`) and
`guidance_scale` (or `guidance`). Errors use OpenAI's body, `{"error": {"message", "type",
"param", "code"}}`, with the status codes the SDKs turn into their exception classes.
"""
from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from .adapters import AdapterError
from .batcher import BatcherClosed, QueueFull
from .catalog import UnknownModel
from .drawing import DrawOrder, NotReady, draw, encode_all, read_body
from .family import UnsupportedRequest
from .fields import GuidanceScale, Seed, StepCount, json_int
from .runtime import ModelRuntime
from .settings import MAX_BODY_BYTES, MAX_SIDE

OPENAI_PREFIXES = ("/v1/images", "/v1/models")
SIZE_RE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# What each status means in OpenAI's error bodies (type, code) when a route does not say more.
ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class OpenAIError(HTTPException):
    """An error answered in OpenAI's shape, naming the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.param, self.code = param, code


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def openai_error_response(error: HTTPException) -> JSONResponse:
    kind, code = ERROR_KINDS.get(error.status_code, ("server_error", None))
    body = {
        "message": str(error.detail),
        "type": kind,
        "param": getattr(error, "param", None),
        "code": getattr(error, "code", None) or code,
    }
    return JSONResponse({"error": body}, status_code=error.status_code, headers=error.headers)


class ImageGenerationBody(BaseModel):
    """OpenAI's image generation parameters, plus our extensions. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    prompt: str = Field(min_length=1, max_length=4000, description="What to draw.")
    model: str | None = Field(None, min_length=1, max_length=200, description="The subject (a model id from GET /v1/models); the base model when omitted.")
    n: json_int(ge=1, le=10) = Field(1, description="Images to draw; image i uses seed + i.")
    size: str | None = Field("auto", max_length=11, description="`WxH` in pixels, each a multiple of 8 (16 for SD3 and Flux) up to twice the model's size (at least 1024), or `auto` (the model's size).")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json only: the server keeps no images to link to.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image encoding (png by default).")
    output_compression: json_int(ge=0, le=100) | None = Field(None, description="Quality 0-100 for jpeg and webp.")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(None, description="Accepted, no effect (steps set the effort).")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted, no effect.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description="auto or opaque; transparent is refused.")
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted, no effect.")
    user: str | None = Field(None, max_length=256, description="Accepted, not stored.")
    stream: bool | None = Field(None, description="Streaming is refused.")
    partial_images: json_int(ge=0, le=3) | None = Field(None, description="Only with stream, which is refused.")
    negative_prompt: str = Field("", max_length=2000, description="Extension: what to avoid.")
    seed: Seed | None = Field(None, description="Extension: image i uses seed + i; random when omitted.")
    steps: StepCount = Field(25, validation_alias=AliasChoices("steps", "num_inference_steps"), description="Extension: denoising steps (alias num_inference_steps).")
    guidance_scale: GuidanceScale | None = Field(None, validation_alias=AliasChoices("guidance_scale", "guidance"), description="Extension: classifier-free guidance (alias guidance); for Flux the distilled guidance; the family's default when omitted.")


class ImageData(BaseModel):
    b64_json: str
    seed: int = Field(description="Extension: the seed this image was drawn from.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorObject


def parse_image_body(raw: bytes) -> ImageGenerationBody:
    try:
        return ImageGenerationBody.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"] if first["type"] != "extra_forbidden" else "unrecognized request argument"
        raise OpenAIError(400, f"{field}: {message}" if field else f"the body is not a JSON object of image parameters: {message}",
                          param=field) from None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """`WxH` -> (W, H); None or auto -> the model's size."""
    if size in (None, "auto"):
        return None, None
    match = SIZE_RE.match(size)
    sides = [int(side) for side in match.groups()] if match else []
    if not sides or any(side < 8 or side > MAX_SIDE or side % 8 for side in sides):
        raise OpenAIError(400, f"size {size!r} is not supported: give WxH with each side a multiple of 8 from 8 to {MAX_SIDE}, or auto",
                          param="size", code="invalid_size")
    return sides[0], sides[1]


def check_supported(body: ImageGenerationBody) -> None:
    if body.response_format == "url":
        raise OpenAIError(400, "response_format 'url' is not supported: this server keeps no images to link to; use b64_json",
                          param="response_format", code="unsupported_value")
    if body.stream:
        raise OpenAIError(400, "stream is not supported: images come back whole", param="stream", code="unsupported_value")
    if body.background == "transparent":
        raise OpenAIError(400, "background 'transparent' is not supported", param="background", code="unsupported_value")


SIDES = "|".join(str(side) for side in range(8, MAX_SIDE + 1, 8))


def published_body_schema() -> dict[str, Any]:
    """The body schema /openapi.json shows: only what is accepted. (The parser also knows
    OpenAI's other values, to refuse them with a message that says why.)"""
    schema = ImageGenerationBody.model_json_schema()
    fields = schema["properties"]
    fields["size"] = {**fields["size"], "anyOf": [{"type": "string", "pattern": f"^(auto|({SIDES})x({SIDES}))$"}, {"type": "null"}]}
    fields["response_format"] = {**fields["response_format"], "anyOf": [{"enum": ["b64_json"], "type": "string"}, {"type": "null"}]}
    fields["background"] = {**fields["background"], "anyOf": [{"enum": ["auto", "opaque"], "type": "string"}, {"type": "null"}]}
    fields["stream"] = {**fields["stream"], "anyOf": [{"const": False, "type": "boolean"}, {"type": "null"}]}
    fields.pop("partial_images")  # aliases (num_inference_steps, guidance) stay in the descriptions only: one name each
    return schema


def model_objects(runtime: ModelRuntime) -> list[ModelObject]:
    return [ModelObject(id=card.id, created=card.created, owned_by=card.owned_by) for card in runtime.catalog.cards()]


ERRORS = {"model": ErrorBody}


def openai_router(runtime: ModelRuntime, auth: list[Callable[..., Any]]) -> APIRouter:
    router = APIRouter(tags=["OpenAI Images API"], dependencies=[Depends(check) for check in auth])

    @router.post(
        "/v1/images/generations",
        summary="Create images (OpenAI Images API)",
        response_model=ImagesResponse,
        responses={
            400: {**ERRORS, "description": "A parameter is missing, unknown, out of range or not supported (`param` names it)."},
            401: {**ERRORS, "description": "A token is set on the server and this one is missing or wrong."},
            404: {**ERRORS, "description": "`model` names no model of this server (code model_not_found)."},
            413: {**ERRORS, "description": f"The body is larger than {MAX_BODY_BYTES} bytes."},
            429: {**ERRORS, "description": "The queue is full; retry later (Retry-After)."},
            503: {**ERRORS, "description": "The model is loading or failed to load, an adapter cannot be loaded, or the server is stopping."},
        },
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": published_body_schema()}}}},
    )
    async def create_images(request: Request) -> JSONResponse:
        body = parse_image_body(await read_body(request))
        check_supported(body)
        width, height = parse_size(body.size)
        order = DrawOrder(body.model, body.prompt, body.negative_prompt, body.n, body.steps, body.guidance_scale,
                          body.seed, width, height)
        try:
            drawn = await draw(runtime, order, size_field="size")
        except UnsupportedRequest as error:
            raise OpenAIError(400, str(error), param=error.field, code="unsupported_value") from None
        except NotReady as error:
            raise OpenAIError(503, str(error), code="model_not_ready", headers={"Retry-After": "5"}) from None
        except UnknownModel as error:
            raise OpenAIError(404, str(error), param="model", code="model_not_found") from None
        except QueueFull as error:
            raise OpenAIError(429, str(error), headers={"Retry-After": "1"}) from None
        except (BatcherClosed, AdapterError) as error:
            raise OpenAIError(503, str(error)) from None
        image_format = body.output_format or "png"
        encoded = await encode_all(drawn.images, image_format, body.output_compression)
        result = ImagesResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=base64.b64encode(data).decode(), seed=seed) for seed, data in zip(drawn.seeds, encoded)],
            output_format=image_format, size=f"{drawn.width}x{drawn.height}",
        )
        return JSONResponse(result.model_dump())

    @router.get("/v1/models", summary="List models (base + adapters)", response_model=ModelList,
                responses={401: {**ERRORS, "description": "A token is set and this one is missing or wrong."}})
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=model_objects(runtime)).model_dump())

    @router.get("/v1/models/{model:path}", summary="Retrieve a model", response_model=ModelObject,
                responses={401: {**ERRORS, "description": "A token is set and this one is missing or wrong."},
                           404: {**ERRORS, "description": "No such model on this server."}})
    async def retrieve_model(model: str) -> JSONResponse:
        runtime.catalog.refresh()
        found = next((item for item in model_objects(runtime) if item.id == model), None)
        if found is None:
            raise OpenAIError(404, f"the model {model!r} does not exist on this server", param="model", code="model_not_found")
        return JSONResponse(found.model_dump())

    return router
