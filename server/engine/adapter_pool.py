"""The adapter tiers: store on disk -> CPU cache (LRU by bytes, server.engine.adapter_cache) -> device slots
(LRU by count, here).

Loading from disk runs on a background thread and starts when a request is
submitted, so it overlaps with the request's wait in the queue. The scheduler
admits a request only once its adapter is in a device slot (`try_acquire`). When
the adapter is in the CPU cache and a slot can be had, the slot is reserved and
the copy into it runs on a second background thread ("adapter-slot"); the request
keeps waiting (others behind it are admitted meanwhile) and is admitted at the
first try after the copy finished. So neither the store read (~50 ms for a rank-16
q,k,v,o adapter of SmolLM2) nor the copy (~10 ms) ever runs on the engine thread.
Writing a slot while a forward runs is safe: the slot is unreferenced (no running
row reads it) and the slot tensors are written in place, never reallocated.
Soft prompts, whose K/V are computed through the model, are still written on the
engine thread. Slots are reference-counted by running rows, evicted LRU when
unreferenced, and the hot adapter, when merged, is pinned. How many slots there
are: server.engine.slot_sizing.

Every adapter kind (adapters.kinds) takes a slot: the adapter writes its per-layer state
(LoRA, IA3, DoRA) into the layers' slot tensors itself, and its prefix K/V, if any, live in
`prefix_kv[slot]` on the device (prompt tuning: its virtual tokens' K/V, computed through the
base when the slot is written). The pool never branches on a kind's name: it reads the
kind's `layer_state` (which any_* flags a forward needs) and `mergeable`. Keys are versions
(`name@sha256-prefix`) so that a replaced adapter never serves stale weights to
new requests while old requests finish on the old ones.

A composition (adapters.composition: several adapters on one request) takes one slot too, keyed by its
members' versions and weights: its members are loaded into the CPU cache like single adapters, combined
once (adapters.kinds.composite) and written into the slot; a change to any member retires it.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch
from adapters.composition import Composition, member_versions, names_of, resolve, version_key
from adapters.format import Adapter, BaseSpec, load_adapter
from adapters.store import AdapterRecord, AdapterStore
from server.engine import threads as torch_threads
from server.engine.adapter_cache import LOAD_THREADS, AdapterCache, AdapterLoadFailed
from server.engine.merge_policy import MergeDecision, MergePolicy
from server.engine.request import Request
from server.engine.slots import SlotTable
from server.model.adapter_layers import AdapterLinear, BatchMapping, write_slot
from server.model.merge import merge_slot, unmerge
from server.model.soft_prompt import soft_prompt_kv

__all__ = ["AdapterLoadFailed", "AdapterPool", "version_key"]

log = logging.getLogger(__name__)


@dataclass
class _SlotInfo:
    key: str
    kind: str
    rank: int
    layer_state: frozenset[str]  # per-layer state the adapter wrote ("lora", "ia3", "dora")
    mergeable: bool
    names: frozenset[str]  # the stored adapters it holds (several for a composition)


@dataclass
class _SlotWrite:
    """A load + copy into a reserved slot running on a slot thread; the reservation holds one slot reference."""

    slot: int
    future: Future  # -> (adapter, prefix K/V or None, whether the slot tensors hold it already)


class AdapterPool:
    def __init__(self, store: AdapterStore, base: BaseSpec, layers: dict[tuple[int, str], AdapterLinear],
                 mapping: BatchMapping, *, num_slots: int, max_rank: int, cpu_cache_bytes: int,
                 dtype: torch.dtype, device: torch.device, merge_policy: MergePolicy | None = None):
        self.store, self.base, self.layers, self.mapping = store, base, layers, mapping
        self.max_rank, self.cpu_cache_bytes = max_rank, cpu_cache_bytes
        self.dtype, self.device = dtype, device
        self.table = SlotTable(num_slots)
        self.slot_info: dict[int, _SlotInfo] = {}
        self.prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> K, V [L, Hkv, P, D]
        self.merge_policy = merge_policy
        mapping.owner = self  # the slot tensors are this pool's now; an older pool on this model must stop
        mapping.active = False
        unmerge(layers)  # an older pool's merge must not leak into this one
        self.merged_slot = 0
        self._metrics = None
        self._on_ready = lambda: None
        self.cpu = AdapterCache(lambda name: load_adapter(store.path(name), base, max_rank=max_rank, name=name,
                                                          dtype=dtype), cpu_cache_bytes, pool=self)
        self._lock = threading.Lock()
        self._pending_retire: set[str] = set()  # names invalidated by other threads, applied on the engine thread
        self.async_slot_writes = True  # False: copy into slots on the engine thread (a peer for benchmarks)
        self._slot_writer = ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="adapter-slot",
                                               initializer=torch_threads.inline_parallel_ops)
        self._writing: dict[str, _SlotWrite] = {}     # key -> its copy in flight (engine thread only)
        self._write_failed: dict[str, BaseException] = {}
        self._retire_after_write: set[str] = set()
        self._waiting_since: dict[str, float] = {}    # request id -> when it first waited for its slot
        self._staged: set[str] = set()                 # ids of waiting requests `stage` got (or is getting) a slot for

    # ---- any thread ----

    def record(self, name: str) -> AdapterRecord:
        """The store's record (raises AdapterNotFound)."""
        return self.store.get(name)

    def plan(self, composition: Composition) -> tuple[str, int]:
        """(slot key, virtual tokens) of a composition (adapters.composition.resolve)."""
        return resolve(self.store, composition, max_rank=self.max_rank)

    def validate(self, path, name: str) -> None:
        """Raise AdapterError unless the adapter at path can be served on this base (loaded on the CPU tier's
        loading thread, engine.threads)."""
        self.cpu.run(load_adapter, path, self.base, max_rank=self.max_rank, name=name, dtype=self.dtype)

    def prefetch(self, key: str, name: str) -> None:
        self.cpu.prefetch(key, name)

    def prefetch_request(self, request: Request) -> None:
        """Start loading what a submitted request needs: its adapter, or each member of its composition."""
        if request.composition is not None:
            for member, key in zip(request.composition.members, member_versions(request.adapter_version)):
                self.cpu.prefetch(key, member.name)
        elif request.adapter_version is not None and self.table.lookup(request.adapter_version) is None:
            self.cpu.prefetch(request.adapter_version, request.adapter)  # (a dict read: safe off the engine thread)

    def invalidate(self, name: str) -> None:
        """Forget every cached version of `name` and every composition holding it (after an overwrite or delete)."""
        self.cpu.invalidate(name)
        with self._lock:
            self._pending_retire.add(name)

    def close(self) -> None:
        self.cpu.close()
        self._slot_writer.shutdown(wait=False, cancel_futures=True)

    @property
    def on_ready(self):
        """Called from the loading and slot threads whenever a store read or a slot copy ends (loaded or failed),
        so that an engine with nothing else to run sleeps until then instead of polling `try_acquire`."""
        return self._on_ready

    @on_ready.setter
    def on_ready(self, callback) -> None:
        self._on_ready = callback
        self.cpu.on_ready = callback

    @property
    def metrics(self):
        return self._metrics

    @metrics.setter
    def metrics(self, metrics) -> None:
        self._metrics = metrics
        self._gauge()

    # ---- engine thread ----

    def try_acquire(self, request: Request) -> bool:
        """Give the request a slot holding its adapter; False if it must wait. Raises AdapterLoadFailed."""
        self._apply_retirements()
        key = request.adapter_version
        if key is None:
            return True
        if request.slot:  # staged while it waited: admitted on the slot it holds
            self._staged.discard(request.request_id)
            return True
        self._finish_writes()
        error = self._write_failed.pop(key, None)
        if error is not None:
            if isinstance(error, AdapterLoadFailed):
                raise AdapterLoadFailed(str(error)) from error
            raise AdapterLoadFailed(f"adapter {request.adapter!r} could not be written into a slot: {error}") from error
        if key in self._writing:
            return self._wait(request)
        if self.table.lookup(key) is not None:
            request.slot = self.table.acquire(key).slot
            self._waited(request, missed=request.request_id in self._waiting_since)
            self._gauge()
            return True
        if not self.table.can_acquire(key):
            return self._wait(request)
        if self.async_slot_writes and request.composition is None:
            # Reserve the slot now and let a slot thread wait for the store read and copy right after it: the
            # copy starts when the read ends, not at the engine's next poll (a whole step later; on 2 busy cores
            # steps took 0.5-1.5 s). The reservation's reference keeps the slot from eviction until installed.
            self._reserve(key, self._load_and_fill, key, request.adapter)
            return self._wait(request)
        adapter = (self.cpu.get_composite(request.composition, key) if request.composition is not None
                   else self.cpu.get(key, request.adapter))
        if adapter is None:
            return self._wait(request)
        if self.async_slot_writes and not _needs_model(adapter):
            self._reserve(key, lambda slot: (adapter, self._fill(slot, adapter), True))
            return self._wait(request)
        acquired = self.table.acquire(key)
        if acquired.evicted is not None:
            self._count("adapter_evictions")
        self._install(acquired.slot, key, adapter, self._fill(acquired.slot, adapter))
        request.slot = acquired.slot
        self._waited(request, missed=True)
        return True

    def stage(self, waiting: Iterable[Request], max_batch: int) -> None:
        """Before each plan: the first waiting requests (in admission order) take their adapter's slot while
        they wait for a row, so the store read and the slot copy overlap the queue, not the request's turn.

        Without it the copy started only once a row was free and the request reached the head of the queue
        (the scheduler asks `try_acquire` only then); the row then stayed empty for at least one step while the
        copy ran. A staged request holds a slot reference until it is admitted (kept) or leaves (released). At
        most num_slots - max_batch requests are staged, so the running rows, at most max_batch adapters, always
        find slots; with no more slots than rows nothing is staged."""
        room = self.table.num_slots - max_batch
        if room <= 0:
            return
        for request in waiting:
            if len(self._staged) >= room and request.request_id not in self._staged:
                break
            key = request.adapter_version
            if key is None or request.slot or key in self._write_failed:
                continue
            self._staged.add(request.request_id)
            try:
                self.try_acquire(request)
            except AdapterLoadFailed as exc:  # kept for the scheduler's try at admission, which fails the request
                self._write_failed[key] = exc
                self._staged.discard(request.request_id)

    def release(self, request: Request) -> None:
        if request.slot:
            self.table.release(request.slot)
            request.slot = 0
        self._waiting_since.pop(request.request_id, None)
        self._staged.discard(request.request_id)
        self._gauge()

    @contextmanager
    def mapped(self, rows: list[Request]):
        """Route one forward: the mapping is set for `rows` on entry and cleared on exit, so no routing
        outlives the forward it was set for."""
        self.set_mapping(rows)
        try:
            yield
        finally:
            self.mapping.active = False
            self.mapping.slot_of_row = self.mapping.merged_correction = None

    def set_mapping(self, rows: list[Request]) -> None:
        """Route the next forward: row i uses rows[i].slot (slot 0 for the merged adapter's rows)."""
        if self.mapping.owner is not self:
            raise RuntimeError("another engine was built on this model and owns its adapter slots now")
        slots = [r.slot for r in rows]
        m = self.mapping
        merged = self.merged_slot
        if not any(slots) and not merged:
            m.active = False
            return
        effective = [0 if s == merged else s for s in slots]
        infos = [self.slot_info[s] for s in effective if s]
        m.slot_of_row = torch.tensor(effective, dtype=torch.long, device=self.device)
        m.slots_present = frozenset(effective)
        m.uniform_slot = effective[0] if len(m.slots_present) == 1 else None
        m.any_lora = any("lora" in i.layer_state for i in infos)
        m.any_ia3 = any("ia3" in i.layer_state for i in infos)
        m.any_dora = any("dora" in i.layer_state for i in infos)
        m.any_bottleneck = any("bottleneck" in i.layer_state for i in infos)
        others = [i for i, s in enumerate(slots) if s != merged] if merged else []
        m.merged_slot = merged
        m.merged_correction = torch.tensor(others, dtype=torch.long, device=self.device) if others else None
        m.active = True

    def prefix_for(self, request: Request) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.prefix_kv.get(request.slot)

    def observe_step(self, rows: list[Request]) -> MergeDecision | None:
        """Feed the merge policy with this step's rows; performs a merge or unmerge it decides."""
        if self.merge_policy is None:
            return None
        mergeable = [self.slot_info[r.slot].key if r.slot and self.slot_info[r.slot].mergeable else None
                     for r in rows]
        decision = self.merge_policy.observe(mergeable)
        if decision is not None:
            self._apply_merge(decision)
        return decision

    # ---- internals ----

    def _fill(self, slot: int, adapter: Adapter) -> torch.Tensor | None:
        """Write the adapter's per-layer state into `slot` and compute its prefix K/V (if any). Runs on the slot
        thread, except for soft prompts (_needs_model), which run through the model on the engine thread."""
        write_slot(self.layers, slot, adapter)
        prefix = adapter.prefix_kv()
        if prefix is None and adapter.soft_prompt() is not None:
            # a composition's soft prompt runs through its slot's LoRA / IA3; a prompt adapter's slot holds none
            prefix = soft_prompt_kv(self.mapping, adapter.soft_prompt(), merged=bool(self.merged_slot), slot=slot,
                                    layer_state=adapter.layer_state)
        return None if prefix is None else prefix.to(device=self.device, dtype=self.dtype)

    def _reserve(self, key: str, job, *args) -> None:
        """Take a slot for key and run job(slot, *args) on a slot thread (engine thread)."""
        acquired = self.table.acquire(key)
        if acquired.evicted is not None:
            self._count("adapter_evictions")
        future = self._slot_writer.submit(job, acquired.slot, *args)
        future.add_done_callback(lambda _: self._on_ready())
        self._writing[key] = _SlotWrite(acquired.slot, future)

    def _load_and_fill(self, slot: int, key: str, name: str):
        """On a slot thread: wait for the adapter's store read (the prefetch started at submit), then copy it into
        the reserved slot, unless writing it runs the model (done on the engine thread at install)."""
        adapter = self.cpu.wait(key, name)
        if _needs_model(adapter):
            return adapter, None, False
        return adapter, self._fill(slot, adapter), True

    def _install(self, slot: int, key: str, adapter: Adapter, prefix: torch.Tensor | None) -> None:
        """The engine thread's part of a slot write: what the step loop reads about the slot."""
        self.prefix_kv.pop(slot, None)
        if prefix is not None:
            self.prefix_kv[slot] = (prefix[:, 0], prefix[:, 1])
        self.slot_info[slot] = _SlotInfo(key, adapter.kind, adapter.rank, adapter.layer_state, adapter.mergeable,
                                         names_of(key))
        self._gauge()

    def _finish_writes(self) -> None:
        """Install the slot copies that finished; a failed one frees its slot and fails its requests."""
        for key, write in [(k, w) for k, w in self._writing.items() if w.future.done()]:
            del self._writing[key]
            error = write.future.exception()
            if error is None:
                adapter, prefix, filled = write.future.result()
                if not filled:  # a soft prompt: its K/V run through the model, on this thread
                    try:
                        prefix = self._fill(write.slot, adapter)
                    except Exception as exc:  # noqa: BLE001 - reported to the waiting requests below
                        error = exc
            if error is None:
                self._install(write.slot, key, adapter, prefix)
                self.table.release(write.slot)  # the reservation; the waiting requests take their own
            else:
                log.error("writing adapter %s into slot %d failed: %s", key, write.slot, error)
                self._write_failed[key] = error
                self.table.release(write.slot)
                self.table.retire(key)
            if key in self._retire_after_write:
                self._retire_after_write.discard(key)
                self.table.retire(key)

    def _wait(self, request: Request) -> bool:
        self._waiting_since.setdefault(request.request_id, time.monotonic())
        return False

    def _waited(self, request: Request, missed: bool) -> None:
        """The request got its slot: count a hit (its adapter was in a slot when it was first considered) or a
        miss, and record how long it waited (0 when the adapter was resident)."""
        since = self._waiting_since.pop(request.request_id, None)
        self._count("adapter_cache_misses" if missed else "adapter_cache_hits")
        if self._metrics is not None:
            self._metrics.adapter_slot_wait_seconds.observe(0.0 if since is None else time.monotonic() - since)

    def _apply_retirements(self) -> None:
        with self._lock:
            names, self._pending_retire = self._pending_retire, set()
        for name in names:
            self._retire_after_write.update(key for key in self._writing if name in names_of(key))
            for slot, info in list(self.slot_info.items()):
                if name in info.names:
                    if self.merge_policy is not None:
                        decision = self.merge_policy.forget(info.key)
                        if decision is not None:
                            self._apply_merge(decision)
                    self.table.retire(info.key)

    def _apply_merge(self, decision: MergeDecision) -> None:
        slot = self.table.lookup(decision.key)
        if decision.action == "merge":
            if slot is None:
                return
            self.table.pin(decision.key)
            merge_slot(self.layers, slot, self.device)
            self.merged_slot = slot
        else:
            unmerge(self.layers)
            self.table.unpin(decision.key)
            self.merged_slot = 0
        log.info("%sd adapter %s", decision.action, decision.key)
        if self._metrics is not None:
            self._metrics.merge_events.labels(action=decision.action).inc()
            self._metrics.merged_adapters.set(1 if self.merged_slot else 0)

    def _count(self, name: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, name).inc()

    def _gauge(self) -> None:
        """Tier occupancy, set at every slot change and admission (the CPU tier also changes on the loading
        thread; it is read here, on the engine thread's next admission or release)."""
        if self._metrics is not None:
            self._metrics.adapter_slots_in_use.set(self.table.in_use)
            self._metrics.adapters_resident.labels(tier="device").set(self.table.in_use)
            self._metrics.adapters_resident.labels(tier="cpu").set(len(self.cpu))


def _needs_model(adapter: Adapter) -> bool:
    """Whether writing the adapter's slot runs the model (a soft prompt's K/V), so it stays on the engine thread."""
    return adapter.soft_prompt() is not None and adapter.prefix_kv() is None

