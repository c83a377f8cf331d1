"""Adapter management under /v1/adapters (admin scope): upload, list, get one, delete.

Uploads are unpacked into a private temp dir (see :mod:`server.api.uploads`) and handed to the
store, which copies, checks (format checks plus ``engine.validate_adapter`` against the loaded
base) and commits atomically; the temp dir is removed whatever happens, so a failed upload
leaves nothing behind. Overwriting needs ``overwrite=true``. After an overwrite or a delete the
engine is told to drop its cached copy: running requests finish with the weights they started
with, new ones load the new version.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters.format import AdapterError
from adapters.store import AdapterNotFound, AdapterRecord, validate_name
from server.api.context import ServerContext, get_context
from server.api.errors import APIError
from server.api.protocol import AdapterDeleted, AdapterInfo, AdapterList
from server.api.uploads import read_form, unpack_upload

router = APIRouter()

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("", "0", "false", "no", "off")


def adapter_info(record: AdapterRecord) -> AdapterInfo:
    return AdapterInfo(id=record.name, name=record.name, kind=record.kind, rank=record.rank,
                       target_modules=list(record.target_modules), base_model=record.base_model,
                       num_virtual_tokens=record.num_virtual_tokens, size_bytes=record.size_bytes,
                       sha256=record.sha256, created_at=record.created_at)


def _flag(value: str | None, param: str) -> bool:
    value = (value or "").strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise APIError(400, f"{param} must be true or false, got {value!r}", param=param)


def _scrub(message: str, paths: list[Path]) -> str:
    """Server-side paths in a validation message become 'the upload'."""
    for path in sorted(paths, key=lambda p: len(str(p)), reverse=True):
        message = message.replace(str(path), "the upload")
    return message


def _record(store, name: str) -> AdapterRecord:
    try:
        return store.get(name)
    except AdapterError:  # not even a valid name: no adapter has it
        raise AdapterNotFound(f"adapter {name!r} not found") from None


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo)
async def upload_adapter(request: Request, ctx: ServerContext = Depends(get_context)):
    store = ctx.adapter_store
    form = await read_form(request, ctx.config.max_upload_bytes)
    try:
        name, overwrite, files = _upload_fields(form, request)
        record = await run_in_threadpool(_store_upload, ctx, store, name, overwrite, files)
    finally:
        await form.close()
    _invalidate(ctx.engine, name)  # an overwrite, or a name deleted and uploaded again: no stale copies
    return adapter_info(record)


def _upload_fields(form, request: Request) -> tuple[str, bool, list[UploadFile]]:
    """(name, overwrite, files) of an upload; form fields win over query parameters."""
    name = form.get("name") or request.query_params.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "the adapter's name is required (form field 'name')", param="name")
    validate_name(name)
    overwrite = form.get("overwrite")
    overwrite = _flag(overwrite if isinstance(overwrite, str) else request.query_params.get("overwrite"), "overwrite")
    files = [f for f in form.getlist("files") + form.getlist("file") if isinstance(f, UploadFile)]
    return name, overwrite, files


def _store_upload(ctx: ServerContext, store, name: str, overwrite: bool, files: list[UploadFile]) -> AdapterRecord:
    """Unpack into a private temp dir and add to the store (runs in a worker thread); the temp dir always goes."""
    validate_adapter = getattr(ctx.engine, "validate_adapter", None)
    validate = (lambda path: validate_adapter(path, name)) if validate_adapter is not None else None
    with tempfile.TemporaryDirectory(prefix="adapter-upload-") as workdir:
        try:
            adapter_dir = unpack_upload(files, Path(workdir), ctx.config.max_upload_bytes)
            return store.add(name, adapter_dir, overwrite=overwrite, validate=validate)
        except AdapterError as exc:
            message = _scrub(str(exc), [Path(workdir) / "adapter", Path(workdir)])
            staged = re.escape(str(Path(store.root) / ".staging")) + r"/tmp\.[0-9a-f]{32}\." + re.escape(name)
            raise APIError(400, re.sub(staged, "the upload", message)) from None


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(ctx: ServerContext = Depends(get_context)):
    return AdapterList(data=[adapter_info(r) for r in ctx.adapter_store.list()])


@router.get("/v1/adapters/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, ctx: ServerContext = Depends(get_context)):
    return adapter_info(_record(ctx.adapter_store, name))


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted)
async def delete_adapter(name: str, ctx: ServerContext = Depends(get_context)):
    store = ctx.adapter_store
    _record(store, name)
    await run_in_threadpool(store.delete, name)
    _invalidate(ctx.engine, name)
    return AdapterDeleted(id=name)


def _invalidate(engine, name: str) -> None:
    invalidate = getattr(engine, "invalidate_adapter", None)
    if invalidate is not None:
        invalidate(name)
