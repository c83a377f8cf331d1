"""vLLM's runtime adapter endpoints (admin scope): load an adapter from a server-side path, unload it.

``POST /v1/load_lora_adapter`` ``{"lora_name": ..., "lora_path": ...}`` and
``POST /v1/unload_lora_adapter`` ``{"lora_name": ...}``, answered as vLLM does (200 with a plain
``Success: ...`` text). Any adapter kind this server serves may be loaded this way, not only LoRA.

Loading by path is off unless the server is started with ``--adapter-load-root DIR``; then
``lora_path`` (absolute, or relative to DIR) must name a directory inside DIR, reached without any
symbolic link, holding no symbolic link. The adapter then goes through exactly what an upload
goes through: the store copies its PEFT files (refusing pickles, checking format, size and the
adapter against the loaded base) and commits it atomically under ``lora_name``. A taken name is
409, as for uploads (vLLM answers 400).
"""
from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from adapters.format import AdapterError
from adapters.store import StoreError, validate_name
from server.api.adapter_admin import _invalidate, _owned, _renamed
from server.api.context import ServerContext, get_context
from server.api.errors import APIError
from server.api.tenancy import view

router = APIRouter()
LOAD_PATH, UNLOAD_PATH = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False  # vLLM's: replace an adapter of that name (our uploads' overwrite)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=64)
    lora_int_id: int | None = Field(default=None, ge=0, le=2**31 - 1)  # vLLM's; ignored


def resolve_under_root(root: str | None, requested: str) -> Path:
    """The adapter directory ``requested`` names inside ``root``; 403 if loading by path is off, 400 for an
    escape (``..``, an absolute path elsewhere, a symbolic link anywhere on the way or inside)."""
    if root is None:
        raise APIError(403, "loading adapters by path is off on this server: start it with --adapter-load-root DIR, "
                       "or upload the adapter (POST /v1/adapters)", param="lora_path", code="load_by_path_disabled")
    if "\x00" in requested:
        raise APIError(400, "lora_path holds a NUL byte", param="lora_path")
    root_real = os.path.realpath(root)
    candidate = os.path.normpath(os.path.join(root_real, requested))  # an absolute `requested` replaces the root
    if candidate != root_real and not candidate.startswith(root_real + os.sep):
        raise APIError(400, f"lora_path {requested!r} is outside the adapter load root", param="lora_path")
    if os.path.realpath(candidate) != candidate:
        raise APIError(400, f"lora_path {requested!r} passes through a symbolic link, which is not followed",
                       param="lora_path")
    path = Path(candidate)
    if not path.is_dir():
        raise APIError(400, f"lora_path {requested!r} is not a directory under the adapter load root",
                       param="lora_path")
    links = sorted(p.name for p in path.iterdir() if p.is_symlink())
    if links:
        raise APIError(400, f"{links[0]} in lora_path {requested!r} is a symbolic link, which is not followed",
                       param="lora_path")
    return path


@router.post(LOAD_PATH, response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    adapters = view(ctx, request)
    validate_name(body.lora_name)
    stored = adapters.own(body.lora_name)  # a tenant's admin key loads into its own namespace
    path = resolve_under_root(ctx.config.adapter_load_root, body.lora_path)
    validate_adapter = getattr(ctx.engine, "validate_adapter", None)
    validate = (lambda staged: validate_adapter(staged, stored)) if validate_adapter is not None else None
    try:
        await run_in_threadpool(adapters.store.add, stored, path, overwrite=body.load_inplace, validate=validate)
    except AdapterError as exc:
        message = str(exc).replace(str(path), repr(body.lora_path)).replace(repr(stored), repr(body.lora_name))
        raise APIError(400, message, param="lora_path") from None
    except StoreError as exc:
        raise _renamed(exc, stored, body.lora_name) from None
    _invalidate(ctx.engine, stored)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post(UNLOAD_PATH, response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request,
                              ctx: ServerContext = Depends(get_context)):
    adapters = view(ctx, request)
    stored = _owned(adapters, body.lora_name)  # 404 when the caller sees no such adapter
    await run_in_threadpool(adapters.store.delete, stored)
    _invalidate(ctx.engine, stored)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
