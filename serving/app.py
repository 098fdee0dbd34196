"""The inference server's app: the OpenAI Images API, POST /v1/generate, a web page at /, probes,
Prometheus metrics, and the bearer token that guards the APIs.

`create_app(settings)` builds the FastAPI app (tests drive it in-process); `server.run_server`
is what `dreambooth serve` calls. Weights load in the background, so /healthz answers at once and
/readyz turns ready only after the weights are loaded AND one warm-up image has been made.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import HostCheck, checks_host
from .metrics import RequestMetricsMiddleware, ServerMetrics
from .native_api import generate_router, validation_errors
from .openai_api import is_openai_path, openai_error_body, openai_error_response, openai_router
from .reports import REPORT, REPORT_POLICY, read_report
from .runtime import ModelRuntime, prepare_pipeline
from .settings import TOKEN_ENV, TOKEN_HEADER, ServerSettings

log = logging.getLogger("dreambooth.serve")


class ProbeStatus(BaseModel):
    status: str
    error: str | None = Field(None, description="The class of the error that stopped the model from loading (the log says more).")


def web_page() -> str:
    return resources.files("dreambooth_serving").joinpath("static/index.html").read_text(encoding="utf-8")


def token_check(token: str) -> Callable[..., None]:
    """A dependency refusing requests without the token (401), given as `Authorization: Bearer
    <token>` or in X-Dreambooth-Token (what passes the Kubernetes API server's service proxy)."""
    bearer = HTTPBearer(auto_error=False, description=f"The token the server was given in {TOKEN_ENV}.")
    header = APIKeyHeader(name=TOKEN_HEADER, auto_error=False, description="The same token, for clients behind the Kubernetes API server's proxy.")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer), second: str | None = Depends(header)) -> None:
        given = [value for value in (credentials.credentials if credentials else "", second or "") if value]
        if not any(hmac.compare_digest(value.encode(), token.encode()) for value in given):
            reason = "missing" if not given else "wrong"
            raise HTTPException(401, f"{reason} token (Authorization: Bearer <token>, or {TOKEN_HEADER}: <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_token


def host_error_body(path: str, message: str) -> dict[str, Any]:
    if is_openai_path(path):
        return openai_error_body(HTTPException(403, message), code="host_not_allowed")
    return {"detail": message}


async def http_errors(request: Request, error: StarletteHTTPException) -> Response:
    """OpenAI's error body on OpenAI paths, FastAPI's `{"detail": ...}` elsewhere."""
    if is_openai_path(request.url.path):
        return openai_error_response(error)
    return await http_exception_handler(request, error)


async def unexpected_errors(request: Request, error: Exception) -> Response:
    """Whatever no route caught: JSON in the path's own shape, never a plain-text page."""
    log.error("unexpected error", exc_info=error, extra={"path": request.url.path, "error": type(error).__name__})
    return await http_errors(request, HTTPException(500, f"internal error ({type(error).__name__}); the server log has the details"))


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
                    "`/v1/images/edits`, `/v1/models`) and `/v1/generate`. The web page is at `/`.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = metrics
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", TOKEN_HEADER], expose_headers=["X-Seed", "Retry-After"])
    if checks_host(settings.api_token, settings.listen_host, settings.allowed_hosts):
        app.add_middleware(HostCheck, allowed=settings.allowed_hosts, body=host_error_body)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RequestValidationError, validation_errors)
    app.add_exception_handler(StarletteHTTPException, http_errors)
    app.add_exception_handler(Exception, unexpected_errors)
    app.include_router(openai_router(runtime, auth))
    app.include_router(generate_router(runtime, auth))

    @app.get("/healthz", response_model=ProbeStatus, summary="Liveness", responses={503: {"model": ProbeStatus}})
    async def healthz() -> JSONResponse:
        if runtime.state == "failed":  # a restart is the only cure; the log says why
            return JSONResponse(ProbeStatus(status="failed", error=runtime.error_class).model_dump(), status_code=503)
        return JSONResponse(ProbeStatus(status="alive").model_dump())

    @app.get("/readyz", response_model=ProbeStatus, summary="Readiness", responses={503: {"model": ProbeStatus}})
    async def readyz() -> JSONResponse:
        status = ProbeStatus(status=runtime.state, error=runtime.error_class)
        return JSONResponse(status.model_dump(), status_code=200 if runtime.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/reports/{model:path}", summary="The training report of a model", response_class=HTMLResponse,
             dependencies=[Depends(check) for check in auth],
             responses={401: {"description": "A token is set on the server and this one is missing or wrong."},
                        404: {"description": "The model is unknown, or no report.html lies beside its weights."}})
    async def training_report(model: str) -> HTMLResponse:
        """report.html beside the model's weights (the trainer's run as pictures: photos, curves, the
        checkpoints' grids, the served one marked). It holds the subject's photos: the token guards it."""
        uri = settings.model if model == settings.base_name else runtime.catalog.uri(model)
        if uri is None:
            runtime.catalog.refresh()
            uri = runtime.catalog.uri(model)
        if uri is None:
            raise HTTPException(404, f"the model {model!r} does not exist on this server (GET /v1/models)")
        page = await asyncio.to_thread(read_report, uri)
        if page is None:
            raise HTTPException(404, f"no training report for {model!r}: no {REPORT} beside its weights")
        return HTMLResponse(page, headers={"Content-Security-Policy": REPORT_POLICY, "Cache-Control": "no-store"})

    @app.get("/", summary="Web page", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(web_page())

    return app
