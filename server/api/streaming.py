"""Streamed responses: a generation's outputs as OpenAI chunks over server-sent events.

:class:`StreamState` is the per-endpoint part (what a chunk looks like); :func:`stream_events`
the shared part: opening chunks, one chunk per update, the usage chunk when
``stream_options.include_usage`` is set, ``data: [DONE]``; an error mid-stream is sent as
``data: {"error": {...}}`` (what OpenAI does) and ends the stream. Whatever way the body
generator ends (done, error, client gone), every engine request still running is aborted.
"""
from __future__ import annotations

import logging
import time

from fastapi import Request as HTTPRequest

from server.api.errors import APIError, error_body
from server.api.generation import Generation
from server.api.sse import DONE, EventStreamResponse, event
from server.engine.request import RequestOutput

log = logging.getLogger(__name__)

CLIENT_GONE = 499


class StreamState:
    """Builds the chunks of one streamed response; subclasses set ``chunk_object`` and define ``update``."""

    chunk_object = ""

    def __init__(self, engine, response_id: str, model: str, requests, include_usage: bool,
                 prompt_tokens: int):
        self.engine = engine
        self.id = response_id
        self.model = model
        self.requests = requests
        self.include_usage = include_usage
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.completion_tokens = [0] * len(requests)
        self.cached_tokens = [0] * len(requests)

    def envelope(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self, index: int) -> list[dict]:
        """Chunks sent for choice ``index`` before any token."""
        return []

    def update(self, index: int, output: RequestOutput) -> list[dict]:
        """Chunks for one engine output of choice ``index``."""
        raise NotImplementedError

    def usage_chunk(self) -> dict:
        completion = sum(self.completion_tokens)
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model, "choices": [],
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                          "total_tokens": self.prompt_tokens + completion,
                          "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens)}}}


def stream_events(http_request: HTTPRequest, state: StreamState, generation: Generation) -> EventStreamResponse:
    """The SSE response streaming ``generation`` through ``state``."""

    async def body():
        finished = False
        try:
            for index in range(len(state.requests)):
                for chunk in state.opening(index):
                    yield event(chunk)
            async for index, output in generation.events():
                state.completion_tokens[index] = output.completion_tokens
                state.cached_tokens[index] = output.cached_tokens
                for chunk in state.update(index, output):
                    yield event(chunk)
            if state.include_usage:
                yield event(state.usage_chunk())
            finished = True
            yield DONE
        except APIError as exc:
            finished = True
            http_request.state.final_status = exc.status
            yield event(error_body(exc.status, exc.message, exc.param, exc.code))
        except Exception:
            finished = True
            log.exception("streaming %s failed", state.id)
            http_request.state.final_status = 500
            yield event(error_body(500, "internal server error"))
        finally:
            generation.close()
            if not finished:
                http_request.state.final_status = CLIENT_GONE

    return EventStreamResponse(body(), on_close=generation.close)
