"""GET /v1/models (the base model and every stored adapter) and GET /v1/models/{id}."""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends

from server.api.context import ServerContext, get_context
from server.api.errors import APIError
from server.api.protocol import ModelCard, ModelList

router = APIRouter()


def _created(iso: str, default: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return default


def model_cards(ctx: ServerContext) -> list[ModelCard]:
    """The base and every stored adapter; ``max_model_len`` is the engine's context for each (a prefix
    adapter's virtual tokens count against it, as they do in the KV cache)."""
    base, max_len = ctx.engine.model_name, ctx.engine.max_seq_len
    cards = [ModelCard(id=base, created=ctx.started_at, kind="base", root=base, max_model_len=max_len)]
    store = getattr(ctx.engine, "adapter_store", None)
    for record in store.list() if store is not None else ():
        cards.append(ModelCard(id=record.name, created=_created(record.created_at, ctx.started_at), kind=record.kind,
                               parent=base, root=base, max_model_len=max_len))
    return cards


@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: ServerContext = Depends(get_context)):
    return ModelList(data=model_cards(ctx))


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, ctx: ServerContext = Depends(get_context)):
    for card in model_cards(ctx):
        if card.id == model_id:
            return card
    raise APIError(404, f"model {model_id!r} not found", param="model", code="model_not_found")
