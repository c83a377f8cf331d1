"""The adapter tiers: store on disk -> CPU cache (LRU by bytes) -> device slots (LRU by count).

Loading from disk runs on a background thread and starts when a request is
submitted, so it overlaps with the request's wait in the queue. The scheduler
admits a request only once its adapter is in the CPU cache and a device slot can
be had (`try_acquire`); copying into the slot happens then, on the engine thread.
Slots are reference-counted by running rows, evicted LRU when unreferenced, and
the hot adapter, when merged, is pinned.

Every adapter kind (adapters.kinds) takes a slot: the adapter writes its per-layer state
(LoRA, IA3, DoRA) into the layers' slot tensors itself, and its prefix K/V, if any, live in
`prefix_kv[slot]` on the device (prompt tuning: its virtual tokens' K/V, computed through the
base when the slot is written). The pool never branches on a kind's name: it reads the
kind's `layer_state` (which any_* flags a forward needs) and `mergeable`. Keys are versions
(`name@sha256-prefix`) so that a replaced adapter never serves stale weights to
new requests while old requests finish on the old ones.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from adapters.format import Adapter, BaseSpec, load_adapter
from adapters.store import AdapterRecord, AdapterStore
from server.engine.merge_policy import MergeDecision, MergePolicy
from server.engine.request import AdmissionFailed, Request
from server.engine.slots import SlotTable
from server.model.adapter_layers import AdapterLinear, BatchMapping, write_slot
from server.model.merge import merge_slot, unmerge
from server.model.soft_prompt import soft_prompt_kv

log = logging.getLogger(__name__)


class AdapterLoadFailed(AdmissionFailed):
    """The adapter's files could not be loaded (the request fails with this message)."""


@dataclass
class _SlotInfo:
    key: str
    kind: str
    rank: int
    layer_state: frozenset[str]  # per-layer state the adapter wrote ("lora", "ia3", "dora")
    mergeable: bool


def version_key(record: AdapterRecord) -> str:
    return f"{record.name}@{record.sha256[:16]}"


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
        self.metrics = None
        self._cpu: OrderedDict[str, Adapter] = OrderedDict()
        self._cpu_bytes = 0
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pending_retire: set[str] = set()  # names invalidated by other threads, applied on the engine thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")

    # ---- any thread ----

    def record(self, name: str) -> AdapterRecord:
        """The store's record (raises AdapterNotFound)."""
        return self.store.get(name)

    def validate(self, path, name: str) -> None:
        """Raise AdapterError unless the adapter at path can be served on this base."""
        load_adapter(path, self.base, max_rank=self.max_rank, name=name, dtype=self.dtype)

    def prefetch(self, key: str, name: str) -> None:
        """Start loading an adapter version into the CPU cache unless it is there or on its way."""
        with self._lock:
            if key in self._cpu or key in self._loading:
                return
            self._loading[key] = self._executor.submit(self._load, key, name)

    def invalidate(self, name: str) -> None:
        """Forget every cached version of `name` (after an overwrite or delete)."""
        with self._lock:
            for key in [k for k in self._cpu if k.split("@")[0] == name]:
                self._cpu_bytes -= self._cpu.pop(key).nbytes
            self._pending_retire.add(name)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: str, name: str) -> Adapter:
        start = time.perf_counter()
        adapter = load_adapter(self.store.path(name), self.base, max_rank=self.max_rank, name=name, dtype=self.dtype)
        with self._lock:
            self._cpu[key] = adapter
            self._cpu_bytes += adapter.nbytes
            while self._cpu_bytes > self.cpu_cache_bytes and len(self._cpu) > 1:
                _, dropped = self._cpu.popitem(last=False)
                self._cpu_bytes -= dropped.nbytes
        if self.metrics is not None:
            self.metrics.adapter_loads.inc()
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - start)
        return adapter

    # ---- engine thread ----

    def try_acquire(self, request: Request) -> bool:
        """Give the request a slot holding its adapter; False if it must wait. Raises AdapterLoadFailed."""
        self._apply_retirements()
        key = request.adapter_version
        if key is None:
            return True
        if self.table.lookup(key) is not None:
            request.slot = self.table.acquire(key).slot
            self._count("adapter_cache_hits")
            return True
        if not self.table.can_acquire(key):
            return False
        adapter = self._cpu_adapter(key, request.adapter)
        if adapter is None:
            return False
        acquired = self.table.acquire(key)
        if acquired.evicted is not None:
            self._count("adapter_evictions")
        self._write(acquired.slot, key, adapter)
        self._count("adapter_cache_misses")
        request.slot = acquired.slot
        return True

    def release(self, request: Request) -> None:
        if request.slot:
            self.table.release(request.slot)
            request.slot = 0
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

    def _cpu_adapter(self, key: str, name: str) -> Adapter | None:
        with self._lock:
            adapter = self._cpu.get(key)
            if adapter is not None:
                self._cpu.move_to_end(key)
                return adapter
            future = self._loading.get(key)
        if future is None:
            self.prefetch(key, name)
            return None
        if not future.done():
            return None
        with self._lock:
            self._loading.pop(key, None)
        error = future.exception()
        if error is not None:
            raise AdapterLoadFailed(f"adapter {name!r} could not be loaded: {error}") from error
        return future.result()

    def _write(self, slot: int, key: str, adapter: Adapter) -> None:
        write_slot(self.layers, slot, adapter)
        self.prefix_kv.pop(slot, None)
        prefix = adapter.prefix_kv()
        if prefix is None and adapter.soft_prompt() is not None:
            prefix = soft_prompt_kv(self.mapping, adapter.soft_prompt(), merged=bool(self.merged_slot))
        if prefix is not None:
            prefix = prefix.to(device=self.device, dtype=self.dtype)
            self.prefix_kv[slot] = (prefix[:, 0], prefix[:, 1])
        self.slot_info[slot] = _SlotInfo(key, adapter.kind, adapter.rank, adapter.layer_state, adapter.mergeable)
        self._gauge()

    def _apply_retirements(self) -> None:
        with self._lock:
            names, self._pending_retire = self._pending_retire, set()
        for name in names:
            for slot, info in list(self.slot_info.items()):
                if info.key.split("@")[0] == name:
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
        if self.metrics is not None:
            self.metrics.merge_events.labels(action=decision.action).inc()
            self.metrics.merged_adapters.set(1 if self.merged_slot else 0)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.adapter_slots_in_use.set(self.table.in_use)

