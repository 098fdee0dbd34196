"""The OpenAI Images API real clients speak: `POST /v1/images/generations`, `POST /v1/images/edits`
(img2img, and inpainting with a mask), `GET /v1/models`.

Point any OpenAI SDK at the server (`OpenAI(base_url="http://HOST:8080/v1", api_key=TOKEN)`);
`model` picks the subject. Request and response follow OpenAI's shapes; images come back as
`b64_json`, as `url` (a `data:` URL: the server keeps no images to link to), or both when
`response_format` is left out (clients written for either read theirs). Extensions, sent as extra
body fields: `negative_prompt`, `seed`, `steps` (or `num_inference_steps`), `guidance_scale` (or
`guidance`, `cfg_scale`), `width`/`height` (instead of `size`) and, for edits, `strength`. Errors
use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with the status codes the
SDKs turn into their exception classes (and retry only where retrying can help).
"""
from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from .adapters import AdapterError
from .batcher import BatcherClosed, DeadlineExceeded, QueueFull
from .catalog import UnknownModel
from .drawing import ClientGone, DrawOrder, Drawn, EditInput, NotReady, client_gone_response, draw, encode_all, read_body
from .family import UnsupportedRequest
from .fields import GuidanceScale, Seed, Side, StepCount, json_int
from .guard import require_media_type
from .multipart import FormPart, MultipartError, parse_multipart
from .pictures import PictureError, edit_input
from .runtime import ModelRuntime, OutOfMemory
from .settings import MAX_BODY_BYTES, MAX_EDIT_BODY_BYTES, MAX_SIDE

log = logging.getLogger("dreambooth.serve")
OPENAI_PREFIXES = ("/v1/images", "/v1/models")
SIZE_RE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# What each status means in OpenAI's error bodies (type, code) when a route does not say more.
ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
# Fields of other image servers that ask for what this one does not do (refused, naming why).
FOREIGN_FIELDS = {
    "sampler": "the server draws with the model's own scheduler",
    "sampler_name": "the server draws with the model's own scheduler",
    "scheduler": "the server draws with the model's own scheduler",
}
UNSUPPORTED = {
    "stream": "stream is not supported: images come back whole",
    "partial_images": "partial_images needs stream, which is not supported",
    "frame_count": "frame_count: animations are not supported",
    "frame_duration_ms": "frame_duration_ms: animations are not supported",
    "svg": "svg: vector output is not supported",
}
MARKUP_REFUSAL = "markup is not supported: give a mask (transparent where to paint)"


class OpenAIError(HTTPException):
    """An error answered in OpenAI's shape, naming the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.param, self.code = param, code


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def openai_error_body(error: HTTPException, code: str | None = None) -> dict[str, Any]:
    kind, default_code = ERROR_KINDS.get(error.status_code, ("server_error", None))
    return {"error": {
        "message": str(error.detail),
        "type": kind,
        "param": getattr(error, "param", None),
        "code": code or getattr(error, "code", None) or default_code,
    }}


def openai_error_response(error: HTTPException) -> JSONResponse:
    return JSONResponse(openai_error_body(error), status_code=error.status_code, headers=error.headers)


class ImageOptions(BaseModel):
    """What generations and edits share: OpenAI's fields, then our extensions. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    prompt: str = Field(min_length=1, max_length=4000, description="What to draw.")
    model: str | None = Field(None, min_length=1, max_length=200, description="The subject (a model id from GET /v1/models); the base model when omitted.")
    n: json_int(ge=1, le=10) | None = Field(1, description="Images to draw (null: 1); image i uses seed + i.")
    size: str | None = Field("auto", max_length=11, description="`WxH` in pixels, each a multiple of 8 (16 for SD3 and Flux) up to twice the model's size (at least 1024), or `auto` (the model's size; for edits the image's). Extension: `width` and `height` instead.")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json, or url (a data: URL); both when omitted.")
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = Field(None, description="png (default), jpeg or webp.")
    output_compression: json_int(ge=0, le=100) | None = Field(None, description="Quality 0-100 for jpeg and webp.")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"] | None = Field(None, description="Accepted, no effect (steps set the effort).")
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description="auto or opaque; transparent is refused.")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted, no effect.")
    user: str | None = Field(None, max_length=256, description="Accepted, not stored.")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted, not stored.")
    stream: bool | None = Field(None, description="Refused when true.")
    partial_images: json_int(ge=0, le=3) | None = Field(None, description="Refused (only with stream).")
    frame_count: json_int(ge=1) | None = Field(None, description="Refused above 1 (no animations).")
    frame_duration_ms: json_int(ge=0) | None = Field(None, description="Refused (no animations).")
    svg: dict[str, Any] | None = Field(None, description="Refused (no vector output).")
    negative_prompt: str = Field("", max_length=2000, description="Extension: what to avoid.")
    seed: Seed | None = Field(None, description="Extension: image i uses seed + i (wrapping at 4294967295); random when omitted.")
    steps: StepCount = Field(25, validation_alias=AliasChoices("steps", "num_inference_steps"), description="Extension: denoising steps (alias num_inference_steps).")
    guidance_scale: GuidanceScale | None = Field(None, validation_alias=AliasChoices("guidance_scale", "guidance", "cfg_scale"), description="Extension: classifier-free guidance (aliases guidance, cfg_scale); for Flux the distilled guidance; the family's default when omitted.")
    width: Side | None = Field(None, description="Extension: pixels, instead of size.")
    height: Side | None = Field(None, description="Extension: pixels, instead of size.")
    sampler: str | None = Field(None, description="Refused: the model's own scheduler draws.")
    sampler_name: str | None = Field(None, description="Refused: the model's own scheduler draws.")
    scheduler: str | None = Field(None, description="Refused: the model's own scheduler draws.")


class ImageGenerationBody(ImageOptions):
    """OpenAI's image generation parameters, plus our extensions (JSON, strict types)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted, no effect.")
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted, no effect.")


class ImageEditBody(ImageOptions):
    """OpenAI's image edit parameters besides the files (form fields: numbers arrive as text)."""

    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted, no effect (strength sets how far the edit moves).")
    strength: float | None = Field(None, gt=0, le=1, description="Extension: how much of the image is redrawn, 0-1 (img2img 0.8, inpainting 1.0 by default).")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = Field(None, description="A data: URL of the image.")
    seed: int = Field(description="Extension: the seed this image was drawn from.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    background: str = "opaque"


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


def validation_failure(error: ValidationError) -> OpenAIError:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"] if first["type"] != "extra_forbidden" else "unrecognized request argument"
    return OpenAIError(400, f"{field}: {message}" if field else f"the body is not a JSON object of image parameters: {message}",
                       param=field)


def parse_image_body(raw: bytes) -> ImageGenerationBody:
    try:
        return ImageGenerationBody.model_validate_json(raw)
    except ValidationError as error:
        raise validation_failure(error) from None


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


def requested_sides(body: ImageOptions) -> tuple[int | None, int | None]:
    """The size asked for: `size`, or the width/height extension (not both)."""
    width, height = parse_size(body.size)
    if body.width is None and body.height is None:
        return width, height
    if width is not None:
        raise OpenAIError(400, "give size or width/height, not both", param="size", code="unsupported_value")
    return body.width, body.height


def check_supported(body: ImageOptions) -> None:
    """Refuse what is asked for but not done, naming the field (accepted fields with no effect pass)."""
    for name, message in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value and not (name == "frame_count" and value == 1):
            raise OpenAIError(400, message, param=name, code="unsupported_value")
    for name, why in FOREIGN_FIELDS.items():
        if getattr(body, name) is not None:
            raise OpenAIError(400, f"{name} is not supported: {why}", param=name, code="unsupported_value")
    if body.background == "transparent":
        raise OpenAIError(400, "background 'transparent' is not supported", param="background", code="unsupported_value")
    if body.output_format in ("gif", "svg"):
        raise OpenAIError(400, f"output_format {body.output_format!r} is not supported: png, jpeg or webp",
                          param="output_format", code="unsupported_value")


def order_from(body: ImageOptions, edit: EditInput | None = None, sides: tuple[int | None, int | None] | None = None) -> DrawOrder:
    width, height = sides if sides is not None else requested_sides(body)
    return DrawOrder(body.model, body.prompt, body.negative_prompt, body.n or 1, body.steps, body.guidance_scale,
                     body.seed, width, height, edit, {"count": "n", "size": "size", "steps": "steps"})


async def draw_for_openai(runtime: ModelRuntime, order: DrawOrder, request: Request) -> Drawn:
    """`draw`, its failures as OpenAI errors: 4xx for what a retry cannot change, 429/503 with
    Retry-After for what it can. ClientGone passes through (nobody reads the answer)."""
    try:
        return await draw(runtime, order, request)
    except UnsupportedRequest as error:
        raise OpenAIError(400, str(error), param=error.field, code="unsupported_value") from None
    except NotReady as error:
        raise OpenAIError(503, str(error), code="model_not_ready", headers={"Retry-After": "5"}) from None
    except UnknownModel as error:
        raise OpenAIError(404, str(error), param="model", code="model_not_found") from None
    except QueueFull as error:
        raise OpenAIError(429, str(error), headers={"Retry-After": "1"}) from None
    except DeadlineExceeded as error:
        raise OpenAIError(503, str(error), code="timeout", headers={"Retry-After": "5"}) from None
    except OutOfMemory as error:
        raise OpenAIError(400, str(error), param="n", code="insufficient_device_memory") from None
    except (BatcherClosed, AdapterError) as error:
        raise OpenAIError(503, str(error)) from None
    except ClientGone:
        raise
    except Exception as error:  # never a plain-text 500: the SDKs read OpenAI's error body
        log.exception("request failed", extra={"error": type(error).__name__})
        raise OpenAIError(500, f"internal error ({type(error).__name__}); the server log has the details", code="internal_error") from None


async def images_answer(drawn: Drawn, body: ImageOptions) -> JSONResponse:
    image_format = body.output_format or "png"
    encoded = await encode_all(drawn.images, image_format, body.output_compression)
    wanted = (body.response_format,) if body.response_format else ("b64_json", "url")
    data = []
    for seed, image in zip(drawn.seeds, encoded):
        text = base64.b64encode(image).decode()
        data.append(ImageData(seed=seed, b64_json=text if "b64_json" in wanted else None,
                              url=f"data:image/{image_format};base64,{text}" if "url" in wanted else None))
    result = ImagesResponse(created=int(time.time()), data=data, output_format=image_format, size=f"{drawn.width}x{drawn.height}")
    return JSONResponse(result.model_dump(exclude_none=True))


SIDES = "|".join(str(side) for side in range(8, MAX_SIDE + 1, 8))


def published_body_schema(model: type[ImageOptions]) -> dict[str, Any]:
    """The body schema /openapi.json shows: only what is accepted. (The parser also knows
    OpenAI's other values and other servers' fields, to refuse them with a message that says why.)"""
    schema = model.model_json_schema()
    fields = schema["properties"]
    fields["size"] = {**fields["size"], "anyOf": [{"type": "string", "pattern": f"^(auto|({SIDES})x({SIDES}))$"}, {"type": "null"}]}
    fields["background"] = {**fields["background"], "anyOf": [{"enum": ["auto", "opaque"], "type": "string"}, {"type": "null"}]}
    fields["output_format"] = {**fields["output_format"], "anyOf": [{"enum": ["png", "jpeg", "webp"], "type": "string"}, {"type": "null"}]}
    fields["stream"] = {**fields["stream"], "anyOf": [{"const": False, "type": "boolean"}, {"type": "null"}]}
    fields["frame_count"] = {**fields["frame_count"], "anyOf": [{"const": 1, "type": "integer"}, {"type": "null"}]}
    # Aliases (num_inference_steps, guidance, cfg_scale) and width/height (size's other form) stay in the descriptions only.
    for hidden in ("partial_images", "frame_duration_ms", "svg", "width", "height", *FOREIGN_FIELDS):
        fields.pop(hidden)
    return schema


def edit_form_schema() -> dict[str, Any]:
    schema = published_body_schema(ImageEditBody)
    schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "The image to edit (PNG, JPEG or WebP); one."},
        "mask": {"type": "string", "format": "binary", "description": "Where to paint: transparent pixels (or white, in a mask without alpha). The image's size."},
        **schema["properties"],
    }
    schema["required"] = ["image", "prompt"]
    return schema


def model_objects(runtime: ModelRuntime) -> list[ModelObject]:
    return [ModelObject(id=card.id, created=card.created, owned_by=card.owned_by) for card in runtime.catalog.cards()]


def edit_body_from(parts: list[FormPart]) -> tuple[ImageEditBody, FormPart, FormPart | None]:
    """The form's fields as an ImageEditBody, and its image and mask files."""
    files = {name: [part for part in parts if part.name == name] for name in ("image", "image[]", "mask")}
    images = files["image"] + files["image[]"]
    if len(images) != 1:
        raise OpenAIError(400, "image: give exactly one image to edit" + (f" (got {len(images)})" if images else ""), param="image")
    if len(files["mask"]) > 1:
        raise OpenAIError(400, "mask: give at most one mask", param="mask")
    fields: dict[str, Any] = {}
    for part in parts:
        if part.name in files:
            continue
        if part.name == "markup":  # the SDK sends it as a file
            raise OpenAIError(400, MARKUP_REFUSAL, param="markup", code="unsupported_value")
        if part.filename is not None:
            raise OpenAIError(400, f"{part.name}: a file where a value was expected", param=part.name)
        fields[part.name] = part.text()
    try:
        body = ImageEditBody.model_validate(fields)
    except ValidationError as error:
        raise validation_failure(error) from None
    return body, images[0], (files["mask"] or [None])[0]


ERRORS = {"model": ErrorBody}
COMMON_ERRORS = {
    401: {**ERRORS, "description": "A token is set on the server and this one is missing or wrong."},
    404: {**ERRORS, "description": "`model` names no model of this server (code model_not_found)."},
    415: {**ERRORS, "description": "The body is not of the content type this path takes."},
    429: {**ERRORS, "description": "The queue is full; retry later (Retry-After)."},
    500: {**ERRORS, "description": "An unexpected error (code internal_error); the server log has the details."},
    503: {**ERRORS, "description": "The model is loading or failed to load, an adapter cannot be loaded, the request was not drawn within the server's deadline (code timeout), or the server is stopping."},
}


def openai_router(runtime: ModelRuntime, auth: list[Callable[..., Any]]) -> APIRouter:
    router = APIRouter(tags=["OpenAI Images API"], dependencies=[Depends(check) for check in auth])

    @router.post(
        "/v1/images/generations",
        summary="Create images (OpenAI Images API)",
        response_model=ImagesResponse,
        responses={
            400: {**ERRORS, "description": "A parameter is missing, unknown, out of range or not supported, the request is over "
                                           "the server's compute budget, or it does not fit in the device's memory (`param` names it)."},
            413: {**ERRORS, "description": f"The body is larger than {MAX_BODY_BYTES} bytes."},
            **COMMON_ERRORS,
        },
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": published_body_schema(ImageGenerationBody)}}}},
    )
    async def create_images(request: Request) -> Response:
        require_media_type(request, "application/json")
        body = parse_image_body(await read_body(request))
        check_supported(body)
        try:
            drawn = await draw_for_openai(runtime, order_from(body), request)
        except ClientGone:
            return client_gone_response()
        return await images_answer(drawn, body)

    @router.post(
        "/v1/images/edits",
        summary="Edit an image (OpenAI Images API): img2img, or inpainting with a mask",
        response_model=ImagesResponse,
        responses={
            400: {**ERRORS, "description": "A field or file is missing, unknown, unreadable, out of range or not supported, or the model's family has no such pipeline (`param` names it)."},
            413: {**ERRORS, "description": f"The body is larger than {MAX_EDIT_BODY_BYTES} bytes."},
            **COMMON_ERRORS,
        },
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": edit_form_schema()}}}},
    )
    async def edit_images(request: Request) -> Response:
        require_media_type(request, "multipart/form-data")
        raw = await read_body(request, MAX_EDIT_BODY_BYTES)
        try:
            parts = parse_multipart(request.headers["content-type"], raw)
        except MultipartError as error:
            raise OpenAIError(400, str(error)) from None
        body, image, mask = edit_body_from(parts)
        check_supported(body)
        if not runtime.ready:
            raise OpenAIError(503, f"model is {runtime.state}; retry shortly", code="model_not_ready", headers={"Retry-After": "5"})
        try:
            edit, sides = edit_input(image.data, mask.data if mask else None, requested_sides(body), body.n or 1, body.strength, runtime.family)
        except PictureError as error:
            raise OpenAIError(400, str(error), param=error.field, code="invalid_image") from None
        try:
            drawn = await draw_for_openai(runtime, order_from(body, edit, sides), request)
        except ClientGone:
            return client_gone_response()
        return await images_answer(drawn, body)

    @router.post("/v1/images/variations", summary="Variations (not supported)", responses={400: {**ERRORS, "description": "Always."}})
    async def create_variations() -> JSONResponse:
        raise OpenAIError(400, "image variations are not supported: POST /v1/images/edits with the image and a prompt "
                               "(and strength) draws it again with the subject", code="unsupported_endpoint")

    @router.get("/v1/models", summary="List models (base + adapters)", response_model=ModelList,
                responses={401: COMMON_ERRORS[401]})
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=model_objects(runtime)).model_dump())

    @router.get("/v1/models/{model:path}", summary="Retrieve a model", response_model=ModelObject,
                responses={401: COMMON_ERRORS[401], 404: {**ERRORS, "description": "No such model on this server."}})
    async def retrieve_model(model: str) -> JSONResponse:
        runtime.catalog.refresh()
        found = next((item for item in model_objects(runtime) if item.id == model), None)
        if found is None:
            raise OpenAIError(404, f"the model {model!r} does not exist on this server", param="model", code="model_not_found")
        return JSONResponse(found.model_dump())

    return router
