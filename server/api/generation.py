"""From a validated body to engine requests and back: the part completions and chat share.

* :func:`resolve_adapter`: the ``adapter`` field, else ``model`` naming an adapter, else the base;
  :func:`resolve_target`: that, or a composition of several adapters (the ``adapters`` field).
* :func:`sampling_params` / :func:`make_requests`: one engine request per prompt and choice.
* :class:`Generation`: submits them all (or none: a full queue aborts those already queued),
  merges their output streams, records latency and token metrics, enforces the request
  timeout, and aborts whatever is still running when it is closed.
* :func:`collect`: runs a generation to the end for a non-streaming response, aborting it as
  soon as the client disconnects.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import AsyncIterator

from fastapi import Request as HTTPRequest

from adapters.composition import DEFAULT_COMBINATION, Composition, parse_members
from adapters.format import AdapterError
from adapters.store import AdapterNotFound
from server.api.context import ServerContext
from server.api.errors import APIError
from server.api.protocol import SamplingFields
from server.api.tenancy import AdapterView
from server.engine.request import Request, RequestOutput, SamplingParams
from server.metrics import Metrics

MAX_SEQUENCES = 64  # prompts x n in one HTTP request
SEED_MODULUS = 2**64


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


def resolve_adapter(ctx: ServerContext, model: str | None, adapter: str | None,
                    view: AdapterView | None = None) -> str | None:
    """The stored name of the adapter a request asks for, or None for the base model; 404 if the caller
    sees no such adapter (``view``: the store as the caller sees it, :mod:`server.api.tenancy`).

    In order: the ``adapter`` field; ``model`` as ``<base>:<adapter>`` (the addressing tools built for
    SGLang and Ray Serve LLM use; adapter names never hold ':'); ``model`` naming an adapter; else the base.
    """
    engine = ctx.engine
    if not adapter and model and ":" in model:
        base, _, adapter = model.partition(":")
        if base != engine.model_name:
            raise APIError(404, f"model {model!r} not found: {base!r} is not this server's base model "
                           f"{engine.model_name!r}", param="model", code="model_not_found")
        if not adapter:
            raise APIError(400, f"model {model!r} names no adapter after ':'", param="model")
    if adapter:
        stored = _stored(ctx, view, adapter)
        if stored is None:
            raise APIError(404, f"adapter {adapter!r} not found", param="adapter", code="adapter_not_found")
        return stored
    if model is None or model == "" or model == engine.model_name:
        return None
    stored = _stored(ctx, view, model)
    if stored is not None:
        return stored
    raise APIError(404, f"model {model!r} not found: it is neither the base model {engine.model_name!r} nor a "
                   "stored adapter (see GET /v1/models)", param="model", code="model_not_found")


def resolve_target(ctx: ServerContext, body: SamplingFields,
                   view: AdapterView | None = None) -> tuple[str | None, Composition | None]:
    """(adapter, composition) of a request, by stored names: :func:`resolve_adapter`, or the ``adapters`` field
    naming several (with ``adapter_combination``); 400 when both are given, 404 naming a member not seen."""
    if body.adapters is None:
        if body.adapter_combination is not None:
            raise APIError(400, "adapter_combination applies to the adapters field, which is not set",
                           param="adapter_combination")
        return resolve_adapter(ctx, body.model, body.adapter, view), None
    if body.adapter or (body.model and body.model != ctx.engine.model_name):
        raise APIError(400, "name the adapters to compose in the adapters field alone (adapter unset, model the base "
                       f"model {ctx.engine.model_name!r} or unset)", param="adapters")
    try:
        composition = Composition(parse_members(body.adapters), body.adapter_combination or DEFAULT_COMBINATION)
    except AdapterError as exc:
        raise APIError(400, str(exc), param="adapters") from exc
    members = []
    for member in composition.members:
        stored = _stored(ctx, view, member.name)
        if stored is None:
            raise APIError(404, f"adapter {member.name!r} not found", param="adapters", code="adapter_not_found")
        members.append(replace(member, name=stored))
    return None, replace(composition, members=tuple(members))


def _stored(ctx: ServerContext, view: AdapterView | None, name: str) -> str | None:
    """The stored name ``name`` stands for, or None (no store, not a valid name, not seen by the caller)."""
    store = getattr(ctx.engine, "adapter_store", None)
    if store is None:
        return None
    try:
        return (view or AdapterView(store, None)).stored(name)
    except (AdapterNotFound, AdapterError):  # AdapterError: not even a valid name
        return None


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters; ``prompt_logprobs`` (completions' echo with logprobs) scores the prompt too."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          seed=body.seed, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
                          ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                          presence_penalty=body.presence_penalty,
                          frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                          min_p=body.min_p, min_tokens=body.min_tokens, logit_bias=body.logit_bias_pairs,
                          response_format=body.response_format.engine_format() if body.response_format else None)


def make_requests(engine, prompts: list[list[int]], params: SamplingParams, adapter: str | None,
                  n: int, composition: Composition | None = None, tenant=None) -> list[Request]:
    """``n`` engine requests per prompt, prompt-major (choice index = prompt * n + j).

    With a seed, choice j samples with seed + j, so choices differ and choice 0 equals a
    single request with that seed.
    """
    if len(prompts) * n > MAX_SEQUENCES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_SEQUENCES} sequences in one request",
                       param="n")
    vocab_size = getattr(engine, "vocab_size", None)
    if vocab_size is not None:
        params.check_vocab(vocab_size)  # RequestError -> 400
    requests = []
    for ids in prompts:
        for j in range(n):
            choice_params = params
            if j and params.seed is not None:
                choice_params = replace(params, seed=(params.seed + j) % SEED_MODULUS)
            if composition is None:
                requests.append(engine.make_request(ids, choice_params, adapter=adapter))
            else:
                requests.append(engine.make_request(ids, choice_params, composition=composition))
            requests[-1].tenant = tenant  # fairness.Tenant: fair admission and its own queue bound
    return requests


class _SequenceTimer:
    """Latency and token bookkeeping of one sequence, from the outputs as the event loop sees them."""

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.last_token: float | None = None

    def observe(self, metrics: Metrics, output: RequestOutput, now: float) -> None:
        tokens = len(output.token_ids)
        if tokens:
            if self.last_token is None:
                metrics.time_to_first_token.observe(now - self.arrival)
            else:
                gap = (now - self.last_token) / tokens  # an update carrying several tokens spreads its gap
                for _ in range(tokens):
                    metrics.inter_token_latency.observe(gap)
            self.last_token = now
        if output.finished:
            metrics.e2e_latency.observe(now - self.arrival)
            metrics.prompt_tokens.inc(output.prompt_tokens)
            metrics.generation_tokens.inc(output.completion_tokens)


class Generation:
    """The engine requests of one HTTP request, submitted together and streamed back merged."""

    def __init__(self, ctx: ServerContext, requests: list[Request], arrival: float):
        self.ctx = ctx
        self.requests = requests
        self.arrival = arrival
        self.timeout = ctx.config.request_timeout
        self.streams = []
        self._tasks: list[asyncio.Task] = []
        try:
            for request in requests:
                self.streams.append(ctx.engine.stream(request))
        except BaseException:
            self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they come, until every sequence finished.

        Raises APIError 500 when a sequence fails in the engine and 504 past the request timeout.
        """
        merged: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._tasks = [asyncio.ensure_future(self._pump(i, stream, merged)) for i, stream in enumerate(self.streams)]
        timers = [_SequenceTimer(self.arrival) for _ in self.streams]
        deadline = None if not self.timeout else self.arrival + self.timeout
        pending = len(self.streams)
        try:
            while pending:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    index, item = await asyncio.wait_for(merged.get(), remaining)
                except asyncio.TimeoutError:
                    raise APIError(504, f"the request did not finish within the server's request timeout of "
                                   f"{self.timeout:g} s and was aborted", code="timeout") from None
                if isinstance(item, BaseException):
                    raise item
                timers[index].observe(self.ctx.metrics, item, time.monotonic())
                if item.finished:
                    pending -= 1
                    if item.finish_reason == "error":
                        raise APIError(500, f"generation failed: {item.error or 'unknown engine error'}")
                yield index, item
        finally:
            self.close()

    @staticmethod
    async def _pump(index: int, stream, merged: asyncio.Queue) -> None:
        try:
            async for output in stream:
                merged.put_nowait((index, output))
        except Exception as exc:  # surfaced by events()
            merged.put_nowait((index, exc))

    def close(self) -> None:
        """Abort every sequence still running (idempotent, synchronous: safe in a cancelled task)."""
        for task in self._tasks:
            task.cancel()
        for stream in self.streams:
            stream.abort()


async def wait_for_disconnect(http_request: HTTPRequest) -> None:
    """Return when the client disconnects (the body has been read, so only that message is left)."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(generation: Generation, http_request: HTTPRequest) -> list[list[RequestOutput]]:
    """Every output of every choice; raises ClientDisconnected (after aborting) if the client leaves."""
    results: list[list[RequestOutput]] = [[] for _ in generation.requests]

    async def consume() -> None:
        async for index, output in generation.events():
            results[index].append(output)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_for_disconnect(http_request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            generation.close()
    if consumer not in done:
        raise ClientDisconnected()
    consumer.result()
    return results
