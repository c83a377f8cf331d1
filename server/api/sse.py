"""Server-sent events exactly as OpenAI sends them: ``data: {json}\n\n`` ... ``data: [DONE]\n\n``."""
from __future__ import annotations

import json
from functools import partial
from typing import Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    """One SSE event carrying ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that stops producing the moment the client disconnects.

    Starlette only watches for the disconnect under ASGI spec < 2.4; this class always does, so
    the body generator is cancelled (and its ``finally`` aborts the engine requests) on every
    server. ``on_close`` runs however the response ends, even if the body never started.
    """

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None] | None = None, headers: dict[str, str] | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def run(func) -> None:
                    try:
                        await func()
                    except OSError:  # the client went away mid-write (ASGI spec >= 2.4 servers)
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(run, partial(self.stream_response, send))
                await run(partial(self.listen_for_disconnect, receive))
        finally:
            if self.on_close is not None:  # also when the body never started
                self.on_close()
