"""The CPU tier of adapters: validated adapters loaded from the store, LRU by bytes, loaded off the engine thread.

Keys are versions (``name@sha256-prefix``, adapters.composition.version_key) or composition keys. A load
starts when a request is submitted (`prefetch`) and runs on LOAD_THREADS background threads, so reading and
validating the files overlaps with the request's wait in the queue; the engine thread only polls
(`get`), never blocks on disk. A composition's combined adapter (adapters.kinds.composite) is built on
the engine thread once its members are here, and cached under its own key.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from adapters.composition import Composition, member_versions, names_of
from adapters.kinds import Adapter
from adapters.kinds.composite import compose
from server.engine import threads as torch_threads
from server.engine.request import AdmissionFailed


# Store reads in parallel: with one, a slow read (a large adapter, a cold disk) held up every load queued behind
# it, and so every request for another adapter (issue 26). Each read runs its torch ops inline on its thread.
LOAD_THREADS = 2


class AdapterLoadFailed(AdmissionFailed):
    """The adapter's files could not be loaded (the request fails with this message)."""


class AdapterCache:
    def __init__(self, load: Callable[[str], Adapter], max_bytes: int, pool=None,
                 on_ready: Callable[[], None] | None = None):
        """``load(name)`` reads and validates the stored adapter; ``pool.metrics`` (if set) counts loads;
        ``on_ready()`` is called on the loading thread after every load ends, loaded or failed (the engine
        wakes on it instead of polling: see server.engine.engine)."""
        self._load_fn, self.max_bytes, self._pool = load, max_bytes, pool
        self.on_ready = on_ready or (lambda: None)
        self._entries: OrderedDict[str, Adapter] = OrderedDict()
        self._bytes = 0
        self._loading: dict[str, Future] = {}  # loads not yet finished (a finished one leaves: it pins nothing)
        self._failed: dict[str, BaseException] = {}  # loads that raised, until the engine thread reads the error
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="adapter-load",
                                            initializer=torch_threads.inline_parallel_ops)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def loading(self, key: str) -> bool:
        return key in self._loading

    # ---- any thread ----

    def prefetch(self, key: str, name: str) -> None:
        """Start loading an adapter version unless it is here or on its way."""
        with self._lock:
            if key in self._entries or key in self._loading or key in self._failed:
                return
            self._loading[key] = self._executor.submit(self._load, key, name)

    def __len__(self) -> int:
        """Adapters resident in the CPU tier."""
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def invalidate(self, name: str) -> None:
        """Forget every cached version of `name` and every composition holding it."""
        with self._lock:
            for key in [k for k in self._entries if name in names_of(k)]:
                self._bytes -= self._entries.pop(key).nbytes
            for key in [k for k in self._failed if name in names_of(k)]:
                del self._failed[key]

    def run(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) on the loading thread (whose torch ops never get an OpenMP team), waited for."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: str, name: str) -> None:
        """Read one adapter into the cache. The finished future is dropped and returns nothing, so a load whose
        request went away pins no memory beyond the cache's byte bound (the cache's LRU is the only owner)."""
        start = time.perf_counter()
        try:
            adapter = self._load_fn(name)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
                self._failed[key] = exc
            self.on_ready()
            return
        self._put(key, adapter)
        with self._lock:
            self._loading.pop(key, None)
        self.on_ready()
        metrics = getattr(self._pool, "metrics", None)
        if metrics is not None:
            metrics.adapter_loads.inc()
            metrics.adapter_load_seconds.observe(time.perf_counter() - start)

    def _put(self, key: str, adapter: Adapter) -> None:
        with self._lock:
            self._entries[key] = adapter
            self._bytes += adapter.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes

    # ---- background threads (never the engine thread: this blocks) ----

    def wait(self, key: str, name: str) -> Adapter:
        """The adapter, waiting for its load (started here if none is on its way). Raises AdapterLoadFailed."""
        for _ in range(3):  # a load whose adapter the LRU dropped before it was taken is tried again
            with self._lock:
                adapter = self._entries.get(key)
                if adapter is not None:
                    self._entries.move_to_end(key)
                    return adapter
                error = self._failed.pop(key, None)
                future = self._loading.get(key)
                if error is None and future is None:
                    future = self._loading[key] = self._executor.submit(self._load, key, name)
            if error is not None:
                raise AdapterLoadFailed(f"adapter {name!r} could not be loaded: {error}") from error
            future.result()  # _load records a failure instead of raising
        raise AdapterLoadFailed(f"adapter {name!r} left the CPU cache before it could be used; raise "
                                "--adapter-cache-bytes")

    # ---- engine thread ----

    def get(self, key: str, name: str) -> Adapter | None:
        """The adapter if loaded (None while loading; starts a load if none is on its way). Raises AdapterLoadFailed."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
                return adapter
            error = self._failed.pop(key, None)
            loading = key in self._loading
        if error is not None:
            raise AdapterLoadFailed(f"adapter {name!r} could not be loaded: {error}") from error
        if not loading:
            self.prefetch(key, name)  # never asked for, or loaded and evicted before it was used
        return None

    def get_composite(self, composition: Composition, key: str) -> Adapter | None:
        """The combined adapter of a composition once all its members are loaded (None before)."""
        with self._lock:
            adapter = self._entries.get(key)
        if adapter is not None:
            return adapter
        loaded = {m.name: self.get(member_key, m.name) for m, member_key in zip(composition.members,
                                                                                member_versions(key))}
        if any(a is None for a in loaded.values()):
            return None
        adapter = compose(composition, loaded)
        self._put(key, adapter)  # counted by its own bytes (a weighted LoRA sum is new tensors)
        return adapter
