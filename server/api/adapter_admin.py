"""Adapter management under /v1/adapters (admin scope): upload, list, get one, delete.

Uploads are unpacked into a private temp dir (see :mod:`server.api.uploads`) and handed to the
store, which copies, checks (format checks plus ``engine.validate_adapter`` against the loaded
base) and commits atomically; the temp dir is removed whatever happens, so a failed upload
leaves nothing behind. Overwriting needs ``overwrite=true``. After an overwrite or a delete the
engine is told to drop its cached copy: running requests finish with the weights they started
with, new ones load the new version.

Every name goes through the caller's view of the store (:mod:`server.api.tenancy`): a tenant's admin
key writes and deletes in its own namespace only, and another tenant's adapter is a 404 like a name
that does not exist.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters.format import AdapterError
from adapters.store import AdapterRecord, StoreError, validate_name
from server.api.context import ServerContext, get_context
from server.api.errors import APIError
from server.api.protocol import AdapterDeleted, AdapterInfo, AdapterList
from server.api.tenancy import AdapterView, view
from server.api.uploads import read_form, unpack_upload

router = APIRouter()

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("", "0", "false", "no", "off")


def adapter_info(record: AdapterRecord, shown: str | None = None) -> AdapterInfo:
    shown = shown or record.name
    return AdapterInfo(id=shown, name=shown, kind=record.kind, rank=record.rank,
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


def _record(adapters: AdapterView, name: str) -> tuple[str, AdapterRecord]:
    """(stored name, record) of the adapter the caller calls ``name``; 404 if it sees none."""
    stored = adapters.stored(name)  # AdapterNotFound -> 404
    return stored, adapters.store.get(stored)


def _owned(adapters: AdapterView, name: str) -> str:
    """The stored name of ``name`` in the caller's own namespace, which it may delete; 404 if it sees none
    (a shared adapter of the operator's is seen by a tenant but is not its own to delete: 403)."""
    stored = adapters.stored(name)
    if stored != adapters.own(name):
        raise APIError(403, f"adapter {name!r} is shared by the operator; a tenant's key may not delete it",
                       code="insufficient_scope")
    return stored


def _renamed(exc: Exception, stored: str, shown: str) -> Exception:
    """``exc`` with the stored name in its message replaced by the caller's (a tenant never sees '<t>~')."""
    if stored != shown and repr(stored) in str(exc):
        return type(exc)(str(exc).replace(repr(stored), repr(shown)))
    return exc


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo)
async def upload_adapter(request: Request, ctx: ServerContext = Depends(get_context)):
    adapters = view(ctx, request)
    form = await read_form(request, ctx.config.max_upload_bytes)
    try:
        name, overwrite, files = _upload_fields(form, request)
        stored = adapters.own(name)
        record = await run_in_threadpool(_store_upload, ctx, adapters.store, stored, name, overwrite, files)
    finally:
        await form.close()
    _invalidate(ctx.engine, stored)  # an overwrite, or a name deleted and uploaded again: no stale copies
    return adapter_info(record, name)


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


def _store_upload(ctx: ServerContext, store, stored: str, shown: str, overwrite: bool,
                  files: list[UploadFile]) -> AdapterRecord:
    """Unpack into a private temp dir and add to the store as ``stored`` (runs in a worker thread); the temp
    dir always goes. Messages name the adapter as the caller does (``shown``)."""
    validate_adapter = getattr(ctx.engine, "validate_adapter", None)
    validate = (lambda path: validate_adapter(path, stored)) if validate_adapter is not None else None
    with tempfile.TemporaryDirectory(prefix="adapter-upload-") as workdir:
        try:
            adapter_dir = unpack_upload(files, Path(workdir), ctx.config.max_upload_bytes)
            return store.add(stored, adapter_dir, overwrite=overwrite, validate=validate)
        except AdapterError as exc:
            message = _scrub(str(exc), [Path(workdir) / "adapter", Path(workdir)])
            staged = re.escape(str(Path(store.root) / ".staging")) + r"/tmp\.[0-9a-f]{32}\." + re.escape(stored)
            raise APIError(400, re.sub(staged, "the upload", message).replace(repr(stored), repr(shown))) from None
        except StoreError as exc:
            raise _renamed(exc, stored, shown) from None


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(request: Request, ctx: ServerContext = Depends(get_context)):
    return AdapterList(data=[adapter_info(record, shown) for shown, record in view(ctx, request).records()])


@router.get("/v1/adapters/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, request: Request, ctx: ServerContext = Depends(get_context)):
    _, record = _record(view(ctx, request), name)
    return adapter_info(record, name)


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted)
async def delete_adapter(name: str, request: Request, ctx: ServerContext = Depends(get_context)):
    adapters = view(ctx, request)
    stored = _owned(adapters, name)
    await run_in_threadpool(adapters.store.delete, stored)
    _invalidate(ctx.engine, stored)
    return AdapterDeleted(id=name)


def _invalidate(engine, name: str) -> None:
    invalidate = getattr(engine, "invalidate_adapter", None)
    if invalidate is not None:
        invalidate(name)
