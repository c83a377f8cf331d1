"""The adapter store on disk: the source of truth for which adapters exist.

Layout under ``root``::

    index.json            {"version": 1, "adapters": {name: AdapterRecord.to_dict()}}
    .lock                 fcntl lock file guarding index.json and renames across processes
    adapters/<name>/      adapter_config.json, adapter_model.safetensors [, README.md]
    .staging/             in-flight work: tmp.<id>.<name> (being written),
                          old.<id>.<name> (replaced, about to be removed),
                          del.<id>.<name> (deleted, about to be removed)

Writes are atomic: files are copied into ``.staging/tmp.*``, fsynced, checked (format checks plus
the caller's ``validate`` hook), then renamed into ``adapters/``. An overwrite renames the old
directory aside, renames the new one in, updates the index and only then removes the old one;
any failure before the index is written puts the old directory back. ``index.json`` is
replaced with temp file + fsync + ``os.replace``. On start the store finishes or rolls back
whatever a crash left in ``.staging`` and reconciles the index with the directories present.

Only ``adapter_config.json``, ``adapter_model.safetensors`` and an optional ``README.md`` are
copied (an AdapterHub bottleneck adapter's ``adapter.safetensors`` is stored as ``adapter_model.safetensors``); other files in the source (tokenizer files, training state) are ignored and never read.
Pickle weight files are refused by :mod:`adapters.format`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from adapters.format import CONFIG_NAME, WEIGHTS_NAME, AdapterError, inspect_adapter_dir
from adapters.peft_files import HUB_HEAD_FILES, HUB_WEIGHTS_NAME
from adapters.fsutil import fsync_path

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch (no "$" newline hole)
INDEX_NAME = "index.json"
README_NAME = "README.md"
COPIED_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME)
_CHUNK = 1 << 20


class StoreError(Exception):
    """Base of the store's own errors (not-found, exists, too large). ``http_status`` for the API."""

    http_status = 500


class AdapterNotFound(StoreError, KeyError):
    http_status = 404

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterExists(StoreError):
    http_status = 409


class AdapterTooLarge(StoreError):
    http_status = 413


@dataclass(frozen=True)
class AdapterRecord:
    """One stored adapter, as kept in ``index.json``. ``sha256`` is of the weights file."""

    name: str
    kind: str
    rank: int
    target_modules: tuple[str, ...]
    base_model: str | None
    num_virtual_tokens: int
    size_bytes: int
    sha256: str
    created_at: str  # ISO 8601, UTC

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterRecord":
        return cls(name=str(d["name"]), kind=str(d["kind"]), rank=int(d["rank"]),
                   target_modules=tuple(d["target_modules"]), base_model=d.get("base_model"),
                   num_virtual_tokens=int(d.get("num_virtual_tokens", 0)), size_bytes=int(d["size_bytes"]),
                   sha256=str(d["sha256"]), created_at=str(d["created_at"]))


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise :class:`AdapterError`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-64 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, without '..'")
    return name


# A tenant's adapter is stored as "<tenant>~<name>". '~' is in no valid name, so no client-chosen name can
# spell another tenant's stored name, and the operator's (shared) adapters keep their plain names.
TENANT_SEP = "~"


def stored_name(tenant: str | None, name: str) -> str:
    """The store's name of adapter ``name`` in ``tenant``'s namespace (the operator's: None)."""
    validate_name(name)
    return name if tenant is None else f"{validate_name(tenant)}{TENANT_SEP}{name}"


def split_stored_name(stored: str) -> tuple[str | None, str]:
    """(tenant or None, the name its tenant calls it)."""
    tenant, sep, name = stored.partition(TENANT_SEP)
    return (tenant, name) if sep else (None, stored)


def _validate_stored(stored: str) -> str:
    if not isinstance(stored, str) or stored.count(TENANT_SEP) > 1:
        raise AdapterError(f"invalid adapter name {stored!r}")
    tenant, name = split_stored_name(stored)
    return stored_name(tenant, name)


def _copy_file(src: Path, dst: Path) -> str:
    """Copy ``src`` to ``dst``, fsync it, and return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    # O_NOFOLLOW: a file swapped for a symbolic link after the caller's checks is refused, not followed
    with os.fdopen(os.open(src, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _in_use(path: Path) -> bool:
    """Whether another add (in any process) holds the flock on the staging directory ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record(name: str, directory: Path, sha256: str, created_at: str) -> AdapterRecord:
    info = inspect_adapter_dir(directory)
    size = sum((directory / f).stat().st_size for f in COPIED_FILES if (directory / f).is_file())
    return AdapterRecord(name=name, kind=info["kind"], rank=info["rank"],
                         target_modules=tuple(info["target_modules"]), base_model=info["base_model"],
                         num_virtual_tokens=info["num_virtual_tokens"], size_bytes=size, sha256=sha256,
                         created_at=created_at)


class AdapterStore:
    """Adapters on disk under ``root``; safe for several threads and processes."""

    def __init__(self, root: Path, *, max_adapter_bytes: int = 512 * 2**20) -> None:
        self.root = Path(root)
        self.max_adapter_bytes = int(max_adapter_bytes)
        self._dir = self.root / "adapters"
        self._staging = self.root / ".staging"
        self._index = self.root / INDEX_NAME
        self._thread_lock = threading.Lock()
        self._parsed: list | None = None  # [stat stamp, {name: record}, sorted records or None]
        for d in (self.root, self._dir, self._staging):
            d.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._recover()

    # ---------------------------------------------------------------------------- public API

    def add(self, name: str, src_dir: Path, *, overwrite: bool = False,
            validate: Callable[[Path], None] | None = None) -> AdapterRecord:
        """Copy the PEFT adapter in ``src_dir`` into the store as ``name``, atomically.

        ``validate(path)`` (e.g. ``load_adapter`` against the loaded base) runs on the staged
        copy (a directory whose basename is *not* ``name``) before it is committed; if it raises, nothing is written. Raises AdapterError
        (bad name or adapter), AdapterExists (name taken and not ``overwrite``),
        AdapterTooLarge (files exceed ``max_adapter_bytes``).
        """
        _validate_stored(name)
        src_dir = Path(src_dir)
        inspect_adapter_dir(src_dir)  # cheap refusal (pickles, bad config) before copying anything
        # source name -> stored name: an AdapterHub adapter's adapter.safetensors is stored as WEIGHTS_NAME
        names = {f: f for f in COPIED_FILES if (src_dir / f).is_file()}
        if WEIGHTS_NAME not in names and (src_dir / HUB_WEIGHTS_NAME).is_file():
            names[HUB_WEIGHTS_NAME] = WEIGHTS_NAME
        files = list(names)
        # an AdapterHub saved head: copied for ``validate`` to compare with the base's lm_head, then dropped
        head = [f for f in HUB_HEAD_FILES if (src_dir / f).is_file()]
        if head and validate is None:
            raise AdapterError(f"{head[0]} in {src_dir} is a saved prediction head, which can be checked only "
                               "against a loaded base; upload it to the server, or save the adapter with "
                               "save_adapter(..., with_head=False)")
        for f in files + head:
            if (src_dir / f).is_symlink():
                raise AdapterError(f"{f} in {src_dir} is a symbolic link; upload the file itself")
        total = sum((src_dir / f).stat().st_size for f in files)
        if total > self.max_adapter_bytes:
            raise AdapterTooLarge(f"adapter {name!r} is {total} bytes, over the store limit of "
                                  f"{self.max_adapter_bytes} bytes")
        if not overwrite and self._exists(name):
            raise AdapterExists(f"adapter {name!r} already exists; delete it first or overwrite it")

        staged = self._staging / f"tmp.{uuid.uuid4().hex}.{name}"
        staged.mkdir()
        busy = os.open(staged, os.O_RDONLY)  # flock held while staging: recovery elsewhere leaves it alone
        fcntl.flock(busy, fcntl.LOCK_EX)
        try:
            sha = ""
            for f in files:
                digest = _copy_file(src_dir / f, staged / names[f])
                if names[f] == WEIGHTS_NAME:
                    sha = digest
            fsync_path(staged)
            size = sum((staged / names[f]).stat().st_size for f in files)
            if size > self.max_adapter_bytes:  # the source grew while we copied
                raise AdapterTooLarge(f"adapter {name!r} is {size} bytes, over the store limit of "
                                      f"{self.max_adapter_bytes} bytes")
            record = _record(name, staged, sha, _now())  # re-check what was actually copied
            for f in head:
                _copy_file(src_dir / f, staged / f)
            if validate is not None:
                validate(staged)
            for f in head:
                (staged / f).unlink()
            with self._locked():
                self._commit(name, staged, record, overwrite)
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
            os.close(busy)
        log.info("stored adapter %s (%s, %d bytes)", name, record.kind, record.size_bytes)
        return record

    def list(self) -> list[AdapterRecord]:
        """All adapters, sorted by name (sorted once per change of the index, not per call)."""
        entries = self._index_view()
        cached = self._parsed
        if cached is None or cached[1] is not entries:  # no index file, or another thread just replaced it
            return [entries[n] for n in sorted(entries)]
        if cached[2] is None:
            cached[2] = [cached[1][n] for n in sorted(cached[1])]
        return list(cached[2])

    def get(self, name: str) -> AdapterRecord:
        """One record: a dict lookup in the parsed index (O(1); the index is re-read only when the file changed)."""
        _validate_stored(name)
        try:
            return self._index_view()[name]
        except KeyError:
            raise AdapterNotFound(f"adapter {name!r} not found") from None

    def __len__(self) -> int:
        return len(self._index_view())

    def path(self, name: str) -> Path:
        """Directory holding the adapter's PEFT files."""
        self.get(name)
        return self._dir / name

    def delete(self, name: str) -> None:
        _validate_stored(name)
        with self._locked():
            entries = self._read_index()
            target = self._dir / name
            if name not in entries and not target.exists():
                raise AdapterNotFound(f"adapter {name!r} not found")
            doomed = self._staging / f"del.{uuid.uuid4().hex}.{name}"
            if target.exists():
                os.rename(target, doomed)
                fsync_path(self._dir)
            entries.pop(name, None)
            self._write_index(entries)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("deleted adapter %s", name)

    # ---------------------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Thread lock + exclusive fcntl lock on ``root/.lock`` (other processes)."""
        with self._thread_lock:
            with open(self.root / ".lock", "a+") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _exists(self, name: str) -> bool:
        return name in self._index_view() or (self._dir / name).exists()

    def _commit(self, name: str, staged: Path, record: AdapterRecord, overwrite: bool) -> None:
        """Rename ``staged`` into place and index it. Caller holds the lock."""
        target = self._dir / name
        entries = self._read_index()
        if not overwrite and (name in entries or target.exists()):
            raise AdapterExists(f"adapter {name!r} already exists; delete it first or overwrite it")
        aside = self._staging / f"old.{uuid.uuid4().hex}.{name}" if target.exists() else None
        if aside is not None:
            os.rename(target, aside)
        try:
            os.rename(staged, target)
            fsync_path(self._dir)
            entries[name] = record
            self._write_index(entries)
        except BaseException:
            # roll back: put the old directory (if any) back where it was
            if target.exists() and aside is not None:
                os.rename(target, staged)
            if aside is not None:
                os.rename(aside, target)
            elif target.exists() and not staged.exists():
                os.rename(target, staged)
            fsync_path(self._dir)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _read_index(self) -> dict[str, AdapterRecord]:
        """A copy of the index that the caller may change (writers: add, delete, recovery)."""
        return dict(self._index_view())

    def _index_view(self) -> dict[str, AdapterRecord]:
        """The index as stored now (another process may have written it), shared: never change it. Parsed again
        only when the file changed. Every write replaces the file (a new inode), so (inode, mtime, size) tells a
        change; a stat costs microseconds where parsing 200 records took 0.8 ms, paid 2-3 times per adapter
        request. Readers get the cached dict itself, so a lookup is O(1) with 1,000+ adapters (copying it was
        O(n) per request)."""
        try:
            st = os.stat(self._index)
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._parsed
        if cached is None or cached[0] != stamp:
            raw = json.loads(self._index.read_text(encoding="utf-8"))
            entries = {n: AdapterRecord.from_dict(d) for n, d in raw.get("adapters", {}).items()}
            cached = self._parsed = [stamp, entries, None]  # [stamp, records, sorted list (built by list())]
        return cached[1]

    def _write_index(self, entries: dict[str, AdapterRecord]) -> None:
        payload = {"version": 1, "adapters": {n: entries[n].to_dict() for n in sorted(entries)}}
        tmp = self.root / f".{INDEX_NAME}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._index)
            self._parsed = None  # never trust the stamp for our own writes (a freed inode can be reused)
            fsync_path(self.root)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _recover(self) -> None:
        """Undo or finish what a crash left behind, then reconcile the index. Caller holds the lock.

        ``tmp.*`` and ``del.*`` leftovers are removed. An ``old.*`` directory (an overwrite that
        was interrupted) is put back when its name has no directory, or when the index still
        records the old weights (the index is the commit point: the overwrite never finished);
        otherwise the overwrite completed and it is removed.
        """
        for leftover in self.root.glob(f".{INDEX_NAME}.*.tmp"):
            leftover.unlink(missing_ok=True)
        try:
            entries = self._read_index()
            changed = False
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("index %s is unreadable; rebuilding it from the adapter directories", self._index)
            entries = {}
            changed = True
        for entry in sorted(self._staging.iterdir()):
            parts = entry.name.split(".", 2)
            kind, name = (parts[0], parts[2]) if len(parts) == 3 else ("", "")
            if kind == "old" and NAME_RE.fullmatch(name) and ".." not in name and entry.is_dir():
                target = self._dir / name
                if not target.exists():
                    log.warning("restoring adapter %s left aside by an interrupted overwrite", name)
                    os.rename(entry, target)
                    continue
                rec = entries.get(name)
                if (rec is not None and (entry / WEIGHTS_NAME).is_file()
                        and rec.sha256 == _sha256(entry / WEIGHTS_NAME)
                        and not ((target / WEIGHTS_NAME).is_file() and rec.sha256 == _sha256(target / WEIGHTS_NAME))):
                    log.warning("rolling back interrupted overwrite of adapter %s", name)
                    doomed = self._staging / f"del.{uuid.uuid4().hex}.{name}"
                    os.rename(target, doomed)
                    os.rename(entry, target)
                    fsync_path(self._dir)
                    shutil.rmtree(doomed, ignore_errors=True)
                    continue
            if kind == "tmp" and _in_use(entry):
                continue  # another process is staging an add right now
            log.info("removing leftover %s", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        for name in [n for n in entries if not (self._dir / n / WEIGHTS_NAME).is_file()]:
            log.warning("dropping index entry %s: its directory is missing", name)
            del entries[name]
            changed = True
        for d in sorted(self._dir.iterdir()):
            if d.name in entries or not d.is_dir():
                continue
            if not NAME_RE.fullmatch(d.name) or ".." in d.name:
                log.warning("ignoring %s: not a valid adapter name", d)
                continue
            try:
                created = datetime.fromtimestamp(d.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
                entries[d.name] = _record(d.name, d, _sha256(d / WEIGHTS_NAME), created)
            except (AdapterError, OSError) as exc:
                log.warning("ignoring %s: not a complete adapter (%s)", d, exc)
                continue
            log.warning("re-indexed adapter %s found without an index entry", d.name)
            changed = True
        if changed or not self._index.exists():
            self._write_index(entries)
