"""One OpenAI completion request over HTTP, timed: what every system under test is asked.

The adapter goes in ``model`` (the OpenAI way, which our server, vLLM and the PEFT peer all
understand); ``ignore_eos`` makes every request generate exactly ``max_tokens`` tokens and
``temperature: 0`` makes decoding greedy on every system. Streamed requests ask for a final
usage chunk (``stream_options.include_usage``) so the token count is the server's own.

Timing (``time.perf_counter``): ``sent`` before the request is written, one timestamp per
SSE chunk that carries text, ``done`` when the stream (or body) ended. Time to first token is
the first text chunk; inter-token latency is the gap between consecutive text chunks.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import pairwise

import httpx

from loadtest.workload import RequestSpec

COMPLETIONS = "/v1/completions"


@dataclass
class Result:
    """What happened to one request."""

    index: int
    adapter: str | None
    kind: str
    sent: float
    done: float | None = None
    ok: bool = False
    status: int = 0
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""
    expected_tokens: int = 0  # max_tokens asked for (EOS is ignored, so every request should reach it)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (a.k.a. TPOT)."""
        if len(self.chunk_times) < 2 or self.completion_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.completion_tokens - 1)

    @property
    def gaps(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in pairwise(t)]

    def tokens_between(self, start: float, end: float) -> float:
        """Generated tokens that arrived in [start, end] (each chunk weighs tokens / chunks)."""
        if not self.chunk_times:
            return float(self.completion_tokens) if self.done is not None and start <= self.done <= end else 0.0
        per_chunk = self.completion_tokens / len(self.chunk_times) if self.completion_tokens else 1.0
        return per_chunk * sum(1 for t in self.chunk_times if start <= t <= end)

    def share_between(self, start: float, end: float) -> float:
        """The share of this request's tokens that arrived in [start, end] (1.0: all of them)."""
        total = self.completion_tokens or self.expected_tokens
        return min(1.0, self.tokens_between(start, end) / total) if total else 0.0


def request_body(spec: RequestSpec, base_model: str, *, stream: bool) -> dict:
    body = {"model": spec.adapter or base_model, "prompt": spec.prompt, "max_tokens": spec.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def new_client(base_url: str, timeout: float = 600.0, api_key: str | None = None) -> httpx.AsyncClient:
    """An async client with no connection cap (a cap would queue requests in the client); ``api_key`` goes in
    ``Authorization: Bearer``."""
    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout, connect=30.0),
                             headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def complete(client: httpx.AsyncClient, index: int, spec: RequestSpec, base_model: str, *,
                   stream: bool = True, result: Result | None = None) -> Result:
    """Send one completion and time it; never raises for HTTP or protocol errors (see ``Result.error``).

    ``result``, if given, is filled in as the request goes, so that a caller that cancels the
    request still holds the chunks that arrived before.
    """
    if result is None:
        result = Result(index=index, adapter=spec.adapter, kind=spec.kind, sent=0.0)
    result.expected_tokens = spec.max_tokens
    result.sent = time.perf_counter()
    body = request_body(spec, base_model, stream=stream)
    try:
        if stream:
            await _stream(client, body, result)
        else:
            response = await client.post(COMPLETIONS, json=body)
            result.status = response.status_code
            if response.status_code == 200:
                data = response.json()
                result.text = "".join(c.get("text", "") for c in data.get("choices", []))
                _usage(result, data.get("usage"))
                result.ok = True
            else:
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.done = time.perf_counter()
    if result.ok and result.completion_tokens == 0:
        result.completion_tokens = len(result.chunk_times)
    return result


async def _stream(client: httpx.AsyncClient, body: dict, result: Result) -> None:
    async with client.stream("POST", COMPLETIONS, json=body) as response:
        result.status = response.status_code
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
            return
        parts = []
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                result.ok = result.error is None
                break
            event = json.loads(payload)
            if "error" in event:
                error = event["error"]
                result.error = f"stream error: {error.get('message', error) if isinstance(error, dict) else error}"
                continue
            text = "".join(c.get("text") or "" for c in event.get("choices") or ())
            if text:
                result.chunk_times.append(time.perf_counter())
                parts.append(text)
            _usage(result, event.get("usage"))
        result.text = "".join(parts)


def _usage(result: Result, usage: dict | None) -> None:
    if usage:
        result.completion_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)


def openai_client(base_url: str, timeout: float = 600.0):
    """An ``openai.AsyncOpenAI`` for the server at ``base_url`` (no retries: a failure is a result)."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="unused", timeout=timeout, max_retries=0)


def adapter_fields(spec: RequestSpec) -> dict:
    """How our server (and the PEFT peer) is told a request's adapter: ``adapter`` or ``adapters``."""
    return {**({"adapter": spec.adapter} if spec.adapter else {}),
            **({"adapters": spec.adapters} if spec.adapters else {})}


async def complete_openai(client, index: int, spec: RequestSpec, base_model: str,
                          result: Result | None = None, fields=adapter_fields) -> Result:
    """``complete`` through the OpenAI SDK: a streamed completion, the adapter and ``ignore_eos`` in
    ``extra_body``, greedy; chunk timestamps as in ``complete`` (``result``, if given, fills in as the
    stream goes). Never raises for API errors. ``fields(spec)``: the body fields that name the adapter
    (another server's way, e.g. llama-server's ``lora`` list: ``loadtest.served_llamacpp``)."""
    import openai

    if result is None:
        result = Result(index=index, adapter=spec.adapter, kind=spec.kind, sent=0.0)
    result.expected_tokens, result.sent = spec.max_tokens, time.perf_counter()
    extra = {"ignore_eos": True, **fields(spec)}
    parts = []
    try:
        stream = await client.completions.create(model=base_model, prompt=spec.prompt, max_tokens=spec.max_tokens,
                                                 temperature=0.0, stream=True, stream_options={"include_usage": True},
                                                 extra_body=extra)
        async for chunk in stream:
            text = "".join(c.text or "" for c in chunk.choices)
            if text:
                result.chunk_times.append(time.perf_counter())
                parts.append(text)
            if chunk.usage:
                result.completion_tokens = chunk.usage.completion_tokens
                result.prompt_tokens = chunk.usage.prompt_tokens
        result.ok, result.status = True, 200
    except openai.APIError as exc:
        result.status = getattr(exc, "status_code", 0) or 0
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.done = time.perf_counter()
    result.text = "".join(parts)
    return result
