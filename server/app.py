"""The FastAPI application: settings, lifespan (engine process up and down), routers, errors.

The server never imports torch: tokenization, validation against the context length and
all tensor work happen in the engine process (engine/worker.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.engine_client import FAILED, EngineClient
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.middleware import install_middleware
from server.openapi import install_openapi
from server.routes import ops, v1
from server.tokenization import tokenization

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    engine_config: dict  # EngineConfig.to_dict(): plain data for the spawned engine process
    api_key: str | None = None
    max_queue: int | None = None  # requests waiting or running before 429
    served_model_name: str | None = None  # default: the target's identity
    shutdown_grace_seconds: float = 30.0
    max_request_bytes: int | None = None  # larger bodies get a 413 before parsing (None: no limit; the CLI sets one)
    allowed_origins: list[str] | None = None  # CORS: browser origins allowed to call the API; None: no CORS
    log_level: str = "INFO"
    on_fatal: Any = None  # called when the engine cannot start at all (the CLI stops uvicorn)


def create_app(settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics()
    engine = EngineClient(settings.engine_config, metrics, settings.max_queue, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        watcher = _watch_first_start(engine, settings)
        yield
        watcher.cancel()
        await engine.shutdown(settings.shutdown_grace_seconds)

    app = FastAPI(title="specdecpp", description="OpenAI-compatible server with SpecDec++ speculative decoding",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.started = int(time.time())
    install_error_handlers(app)
    install_middleware(app, settings.max_request_bytes, settings.allowed_origins)
    app.include_router(v1)
    app.include_router(tokenization)
    app.include_router(ops)
    install_openapi(app, lambda: _served_names(settings, engine))
    return app


def _served_names(settings: ServerSettings, engine: EngineClient) -> list[str]:
    name = settings.served_model_name or (engine.info.model if engine.info else None)
    return [name] if name else []


def _watch_first_start(engine: EngineClient, settings: ServerSettings) -> asyncio.Future:
    """Log readiness; if the engine cannot start at all, tell the CLI (which exits non-zero)."""

    async def watch() -> None:
        ready = await engine.wait_ready()
        if ready:
            log.info("engine ready: model %s (max_model_len %s, default spec %s)", engine.info.model,
                     engine.info.max_model_len, engine.info.default_spec.model_dump())
        elif engine.state == FAILED:
            log.error("the engine could not start: %s", engine.last_error)
            if settings.on_fatal is not None:
                settings.on_fatal(engine.last_error)

    return asyncio.ensure_future(watch())


class _DrainingServer(uvicorn.Server):
    """uvicorn, but on shutdown the engine drains first: in-flight requests get the grace period
    to finish, then are cancelled in the engine, so every stream ends with an error chunk and
    [DONE] (or its normal end) before uvicorn closes the connections."""

    async def shutdown(self, sockets=None) -> None:
        app = self.config.app
        await app.state.engine.shutdown(app.state.settings.shutdown_grace_seconds)
        await super().shutdown(sockets)


def run_server(settings: ServerSettings, host: str, port: int, log_level: str = "info") -> str | None:
    """Serve until SIGINT/SIGTERM; returns the engine's start-up error if it could not start at all."""
    fatal: list[str] = []
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 10)
    server = _DrainingServer(config)

    def on_fatal(message: str | None) -> None:
        fatal.append(message or "unknown error")
        server.should_exit = True

    settings.on_fatal = on_fatal
    server.run()
    return fatal[0] if fatal else None
