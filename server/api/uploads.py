"""Receiving an adapter upload: a size-bounded multipart body, unpacked into a private temp dir.

An upload is either the PEFT files themselves (``adapter_config.json``,
``adapter_model.safetensors``, optionally ``README.md``; each part's filename is its name) or
exactly one archive of the adapter directory (``.tar.gz``, ``.tgz``, ``.tar`` or ``.zip``).
Archive members are never extracted by the archive library: each regular file is copied
by hand after its path is checked, so absolute paths, ``..``, backslashes, symbolic and hard
links, devices and FIFOs are refused (400), as are archives that unpack beyond the upload
limit or hold too many members (413). The adapter directory inside an archive is the one
directory holding ``adapter_config.json`` (at the top or nested, e.g. ``my-adapter/``).
"""
from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect

from adapters.format import CONFIG_NAME
from server.api.errors import APIError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_FILES = 16            # multipart file parts
MAX_ARCHIVE_MEMBERS = 256
_CHUNK = 1 << 20


def too_large(limit: int, what: str = "the upload") -> APIError:
    return APIError(413, f"{what} is larger than this server's limit of {limit} bytes", code="upload_too_large")


async def read_form(request: Request, max_bytes: int) -> FormData:
    """Parse the multipart body, refusing (413) as soon as it exceeds ``max_bytes``."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, "upload the adapter as multipart/form-data: a 'name' field and the PEFT files "
                       "(or one .tar.gz/.zip) as 'files'")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    received = 0

    async def limited_receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise too_large(max_bytes)
        return message

    limited = Request(request.scope, limited_receive)
    try:
        return await limited.form(max_files=MAX_FILES, max_fields=16)
    except ClientDisconnect:
        raise APIError(400, "the upload was interrupted") from None


def _safe_relative(name: str) -> PurePosixPath:
    """A member or file name as a safe relative path, or 400 naming the trick."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise APIError(400, f"refusing path {name!r}: absolute paths, drive letters and backslashes are not "
                       "allowed in an upload")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise APIError(400, f"refusing path {name!r}: '..' is not allowed in an upload")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


class _Budget:
    """Bytes left for unpacking; 413 once exhausted."""

    def __init__(self, limit: int):
        self.limit = limit
        self.left = limit

    def copy(self, src: IO[bytes], dst: Path) -> None:
        with open(dst, "xb") as out:
            while chunk := src.read(_CHUNK):
                self.left -= len(chunk)
                if self.left < 0:
                    raise too_large(self.limit, "the unpacked upload")
                out.write(chunk)


def _is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def unpack_upload(files: list[UploadFile], workdir: Path, max_bytes: int) -> Path:
    """Write the uploaded adapter under ``workdir`` and return the directory holding it."""
    if not files:
        raise APIError(400, "no files uploaded: send the PEFT files (or one .tar.gz/.zip) as 'files'",
                       param="files")
    budget = _Budget(max_bytes)
    archives = [f for f in files if _is_archive(f.filename or "")]
    if archives:
        if len(files) != 1:
            raise APIError(400, "upload either one archive or the adapter files, not both", param="files")
        return _unpack_archive(files[0], workdir / "archive", budget)
    target = workdir / "adapter"
    target.mkdir()
    for upload in files:
        relative = _safe_relative(upload.filename or "")
        if len(relative.parts) != 1 or relative.name in (".", ""):
            raise APIError(400, f"upload file names must be plain file names, got {upload.filename!r}",
                           param="files")
        if (target / relative.name).exists():
            raise APIError(400, f"{relative.name} was uploaded twice", param="files")
        upload.file.seek(0)
        budget.copy(upload.file, target / relative.name)
    return target


def _unpack_archive(upload: UploadFile, root: Path, budget: _Budget) -> Path:
    root.mkdir()
    upload.file.seek(0)
    name = (upload.filename or "").lower()
    try:
        if name.endswith(".zip"):
            _unpack_zip(upload.file, root, budget)
        else:
            _unpack_tar(upload.file, root, budget)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise APIError(400, f"{upload.filename} is not a readable {'zip' if name.endswith('.zip') else 'tar'} "
                       f"archive: {exc}") from None
    return _adapter_dir(root, upload.filename or "the archive")


def _member_path(root: Path, name: str, seen: set[PurePosixPath]) -> Path:
    relative = _safe_relative(name)
    if relative in seen:
        raise APIError(400, f"archive member {name!r} appears twice")
    seen.add(relative)
    return root / relative


def _unpack_tar(fileobj: IO[bytes], root: Path, budget: _Budget) -> None:
    seen: set[PurePosixPath] = set()
    with tarfile.open(fileobj=fileobj, mode="r:*") as archive:
        for count, member in enumerate(archive, start=1):
            if count > MAX_ARCHIVE_MEMBERS:
                raise too_large(MAX_ARCHIVE_MEMBERS, "the number of archive members")
            path = _member_path(root, member.name, seen)
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                path.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                budget.copy(source, path)
            else:
                kind = "link" if member.issym() or member.islnk() else "special file"
                raise APIError(400, f"archive member {member.name!r} is a {kind}; archives may hold only regular "
                               "files and directories")


def _unpack_zip(fileobj: IO[bytes], root: Path, budget: _Budget) -> None:
    seen: set[PurePosixPath] = set()
    with zipfile.ZipFile(fileobj) as archive:
        members = archive.infolist()
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise too_large(MAX_ARCHIVE_MEMBERS, "the number of archive members")
        for info in members:
            path = _member_path(root, info.filename, seen)
            file_type = stat.S_IFMT(info.external_attr >> 16)  # 0: written without unix file type bits
            if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise APIError(400, f"archive member {info.filename!r} is a link or special file; archives may "
                               "hold only regular files and directories")
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source:
                budget.copy(source, path)


def _adapter_dir(root: Path, archive_name: str) -> Path:
    """The one directory of the unpacked archive that holds adapter_config.json."""
    found = sorted(p.parent for p in root.rglob(CONFIG_NAME)
                   if p.is_file() and "__MACOSX" not in p.relative_to(root).parts)
    if not found:
        raise APIError(400, f"{archive_name} holds no {CONFIG_NAME}; archive the adapter directory that PEFT's "
                       "save_pretrained wrote")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found[:4])
        raise APIError(400, f"{archive_name} holds several adapters ({names}); upload one at a time")
    return found[0]
