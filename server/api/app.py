"""The FastAPI application: routes translate HTTP bodies into engine requests and back.

No tensors here: prompts become token ids through the engine's tokenizer, and
engine outputs (token ids, text, logprobs) become OpenAI-shaped JSON.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.errors import APIError, install_error_handlers
from server.api.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                 Usage)
from server.engine.engine import Engine
from server.engine.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="adapter-server", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, "running": engine.num_running,
                "waiting": engine.num_waiting}

    @app.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True)
    async def completions(body: CompletionRequest):
        if body.stream:
            raise APIError(400, "streaming is not supported yet", param="stream")
        prompts = _prompts(engine, body.prompt)
        params = _sampling_params(body)
        requests = [engine.make_request(ids, params, adapter=body.adapter) for ids in prompts for _ in range(body.n)]
        results = await asyncio.gather(*(_collect(engine, r) for r in requests))
        choices = []
        for index, (request, outputs) in enumerate(zip(requests, results)):
            text = "".join(o.text for o in outputs)
            if body.echo:
                text = engine.decode(request.prompt_token_ids) + text
            choices.append(CompletionChoice(index=index, text=text, finish_reason=outputs[-1].finish_reason,
                                            logprobs=_logprobs(engine, outputs) if body.logprobs is not None else None))
        prompt_tokens = sum(len(ids) for ids in prompts)
        completion_tokens = sum(outputs[-1].completion_tokens for outputs in results)
        return CompletionResponse(model=body.model or engine.model_name, choices=choices,
                                  usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens))

    return app


def _prompts(engine: Engine, prompt) -> list[list[int]]:
    """The OpenAI prompt forms: a string, a list of strings, a token list, a list of token lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if any(len(p) == 0 for p in prompt):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return [engine.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _sampling_params(body: CompletionRequest) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, seed=body.seed, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
                          ignore_eos=body.ignore_eos, logprobs=body.logprobs)


async def _collect(engine: Engine, request) -> list[RequestOutput]:
    stream = engine.stream(request)
    try:
        outputs = [output async for output in stream]
    finally:
        stream.abort()  # a cancelled handler (client gone) frees the row; no-op once finished
    if outputs[-1].finish_reason == "error":
        raise APIError(500, outputs[-1].error or "generation failed")
    return outputs


def _logprobs(engine: Engine, outputs: list[RequestOutput]) -> CompletionLogprobs:
    result = CompletionLogprobs()
    offset = 0
    for output in outputs:
        for entry in output.logprobs or ():
            token = engine.decode([entry.token_id])
            result.tokens.append(token)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append({engine.decode([t]): lp for t, lp in entry.top} or None)
            result.text_offset.append(offset)
            offset += len(token)
    return result
