"""Durable writes: the helpers that store, trainer and the model caches (built-in, GGUF) share."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries, e.g. after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(target: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> None:
    """Create directory ``target`` atomically: ``write(tmp)`` fills a temp dir beside it, which is renamed
    into place and the parent fsynced (``write`` fsyncs its files).

    A ``target`` that exists but is not ``is_complete`` (damaged, or from an older recipe) is moved aside
    atomically and deleted first. A concurrent caller that wins the rename race leaves its directory in
    place and this one is dropped; a crash leaves only a stray ``.NAME.tmp-*`` dir, never a half-written
    ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists() and not is_complete(target):
            log.warning("replacing incomplete or outdated %s", target)
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.rename(target, trash / "old")
            except FileNotFoundError:
                pass  # another caller moved it first
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, target)  # fails if a concurrent caller already put one in place
        except OSError:
            if not is_complete(target):
                raise
            log.info("another process created %s first; using it", target)
        else:
            tmp = None
            fsync_path(target.parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
