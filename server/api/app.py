"""The FastAPI application factory: wires engine, configuration, auth, metrics and routes.

The API layer never touches tensors: prompts become token ids through the engine's
tokenizer, engine outputs (token ids, text, logprobs) become OpenAI-shaped JSON. Routes:

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (:mod:`.completions`, :mod:`.chat`)
* ``GET /v1/models[/{id}]`` (:mod:`.models`)
* ``POST /tokenize``, ``POST /detokenize`` (:mod:`.tokenize`, vLLM's shapes)
* ``/v1/adapters`` upload / list / get / delete (:mod:`.adapter_admin`, admin scope)
* ``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` (:mod:`.lora_paths`, vLLM's, admin scope)
* ``GET /health``, ``GET /metrics`` (:mod:`.monitoring`, open)
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import adapter_admin, chat, completions, lora_paths, models, monitoring, tokenize
from server.api.auth import AuthMiddleware, load_keys
from server.api.context import ServerContext
from server.api.errors import install_error_handlers
from server.config import ServerConfig
from server.metrics import Metrics

log = logging.getLogger(__name__)


def create_app(engine, server_config: ServerConfig | None = None) -> FastAPI:
    """The app serving ``engine``; starts the engine thread on startup and stops it on shutdown.

    Raises ValueError for an unreadable or malformed API key file.
    """
    config = server_config or ServerConfig()
    keys = load_keys(config)
    metrics = getattr(engine, "metrics", None)
    if not isinstance(metrics, Metrics):
        metrics = Metrics(max_adapter_labels=config.max_adapter_labels)
        engine.metrics = metrics
    metrics.bind_engine(engine)
    context = ServerContext(engine=engine, config=config, metrics=metrics, started_at=int(time.time()),
                            tenants=keys.tenants)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if keys.enabled:
            log.info("API keys required: %d inference, %d admin", len(keys.inference), len(keys.admin))
        else:
            log.warning("no API keys configured: every client can run inference and manage adapters; "
                        "configure --api-key / --admin-key (or --api-key-file) before exposing this server")
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="adapter-server", lifespan=lifespan)
    app.state.context = context
    install_error_handlers(app)
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(monitoring.RequestMetricsMiddleware, metrics=metrics)  # outermost: counts 401/403 too
    for module in (completions, chat, models, tokenize, adapter_admin, lora_paths, monitoring):
        app.include_router(module.router)
    return app
