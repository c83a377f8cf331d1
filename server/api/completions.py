"""POST /v1/completions: prompts (string, strings, token ids, lists of token ids) -> text, streamed or not."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.context import ServerContext, get_context
from server.api.errors import APIError
from server.api.generation import ClientDisconnected, Generation, collect, make_requests, resolve_adapter, \
    sampling_params
from server.api.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from server.api.streaming import StreamState, stream_events
from server.engine.request import RequestOutput

router = APIRouter()


def prompt_token_ids(engine, prompt) -> list[list[int]]:
    """The OpenAI prompt forms as token id lists; 400 for an empty prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if any(len(p) == 0 for p in prompt):
        raise APIError(400, "prompt must not be empty (nor hold an empty string or token list)", param="prompt")
    return [engine.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def completion_logprobs(engine, outputs: list[RequestOutput], offset: int = 0) -> CompletionLogprobs:
    """The legacy completions logprobs object for the tokens of ``outputs``, offsets from ``offset``."""
    result = CompletionLogprobs()
    for output in outputs:
        for entry in output.logprobs or ():
            token = engine.decode([entry.token_id])
            result.tokens.append(token)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append({engine.decode([t]): lp for t, lp in entry.top} or None)
            result.text_offset.append(offset)
            offset += len(token)
    return result


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    arrival = time.monotonic()
    engine = ctx.engine
    adapter = resolve_adapter(ctx, body.model, body.adapter)
    request.state.adapter_label = ctx.metrics.adapter_label(adapter)
    prompts = prompt_token_ids(engine, body.prompt)
    params = sampling_params(body, body.max_tokens, body.logprobs)
    requests = make_requests(engine, prompts, params, adapter, body.n)
    model = adapter or engine.model_name
    generation = Generation(ctx, requests, arrival)
    if body.stream:
        state = _CompletionStream(ctx, body, model, requests, sum(len(ids) for ids in prompts))
        return stream_events(request, state, generation)
    try:
        results = await collect(generation, request)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = []
    for index, (engine_request, outputs) in enumerate(zip(requests, results)):
        text = "".join(o.text for o in outputs)
        if body.echo:
            text = engine.decode(engine_request.prompt_token_ids) + text
        logprobs = completion_logprobs(engine, outputs) if body.logprobs is not None else None
        choices.append(CompletionChoice(index=index, text=text, finish_reason=outputs[-1].finish_reason,
                                        logprobs=logprobs))
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(outputs[-1].completion_tokens for outputs in results)
    return CompletionResponse(model=model, choices=choices,
                              usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                          total_tokens=prompt_tokens + completion_tokens))


class _CompletionStream(StreamState):
    """Chunks of a streamed completion (``object: text_completion``)."""

    chunk_object = "text_completion"

    def __init__(self, ctx: ServerContext, body: CompletionRequest, model: str, requests, prompt_tokens: int):
        super().__init__(ctx.engine, f"cmpl-{uuid.uuid4().hex}", model, requests, body.include_usage, prompt_tokens)
        self.body = body
        self.offsets = [0] * len(requests)

    def _chunk(self, index: int, text: str, finish_reason: str | None, logprobs=None) -> dict:
        return self.envelope([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])

    def opening(self, index: int) -> list[dict]:
        if not self.body.echo:
            return []
        prompt = self.engine.decode(self.requests[index].prompt_token_ids)
        self.offsets[index] = len(prompt)
        return [self._chunk(index, prompt, None)]

    def update(self, index: int, output: RequestOutput) -> list[dict]:
        logprobs = None
        if self.body.logprobs is not None and output.logprobs:
            logprobs = completion_logprobs(self.engine, [output], self.offsets[index])
            self.offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            logprobs = logprobs.model_dump()
        if not output.text and not output.finished and logprobs is None:
            return []
        return [self._chunk(index, output.text, output.finish_reason if output.finished else None, logprobs)]
