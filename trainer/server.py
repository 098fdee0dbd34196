"""The inference server: POST /v1/generate, a web page at /, probes and Prometheus metrics.

`create_app(settings)` builds the FastAPI app (tests drive it in-process); `run_server(...)` is
what `dreambooth serve` calls. Weights load in the background, so /healthz answers at once and
/readyz turns ready only after the weights are loaded AND one warm-up image has been made.
Concurrent requests of the same shape share one UNet batch (see batcher.py).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .batcher import BatcherClosed, BatchShape, MicroBatcher, QueueFull

log = logging.getLogger("dreambooth.serve")

TOKEN_ENV = "DREAMBOOTH_API_TOKEN"
MAX_SEED = 2**32 - 1
MAX_BODY_BYTES = 64 * 1024
KNOWN_PATHS = {"/", "/v1/generate", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}


@dataclass(frozen=True)
class ServerSettings:
    """Everything `create_app` needs; `run_server` fills it from the CLI and the env."""

    model: str = "tiny"
    device: str = "auto"
    max_batch: int = 8
    max_queue: int = 64
    max_wait_s: float = 0.02
    lora: str | None = None
    compile: bool = False
    api_token: str | None = None
    warmup_steps: int = 2


def api_token_from_env() -> str | None:
    """The bearer token from DREAMBOOTH_API_TOKEN; None (open server) when unset or empty."""
    return os.environ.get(TOKEN_ENV) or None


# ---- HTTP bodies -------------------------------------------------------------------------


def integral_number(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; strings and booleans still fail the strict check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An int with bounds; the bounds come before the validator so the JSON schema keeps them."""
    return Annotated[int, Field(**bounds), BeforeValidator(integral_number)]


Seed = json_int(ge=0, le=MAX_SEED)
Side = json_int(ge=8, le=1024, multiple_of=8)
ImageCount = json_int(ge=1, le=8)
StepCount = json_int(ge=1, le=150)


class GenerateBody(BaseModel):
    """One generation request. Unknown fields and wrong types are refused (strict)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=2000, description="What to draw.")
    negative_prompt: str = Field("", max_length=2000, description="What to avoid.")
    num_images: ImageCount = Field(1, description="1 answers image/png; more answer JSON.")
    steps: StepCount = Field(25, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, le=30, description="Classifier-free guidance; ≤ 1 turns it off.")
    seed: Seed | None = Field(None, description="Image i uses seed + i; random when omitted.")
    width: Side | None = Field(None, description="Pixels, a multiple of 8; the model's size when omitted.")
    height: Side | None = Field(None, description="Pixels, a multiple of 8; the model's size when omitted.")


def parse_generate_body(raw: bytes) -> GenerateBody:
    """Validate the raw body ourselves: bad JSON, bad UTF-8 or a bad field all become a 422."""
    try:
        return GenerateBody.model_validate_json(raw)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class GeneratedImage(BaseModel):
    seed: int
    png_base64: str


class GenerateResult(BaseModel):
    images: list[GeneratedImage]
    width: int
    height: int
    steps: int
    guidance_scale: float


class ProbeStatus(BaseModel):
    status: str
    detail: str | None = None


class ErrorMessage(BaseModel):
    detail: str


class FieldError(BaseModel):
    type: str
    loc: list[str | int] = Field(description="Where: ['body', field], or ['body'] for the body as a whole.")
    msg: str


class InvalidRequest(BaseModel):
    detail: list[FieldError]


# ---- metrics ------------------------------------------------------------------------------


class ServerMetrics:
    """Prometheus metrics in a registry of their own (one per app, so tests never collide)."""

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

    def observe_batch(self, images: int) -> None:
        self.batch_images.observe(images)
        self.images.inc(images)


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


# ---- the model --------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible")
    return device


def prepare_pipeline(settings: ServerSettings) -> Any:
    """Load weights, apply LoRA, then `ready_for_serving` on the chosen device."""
    import torch

    from .models import load_pipeline

    device = resolve_device(settings.device)
    pipeline = load_pipeline(settings.model, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if settings.lora:
        from .export import apply_lora

        apply_lora(pipeline, settings.lora)
    return ready_for_serving(pipeline, device, settings.compile)


def ready_for_serving(pipeline: Any, device: str, compile: bool = False) -> Any:
    """Inference mode on the device; channels-last (and TF32) on GPU; optionally compile the UNet."""
    import torch

    pipeline.to(device)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.eval().requires_grad_(False)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if compile:
        pipeline.unet.compile()  # in place: the pipeline keeps its UNet2DConditionModel
    return pipeline


def pipeline_size(pipeline: Any) -> int:
    """The model's native image side in pixels (the default width and height)."""
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


class ModelRuntime:
    """The pipeline, its batcher, and where loading stands (loading → warming → ready | failed)."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics, load: Callable[[], Any]):
        self.settings = settings
        self.metrics = metrics
        self.load = load
        self.pipeline: Any = None
        self.state = "loading"
        self.error: str | None = None
        self.failure: Exception | None = None
        self.batcher: MicroBatcher | None = None
        self.starting: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def run_batch(self, shape: BatchShape, requests: list) -> list:
        from .generate import generate_images

        return generate_images(
            self.pipeline, requests, steps=shape.steps, guidance=shape.guidance, height=shape.height, width=shape.width
        )

    async def start(self) -> None:
        self.batcher = MicroBatcher(
            self.run_batch,
            max_batch=self.settings.max_batch,
            max_queue=self.settings.max_queue,
            max_wait_s=self.settings.max_wait_s,
            on_batch=self.metrics.observe_batch,
            on_queue_depth=self.metrics.queue_depth.set,
        )
        self.batcher.start()
        self.starting = asyncio.get_running_loop().create_task(self.load_and_warm_up(), name="load-model")

    async def load_and_warm_up(self) -> None:
        from .generate import ImageRequest

        started = time.perf_counter()
        try:
            self.pipeline = await self.batcher.run_blocking(self.load)
            self.state = "warming"
            size = pipeline_size(self.pipeline)
            shape = BatchShape(self.settings.warmup_steps, 7.5, size, size)
            await self.batcher.submit(shape, [ImageRequest("warm-up", "", 0)])
        except Exception as error:  # the pod must say why it never gets ready
            self.state, self.error, self.failure = "failed", f"{type(error).__name__}: {error}", error
            log.error("model failed to load", extra={"model": self.settings.model, "error": self.error})
            return
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("model ready", extra={"model": self.settings.model, "seconds": round(time.perf_counter() - started, 2)})

    async def stop(self) -> None:
        if self.starting is not None:
            self.starting.cancel()
        if self.batcher is not None:
            await self.batcher.close()


# ---- the app ------------------------------------------------------------------------------


def web_page() -> str:
    return resources.files("dreambooth_trainer").joinpath("static/index.html").read_text(encoding="utf-8")


def encode_png(image: Any) -> bytes:
    from .generate import png_bytes

    return png_bytes(image)


def validation_errors(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; the offending input is not echoed (it may be NaN or huge)."""
    detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(settings: ServerSettings | None = None, load: Callable[[], Any] | None = None) -> FastAPI:
    """The FastAPI app; `load` replaces the weight loading (tests use it to hold the model back)."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    runtime = ModelRuntime(settings, metrics, load or (lambda: prepare_pipeline(settings)))
    bearer = HTTPBearer(auto_error=False, description=f"Needed only when the server sets {TOKEN_ENV}.")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="DreamBooth inference",
        version="1",
        description="Generate images of a fine-tuned subject. The web page is at `/`.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RequestValidationError, validation_errors)

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), settings.api_token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    seed_header = {"X-Seed": {"description": "The seed of the image", "schema": {"type": "integer"}}}

    @app.post(
        "/v1/generate",
        summary="Generate images",
        response_model=GenerateResult,
        # Only a server with a token declares (and checks) bearer auth in its OpenAPI spec.
        dependencies=[Depends(require_token)] if settings.api_token else [],
        responses={
            200: {
                "description": "One image: the PNG itself (seed in X-Seed). Several: JSON with base64 PNGs and seeds.",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "headers": seed_header,
            },
            401: {"model": ErrorMessage, "description": "A token is set on the server and this one is missing or wrong."},
            413: {"model": ErrorMessage, "description": f"The body is larger than {MAX_BODY_BYTES} bytes."},
            422: {"model": InvalidRequest, "description": "The body is not JSON, or a field is unknown, of the wrong type or out of range."},
            429: {"model": ErrorMessage, "description": "The queue is full; retry later."},
            503: {"model": ErrorMessage, "description": "The model is still loading, failed to load, or the server is stopping."},
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
        from .generate import ImageRequest

        body = parse_generate_body(await read_body(request))
        if not runtime.ready:
            detail = "model failed to load" if runtime.state == "failed" else f"model is {runtime.state}; retry shortly"
            raise HTTPException(503, detail, headers={"Retry-After": "5"})
        size = pipeline_size(runtime.pipeline)
        width, height = body.width or size, body.height or size
        first_seed = secrets.randbelow(MAX_SEED + 1) if body.seed is None else body.seed
        seeds = [first_seed + index for index in range(body.num_images)]
        requests = [ImageRequest(body.prompt, body.negative_prompt, seed) for seed in seeds]
        shape = BatchShape(body.steps, body.guidance_scale, width, height)
        try:
            images = await runtime.batcher.submit(shape, requests)
        except QueueFull as error:
            raise HTTPException(429, str(error), headers={"Retry-After": "1"}) from None
        except BatcherClosed as error:
            raise HTTPException(503, str(error)) from None
        pngs = await asyncio.to_thread(lambda: [encode_png(image) for image in images])
        if body.num_images == 1:
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(seeds[0])})
        result = GenerateResult(
            images=[GeneratedImage(seed=s, png_base64=base64.b64encode(p).decode()) for s, p in zip(seeds, pngs)],
            width=width, height=height, steps=body.steps, guidance_scale=body.guidance_scale,
        )
        return JSONResponse(result.model_dump())

    @app.get("/healthz", response_model=ProbeStatus, summary="Liveness", responses={503: {"model": ProbeStatus}})
    async def healthz() -> JSONResponse:
        if runtime.state == "failed":  # a restart is the only cure; the detail says why
            return JSONResponse(ProbeStatus(status="failed", detail=runtime.error).model_dump(), status_code=503)
        return JSONResponse(ProbeStatus(status="alive").model_dump())

    @app.get("/readyz", response_model=ProbeStatus, summary="Readiness", responses={503: {"model": ProbeStatus}})
    async def readyz() -> JSONResponse:
        status = ProbeStatus(status=runtime.state, detail=runtime.error)
        return JSONResponse(status.model_dump(), status_code=200 if runtime.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", summary="Web page", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(web_page())

    return app


def run_server(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    max_batch: int = 8,
    max_queue: int = 64,
    lora: str | None = None,
    compile: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT; exit 1 when the model cannot be loaded (the pod restarts)."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = ServerSettings(
        model=model, device=device, max_batch=max_batch, max_queue=max_queue, lora=lora, compile=compile,
        api_token=api_token_from_env(),
    )
    if settings.api_token is None:
        log.warning(f"{TOKEN_ENV} is not set: /v1/generate is open to anyone who can reach it")
    app = create_app(settings)
    # A batch already on the GPU cannot be interrupted; after 30 s of draining, stop anyway.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)

    def stop_when_failed() -> None:
        runtime: ModelRuntime = app.state.runtime
        while not server.should_exit:
            if runtime.state == "failed":
                server.should_exit = True
            time.sleep(0.5)

    threading.Thread(target=stop_when_failed, daemon=True, name="load-watch").start()
    server.run()
    runtime = app.state.runtime
    if runtime.state == "failed":
        from .errors import UserInputError

        print(f"error: cannot serve {model}: {runtime.error}", file=sys.stderr)
        # 2: bad input, a restart will not help (the CLI's convention); 1: worth a restart
        raise SystemExit(2 if isinstance(runtime.failure, UserInputError) else 1)
