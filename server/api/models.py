"""GET /v1/models (the base model and every adapter the caller sees) and GET /v1/models/{id}."""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request

from server.api.context import ServerContext, get_context
from server.api.errors import APIError
from server.api.protocol import ModelCard, ModelList
from server.api.tenancy import AdapterView, view_or_none

router = APIRouter()


def _created(iso: str, default: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return default


def model_cards(ctx: ServerContext, adapters: AdapterView | None) -> list[ModelCard]:
    """The base and every adapter the caller sees (``adapters``), by the caller's names; ``max_model_len`` is
    the engine's context for each (a prefix adapter's virtual tokens count against it, as in the KV cache)."""
    base, max_len = ctx.engine.model_name, ctx.engine.max_seq_len
    cards = [ModelCard(id=base, created=ctx.started_at, kind="base", root=base, max_model_len=max_len)]
    for shown, record in adapters.records() if adapters is not None else ():
        cards.append(ModelCard(id=shown, created=_created(record.created_at, ctx.started_at), kind=record.kind,
                               parent=base, root=base, max_model_len=max_len))
    return cards


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, ctx: ServerContext = Depends(get_context)):
    return ModelList(data=model_cards(ctx, view_or_none(ctx, request)))


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, ctx: ServerContext = Depends(get_context)):
    for card in model_cards(ctx, view_or_none(ctx, request)):
        if card.id == model_id:
            return card
    raise APIError(404, f"model {model_id!r} not found", param="model", code="model_not_found")
