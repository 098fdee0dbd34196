"""The inference server's app: the OpenAI Images API, POST /v1/generate, a web page at /, probes,
Prometheus metrics, and the bearer token that guards the APIs.

`create_app(settings)` builds the FastAPI app (tests drive it in-process); `server.run_server`
is what `dreambooth serve` calls. Weights load in the background, so /healthz answers at once and
/readyz turns ready only after the weights are loaded AND one warm-up image has been made.
"""
from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import RequestMetricsMiddleware, ServerMetrics
from .native_api import generate_router, validation_errors
from .openai_api import is_openai_path, openai_error_response, openai_router
from .runtime import ModelRuntime, prepare_pipeline
from .settings import TOKEN_ENV, ServerSettings


class ProbeStatus(BaseModel):
    status: str
    detail: str | None = None


def web_page() -> str:
    return resources.files("dreambooth_serving").joinpath("static/index.html").read_text(encoding="utf-8")


def token_check(token: str) -> Callable[..., None]:
    """A dependency refusing requests without `Authorization: Bearer <token>` (401)."""
    bearer = HTTPBearer(auto_error=False, description=f"The token the server was given in {TOKEN_ENV}.")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            reason = "missing" if not given else "wrong"
            raise HTTPException(401, f"{reason} bearer token (Authorization: Bearer <token>)", headers={"WWW-Authenticate": "Bearer"})

    return require_token


async def http_errors(request: Request, error: StarletteHTTPException) -> Response:
    """OpenAI's error body on OpenAI paths, FastAPI's `{"detail": ...}` elsewhere."""
    if is_openai_path(request.url.path):
        return openai_error_response(error)
    return await http_exception_handler(request, error)


def create_app(settings: ServerSettings | None = None, load: Callable[[], Any] | None = None) -> FastAPI:
    """The FastAPI app; `load` replaces the weight loading (tests use it to hold the model back)."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    runtime = ModelRuntime(settings, metrics, load or (lambda: prepare_pipeline(settings)))
    # Only a server with a token declares (and checks) bearer auth in its OpenAPI spec.
    auth = [token_check(settings.api_token)] if settings.api_token else []

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
        description="Generate images of fine-tuned subjects: the OpenAI Images API (`/v1/images/generations`, "
                    "`/v1/models`) and `/v1/generate`. The web page is at `/`.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RequestValidationError, validation_errors)
    app.add_exception_handler(StarletteHTTPException, http_errors)
    app.include_router(openai_router(runtime, auth))
    app.include_router(generate_router(runtime, auth))

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
