"""`dreambooth serve`: run the app under uvicorn until SIGTERM; exit non-zero when the model
cannot be loaded (2: bad input, a restart will not help; 1: worth a restart)."""
from __future__ import annotations

import logging
import sys
import threading
import time

from .app import create_app
from .logs import configure_server_logging
from .runtime import ModelRuntime
from .settings import TOKEN_ENV, ServerSettings

log = logging.getLogger("dreambooth.serve")


def run_server(settings: ServerSettings, port: int = 8080) -> None:
    """Serve on `settings.listen_host`:`port` until SIGTERM (logs as DREAMBOOTH_LOG_FORMAT says)."""
    import uvicorn

    configure_server_logging()
    if settings.api_token is None:
        log.warning(f"{TOKEN_ENV} is not set: the APIs are open to anyone who can reach them", extra={"host": settings.listen_host})
    app = create_app(settings)
    # A batch already on the GPU cannot be interrupted; after 30 s of draining, stop anyway.
    config = uvicorn.Config(app, host=settings.listen_host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=30, log_config=None)
    server = uvicorn.Server(config)
    runtime: ModelRuntime = app.state.runtime

    def stop_when_failed() -> None:
        while not server.should_exit:
            if runtime.state == "failed":
                server.should_exit = True
            time.sleep(0.5)

    threading.Thread(target=stop_when_failed, daemon=True, name="load-watch").start()
    server.run()
    if runtime.state == "failed":
        from dreambooth_trainer.errors import UserInputError

        print(f"error: cannot serve {settings.model}: {runtime.error}", file=sys.stderr)
        raise SystemExit(2 if isinstance(runtime.failure, UserInputError) else 1)
