"""GET /health, GET /metrics, and the middleware that counts inference requests by status and adapter."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.context import ServerContext, get_context
from server.metrics import UNKNOWN_LABEL, Metrics

router = APIRouter()

INFERENCE_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


@router.get("/health")
async def health(ctx: ServerContext = Depends(get_context)):
    engine = ctx.engine
    down = getattr(engine, "unavailable", None)  # why the engine takes no requests (e.g. its worker died), or None
    if down:
        return JSONResponse({"status": "unavailable", "model": engine.model_name, "reason": down}, status_code=503)
    return {"status": "ok", "model": engine.model_name, "running": engine.num_running, "waiting": engine.num_waiting}


@router.get("/metrics")
async def metrics(ctx: ServerContext = Depends(get_context)):
    render_async = getattr(ctx.metrics, "render_async", None)  # metrics gathered from elsewhere (Ray replicas)
    body, content_type = await render_async() if render_async is not None else ctx.metrics.render()
    return Response(body, media_type=content_type)


class RequestMetricsMiddleware:
    """Counts every inference request once it is over, by endpoint, status and adapter label.

    The status is the response's, unless the route set ``request.state.final_status`` (a stream
    that ended in an error, a client that went away: 499). The adapter label is what the
    route set in ``request.state.adapter_label``, or ``__unknown__`` for requests refused
    before their adapter was resolved (bad JSON, auth, unknown adapter).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = INFERENCE_ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        status = 500
        state = scope.setdefault("state", {})  # the dict behind request.state

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.record_request(endpoint, state.get("final_status", status),
                                        state.get("adapter_label", UNKNOWN_LABEL))
