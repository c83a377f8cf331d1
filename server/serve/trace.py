"""The ``x-adapter-server-replica`` response header: which engine replica served an HTTP request.

The ingress's app is the single server's app; it does not know about replicas. This ASGI
middleware (added outermost) opens a :class:`ReplicaTrace` for each HTTP request in a context
variable; every :class:`~server.serve.client.RayRequestStream` created while the request is
handled registers in it and *settles* once: when its first output arrives (the replica that
produced it served it, after any retry) or when it fails or is closed. The middleware holds the
``http.response.start`` message until every stream of the request has settled, then adds the
header: the replicas that served it, comma-separated in order of first output (several for
``n > 1`` or prompt lists on the base model). A streamed response therefore starts with its
first token, as it would anyway; a non-streamed one is complete by then. Responses that no
engine replica served (model list, adapter management, /health, /metrics, errors raised before
generation) name the ingress replica instead.
"""
from __future__ import annotations

import asyncio
import contextvars

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-adapter-server-replica"

_current: contextvars.ContextVar["ReplicaTrace | None"] = contextvars.ContextVar("adapter_server_replica_trace",
                                                                                 default=None)


class ReplicaTrace:
    """The engine replicas of one HTTP request, and whether every stream has settled."""

    def __init__(self) -> None:
        self.replicas: list[str] = []
        self.pending = 0
        self.settled = asyncio.Event()
        self.settled.set()

    def opened(self) -> None:
        self.pending += 1
        self.settled.clear()

    def settle(self, replica: str | None) -> None:
        if replica and replica not in self.replicas:
            self.replicas.append(replica)
        self.pending -= 1
        if self.pending <= 0:
            self.settled.set()


def current_trace() -> ReplicaTrace | None:
    """The trace of the HTTP request being handled, if any (streams made outside HTTP have none)."""
    return _current.get()


class ReplicaHeaderMiddleware:
    """Adds ``x-adapter-server-replica`` to every HTTP response (see the module docstring).

    ``fallback`` names the ingress replica; ``wait_timeout`` bounds how long the response start
    waits for streams to settle (a stream always settles, so this only guards against bugs).
    """

    def __init__(self, app: ASGIApp, fallback: str, wait_timeout: float | None = None):
        self.app = app
        self.fallback = fallback
        self.wait_timeout = wait_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        trace = ReplicaTrace()
        token = _current.set(trace)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                if not trace.settled.is_set():
                    try:
                        await asyncio.wait_for(trace.settled.wait(), self.wait_timeout)
                    except asyncio.TimeoutError:
                        pass
                MutableHeaders(scope=message).append(HEADER, ",".join(trace.replicas) or self.fallback)
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            _current.reset(token)
