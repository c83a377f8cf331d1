"""POST /v1/completions: prompts (string, strings, token ids, lists of token ids) -> text, streamed or not."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.context import ServerContext, get_context
from server.api.errors import APIError
from server.api.tenancy import view_or_none
from server.api.generation import ClientDisconnected, Generation, collect, make_requests, resolve_target, \
    sampling_params
from server.api.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                 PromptTokensDetails, Usage)
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


LOGPROB_FLOOR = -9999.0  # -inf as OpenAI (and vLLM) write it: JSON has no infinity


class TokenTexts:
    """Each token's text as its sequence's decoded text shows it: what the token adds to the text of the
    tokens before it, decoded with up to WINDOW tokens of context (so a sentencepiece token keeps its
    leading space, which ``decode([token])`` strips). A token that ends inside a UTF-8 character adds ""
    and the token that completes it adds the character (the last one, ``final``, adds whatever is left).
    The texts of a whole sequence concatenate to its decoded text (up to the rare tokenizer whose decoding
    depends on more context than the window). Alternatives are decoded in the same context; distinct
    tokens can share a text (bytes of split characters, special tokens), so a top dict may hold fewer keys."""

    WINDOW = 4

    def __init__(self, decode):
        self.decode = decode
        self.ids: list[int] = []
        self.start = 0  # first token of the context window
        self.read = 0   # tokens whose text has been attributed

    def add(self, token_id: int, alternatives: list[int] = (), final: bool = False) -> tuple[str, list[str]]:
        """Append ``token_id``: its text, and the texts each of ``alternatives`` would have had in its place."""
        context = self.ids[self.start:]
        before = self.decode(self.ids[self.start:self.read]) if self.read > self.start else ""
        # the context's text, with the tokens still waiting for theirs
        shown = before if self.read == len(self.ids) else self.decode(context)
        self.ids.append(token_id)
        text = self.decode(context + [token_id])
        if (text.endswith("\ufffd") and not final) or not text.startswith(before):
            own = ""
        else:
            own = text[len(before):]
            self.read = len(self.ids)
            self.start = max(self.start, self.read - self.WINDOW)
        alt_texts = []
        for alt in alternatives:
            if alt == token_id:
                alt_texts.append(own)
                continue
            full = self.decode(context + [alt])
            alt_texts.append(full[len(shown):] if full.startswith(shown) else self.decode([alt]))
        return own, alt_texts


class ChoiceLogprobs:
    """The legacy logprobs object of one choice, built part by part (the prompt's, then generated tokens as
    they come): ``tokens`` (each token's text, :class:`TokenTexts`), ``token_logprobs`` (None for the first
    prompt token: nothing predicts it), ``top_logprobs`` (the token itself and the ``logprobs`` most likely
    tokens, text -> logprob, as vLLM returns them) and ``text_offset`` (where each token starts in the
    choice's returned text: the prompt's text when echoed, then the completion's)."""

    def __init__(self, engine):
        self.engine = engine
        self.generated = TokenTexts(engine.decode)
        self.base = 0       # where the completion's text starts in the returned text
        self.offset = 0     # of the next generated token, from base

    def prompt(self, token_ids: list[int], entries: list | None, text: str) -> CompletionLogprobs:
        if entries is None or len(entries) != len(token_ids):
            raise APIError(500, "the engine returned no prompt logprobs")
        part, _ = _part(TokenTexts(self.engine.decode), token_ids, entries, 0, len(text), final=True)
        self.base = len(text)
        return part

    def add(self, outputs: list[RequestOutput], limit: int | None = None) -> CompletionLogprobs:
        """The generated tokens of ``outputs``; offsets past ``limit`` characters of completion (a stop string
        cut the text inside a token) are clamped to it."""
        ids = [t for o in outputs for t in o.token_ids]
        entries = [e for o in outputs for e in (o.logprobs or [None] * len(o.token_ids))]
        final = bool(outputs) and outputs[-1].finished
        part, self.offset = _part(self.generated, ids, entries, self.offset, limit, final)
        part.text_offset = [self.base + offset for offset in part.text_offset]
        return part


def _part(texts: TokenTexts, token_ids: list[int], entries: list, offset: int, limit: int | None,
          final: bool = False) -> tuple[CompletionLogprobs, int]:
    """The logprobs object of ``token_ids`` (entries: TokenLogprob or None), offsets from ``offset`` (clamped
    to ``limit``; ``final``: they end the sequence); also returns the offset after the last token."""
    part = CompletionLogprobs()
    for n, (token_id, entry) in enumerate(zip(token_ids, entries)):
        top = entry.top if entry is not None else []
        own, alt_texts = texts.add(token_id, [t for t, _ in top], final and n == len(token_ids) - 1)
        part.tokens.append(own)
        part.text_offset.append(offset if limit is None else min(offset, limit))
        offset += len(own)
        if entry is None:
            part.token_logprobs.append(None)
            part.top_logprobs.append(None)
            continue
        logprob = max(entry.logprob, LOGPROB_FLOOR)
        part.token_logprobs.append(logprob)
        ranked = {own: logprob}
        for text, (_, lp) in zip(alt_texts, top):
            ranked[text] = max(ranked.get(text, LOGPROB_FLOOR), max(lp, LOGPROB_FLOOR))
        part.top_logprobs.append(ranked)
    return part, offset


def merged(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for part in parts:
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(result, field).extend(getattr(part, field))
    return result


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    arrival = time.monotonic()
    engine = ctx.engine
    adapters = view_or_none(ctx, request)
    adapter, composition = resolve_target(ctx, body, adapters)
    request.state.adapter_label = ctx.metrics.adapter_label(adapter or (composition and composition.describe()))
    prompts = prompt_token_ids(engine, body.prompt)
    params = sampling_params(body, body.max_tokens, body.logprobs,
                             prompt_logprobs=body.logprobs if body.echo else None)
    requests = make_requests(engine, prompts, params, adapter, body.n, composition,
                             ctx.tenant_of(getattr(request.state, "caller", None)))
    model = adapters.shown(adapter) if adapter else engine.model_name  # the caller's name for it
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
        completion = "".join(o.text for o in outputs)
        prompt = engine.decode(engine_request.prompt_token_ids) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            builder = ChoiceLogprobs(engine)
            parts = [builder.prompt(engine_request.prompt_token_ids, outputs[0].prompt_logprobs, prompt)] \
                if body.echo else []
            logprobs = merged(parts + [builder.add(outputs, limit=len(completion))])
        choices.append(CompletionChoice(index=index, text=prompt + completion,
                                        finish_reason=outputs[-1].finish_reason, logprobs=logprobs))
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(outputs[-1].completion_tokens for outputs in results)
    cached = sum(outputs[-1].cached_tokens for outputs in results)
    return CompletionResponse(model=model, choices=choices,
                              usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                          total_tokens=prompt_tokens + completion_tokens,
                                          prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)))


class _CompletionStream(StreamState):
    """Chunks of a streamed completion (``object: text_completion``). With echo, the prompt's text comes
    first in a chunk of its own: at once, or with echo and logprobs at the first output, when its logprobs
    are known (a request that generates nothing ends in that chunk)."""

    chunk_object = "text_completion"

    def __init__(self, ctx: ServerContext, body: CompletionRequest, model: str, requests, prompt_tokens: int):
        super().__init__(ctx.engine, f"cmpl-{uuid.uuid4().hex}", model, requests, body.include_usage, prompt_tokens)
        self.body = body
        self.logprobs = [ChoiceLogprobs(ctx.engine) for _ in requests] if body.logprobs is not None else None
        self.echo_pending = [body.echo and body.logprobs is not None] * len(requests)
        self.sent = [0] * len(requests)  # completion characters sent per choice

    def _chunk(self, index: int, text: str, finish_reason: str | None, logprobs=None) -> dict:
        return self.envelope([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])

    def opening(self, index: int) -> list[dict]:
        if not self.body.echo or self.body.logprobs is not None:
            return []
        return [self._chunk(index, self.engine.decode(self.requests[index].prompt_token_ids), None)]

    def update(self, index: int, output: RequestOutput) -> list[dict]:
        chunks = []
        finish_reason = output.finish_reason if output.finished else None
        if self.echo_pending[index]:
            self.echo_pending[index] = False
            ids = self.requests[index].prompt_token_ids
            prompt = self.engine.decode(ids)
            part = self.logprobs[index].prompt(ids, output.prompt_logprobs, prompt).model_dump()
            if not output.token_ids and not output.text:
                return [self._chunk(index, prompt, finish_reason, part)]
            chunks.append(self._chunk(index, prompt, None, part))
        self.sent[index] += len(output.text)
        logprobs = None
        if self.logprobs is not None and output.token_ids:
            limit = self.sent[index] if output.finished else None
            logprobs = self.logprobs[index].add([output], limit=limit).model_dump()
        if output.text or output.finished or logprobs is not None:
            chunks.append(self._chunk(index, output.text, finish_reason, logprobs))
        return chunks
