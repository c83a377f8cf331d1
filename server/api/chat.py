"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, streamed or not."""
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
from server.api.protocol import AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, \
    ChatMessage, ChoiceLogprobs, PromptTokensDetails, TokenLogprob, TopLogprob, Usage
from server.api.streaming import StreamState, stream_events
from server.engine.request import RequestOutput

router = APIRouter()

ROLE_ALIASES = {"developer": "system"}


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, add_special_tokens: bool = False) -> list[int]:
    """Render ``messages`` with the chat template and tokenize it.

    By default the template opens the assistant's turn (``add_generation_prompt``) and writes the
    special tokens (bos) itself, so none are added on top (``add_special_tokens``);
    ``continue_final_message`` leaves the last message open instead (HF / vLLM semantics).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    conversation = [{"role": ROLE_ALIASES.get(m.role, m.role), "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
    except Exception as exc:  # jinja2 errors, raise_exception() in the template
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def chat_logprobs(engine, outputs: list[RequestOutput]) -> ChoiceLogprobs:
    content = []
    for output in outputs:
        for entry in output.logprobs or ():
            token = engine.decode([entry.token_id])
            top = [TopLogprob(token=(t := engine.decode([tid])), logprob=lp, bytes=list(t.encode()))
                   for tid, lp in entry.top]
            content.append(TokenLogprob(token=token, logprob=entry.logprob, bytes=list(token.encode()),
                                        top_logprobs=top))
    return ChoiceLogprobs(content=content)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 ctx: ServerContext = Depends(get_context)):
    arrival = time.monotonic()
    engine = ctx.engine
    adapters = view_or_none(ctx, request)
    adapter, composition = resolve_target(ctx, body, adapters)
    request.state.adapter_label = ctx.metrics.adapter_label(adapter or (composition and composition.describe()))
    prompt = chat_prompt_ids(engine.tokenizer, body.messages)
    params = sampling_params(body, body.token_limit, body.engine_logprobs)
    requests = make_requests(engine, [prompt], params, adapter, body.n, composition,
                             ctx.tenant_of(getattr(request.state, "caller", None)))
    model = adapters.shown(adapter) if adapter else engine.model_name  # the caller's name for it
    generation = Generation(ctx, requests, arrival)
    if body.stream:
        state = _ChatStream(ctx, body, model, requests, len(prompt))
        return stream_events(request, state, generation)
    try:
        results = await collect(generation, request)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = [ChatChoice(index=index, message=AssistantMessage(content="".join(o.text for o in outputs)),
                          finish_reason=outputs[-1].finish_reason,
                          logprobs=chat_logprobs(engine, outputs) if body.logprobs else None)
               for index, outputs in enumerate(results)]
    completion_tokens = sum(outputs[-1].completion_tokens for outputs in results)
    cached = sum(outputs[-1].cached_tokens for outputs in results)
    return ChatCompletionResponse(model=model, choices=choices,
                                  usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                                              total_tokens=len(prompt) + completion_tokens,
                                              prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)))


class _ChatStream(StreamState):
    """Chunks of a streamed chat completion (``object: chat.completion.chunk``)."""

    chunk_object = "chat.completion.chunk"

    def __init__(self, ctx: ServerContext, body: ChatCompletionRequest, model: str, requests, prompt_tokens: int):
        super().__init__(ctx.engine, f"chatcmpl-{uuid.uuid4().hex}", model, requests, body.include_usage,
                         prompt_tokens)
        self.body = body

    def _chunk(self, index: int, delta: dict, finish_reason: str | None, logprobs=None) -> dict:
        return self.envelope([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def opening(self, index: int) -> list[dict]:
        return [self._chunk(index, {"role": "assistant", "content": ""}, None)]

    def update(self, index: int, output: RequestOutput) -> list[dict]:
        logprobs = None
        if self.body.logprobs and output.logprobs:
            logprobs = chat_logprobs(self.engine, [output]).model_dump()
        chunks = []
        if output.text or logprobs is not None:
            chunks.append(self._chunk(index, {"content": output.text}, None, logprobs))
        if output.finished:
            chunks.append(self._chunk(index, {}, output.finish_reason))
        return chunks
