"""Device slot accounting for adapters (pure Python, no torch).

Slots 1..n hold adapters; slot 0 is the identity and never handed out. A slot is
referenced while rows use it and cannot be evicted then; pinned slots are never
evicted. When a key is needed and not resident, a free slot is taken, else the
least recently used unreferenced, unpinned one is evicted. Keys are adapter
*versions* (name + content hash) so that a replaced adapter loads fresh while
rows still using the old version finish on it; `retire` marks a version dead:
it is no longer found by lookups and its slot frees when its last row leaves.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Acquired:
    slot: int
    needs_load: bool          # the caller must write the adapter's weights into the slot
    evicted: str | None = None


@dataclass
class _Entry:
    key: str
    refs: int = 0
    pinned: bool = False
    retired: bool = False


@dataclass
class SlotTable:
    num_slots: int
    _by_key: dict[str, int] = field(default_factory=dict)
    _entries: dict[int, _Entry] = field(default_factory=dict)
    _lru: "OrderedDict[int, None]" = field(default_factory=OrderedDict)  # unreferenced resident slots, oldest first

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError("at least one adapter slot is needed")

    def lookup(self, key: str) -> int | None:
        return self._by_key.get(key)

    def can_acquire(self, key: str) -> bool:
        return key in self._by_key or len(self._entries) < self.num_slots or any(
            not self._entries[s].pinned for s in self._lru)

    def acquire(self, key: str) -> Acquired | None:
        """Take a reference on key's slot, making it resident if needed; None if every slot is busy."""
        slot = self._by_key.get(key)
        if slot is not None:
            self._reference(slot)
            return Acquired(slot, needs_load=False)
        evicted = None
        slot = next((s for s in range(1, self.num_slots + 1) if s not in self._entries), None)
        if slot is None:
            slot = next((s for s in self._lru if not self._entries[s].pinned), None)
            if slot is None:
                return None
            evicted = self._entries[slot].key
            self._drop(slot)
        self._entries[slot] = _Entry(key)
        self._by_key[key] = slot
        self._reference(slot)
        return Acquired(slot, needs_load=True, evicted=evicted)

    def release(self, slot: int) -> None:
        entry = self._entries[slot]
        if entry.refs <= 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        entry.refs -= 1
        if entry.refs == 0:
            if entry.retired:
                self._drop(slot)
            else:
                self._lru[slot] = None  # most recently used goes last

    def pin(self, key: str) -> bool:
        slot = self._by_key.get(key)
        if slot is None:
            return False
        self._entries[slot].pinned = True
        return True

    def unpin(self, key: str) -> None:
        slot = self._by_key.get(key)
        if slot is not None:
            self._entries[slot].pinned = False

    def retire(self, key: str) -> None:
        """Forget a version: new lookups miss; its slot frees once unreferenced."""
        slot = self._by_key.pop(key, None)
        if slot is None:
            return
        entry = self._entries[slot]
        entry.retired = True
        if entry.refs == 0:
            self._drop(slot)

    def refs(self, slot: int) -> int:
        return self._entries[slot].refs if slot in self._entries else 0

    @property
    def in_use(self) -> int:
        """Slots holding an adapter (referenced or cached)."""
        return len(self._entries)

    def _reference(self, slot: int) -> None:
        self._entries[slot].refs += 1
        self._lru.pop(slot, None)

    def _drop(self, slot: int) -> None:
        entry = self._entries.pop(slot)
        if self._by_key.get(entry.key) == slot:
            del self._by_key[entry.key]
        self._lru.pop(slot, None)
