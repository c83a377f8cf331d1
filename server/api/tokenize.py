"""POST /tokenize and POST /detokenize, with vLLM's request and response shapes.

* ``/tokenize``: ``{"prompt": "..."}`` or ``{"messages": [...]}`` (rendered with the chat template,
  exactly as /v1/chat/completions renders them) -> ``{"tokens": [...], "count": N,
  "max_model_len": M, "token_strs": null | [...]}``. ``max_model_len`` is the engine's context
  (prompt + output tokens, prefix-tuning virtual tokens included).
* ``/detokenize``: ``{"tokens": [...]}`` -> ``{"prompt": "..."}``; special tokens are kept, so
  detokenizing what /tokenize returned gives back the text the model sees.

``model`` (or ``adapter``) is optional; when given it must name the base or a stored adapter (404
otherwise). Every adapter shares the base's tokenizer. Both routes need an inference key when keys
are configured (:mod:`server.api.auth`). Nothing here touches the engine's queue or tensors.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.chat import chat_prompt_ids
from server.api.context import ServerContext, get_context
from server.api.errors import APIError
from server.api.generation import resolve_adapter
from server.api.tenancy import view_or_none
from server.api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    engine = ctx.engine
    resolve_adapter(ctx, body.model, body.adapter, view_or_none(ctx, request))  # 404 for a model that is not served
    tokenizer = engine.tokenizer
    if body.messages is not None:
        tokens = chat_prompt_ids(tokenizer, body.messages, add_generation_prompt=body.generation_prompt,
                                 continue_final_message=body.continue_final_message,
                                 add_special_tokens=body.special_tokens)
    else:
        tokens = tokenizer.encode(body.prompt, add_special_tokens=body.special_tokens)
    tokens = list(tokens)
    token_strs = list(tokenizer.convert_ids_to_tokens(tokens)) if body.return_token_strs else None
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.max_seq_len, token_strs=token_strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    engine = ctx.engine
    resolve_adapter(ctx, body.model, body.adapter, view_or_none(ctx, request))
    vocab = engine.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens: token id {bad} is out of range; ids must be in [0, {vocab})", param="tokens")
    try:
        text = engine.tokenizer.decode(body.tokens, skip_special_tokens=False)
    except Exception as exc:  # an id the model has but the tokenizer does not (padded embeddings)
        raise APIError(400, f"tokens: the tokenizer cannot decode these ids: {exc}", param="tokens") from None
    return DetokenizeResponse(prompt=text)
