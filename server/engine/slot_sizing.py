"""How many device adapter slots to allocate: from a memory budget, never below the batch (pure Python).

Every slot is preallocated in every wrapped linear (server.model.adapter_layers.AdapterLinear):
lora_a [R, I] + lora_b [R, O] + ia3_in [I] + ia3_out [O] in the compute dtype, plus one int64 rank,
R = --max-lora-rank. So one slot costs, summed over the wrapped linears,

    bytes_per_slot = sum((R * (I + O) + I + O) * itemsize + 8)

(DoRA scales and bias deltas are allocated only when the first such adapter is written, and are
left out). On the default model (SmolLM2-135M, 30 layers x 7 linears, bf16) at R = 64 that is
39.7 MB (measured from the allocated tensors: tests/test_slot_sizing.py), so the default budget of
1 GiB holds 27 slots.

The count is:
- ``--max-adapter-slots N`` (N > 0): exactly N, the operator's choice;
- else ``budget // bytes_per_slot``, but never fewer than ``max_batch`` (a full batch of distinct
  adapters must never wait for a slot: issue 26 measured 8 slots halving throughput under
  128-adapter Zipf traffic) and never more than ``max_batch + max_waiting`` (more slots than
  requests that can be in the engine at once are never all referenced, and only cache what the
  CPU tier already caches).

Padding to R in memory, not in compute: a rank-8 adapter in a rank-64 slot wastes 7/8 of its slot's
bytes, but the forward reads only each slot's own rank (the CPU decode kernel reads `lora_rank` per
row; other paths slice to the largest rank among the batch's slots), so the padding costs memory
(in the budget above), never FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SLOT_BYTES = 1 << 30  # --adapter-slot-bytes: device memory for adapter slots
RANK_BYTES = 8                # the per-slot int64 rank every layer keeps for the CPU kernel


def bytes_per_slot(linear_shapes: list[tuple[int, int]], max_rank: int, itemsize: int) -> int:
    """Device bytes one slot takes across all wrapped linears; linear_shapes: (in_features, out_features)."""
    if max_rank < 1 or itemsize < 1:
        raise ValueError("max_rank and itemsize must be positive")
    return sum((max_rank * (i + o) + i + o) * itemsize + RANK_BYTES for i, o in linear_shapes)


@dataclass(frozen=True)
class SlotPlan:
    num_slots: int
    bytes_per_slot: int
    reason: str  # why this count: "flag", "budget", "batch floor" or "queue cap"

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.bytes_per_slot


def plan_slots(per_slot: int, *, budget_bytes: int, max_batch: int, max_waiting: int, requested: int = 0) -> SlotPlan:
    """The slot count (see the module docstring). ``requested`` > 0 is taken as it is."""
    if per_slot < 1:
        raise ValueError("a slot takes at least one byte")
    if requested < 0 or budget_bytes < 0 or max_batch < 1 or max_waiting < 0:
        raise ValueError("requested slots and budget must not be negative, max_batch must be positive")
    if requested:
        return SlotPlan(requested, per_slot, "flag")
    from_budget = budget_bytes // per_slot
    floor, cap = max_batch, max_batch + max_waiting
    if from_budget < floor:
        return SlotPlan(floor, per_slot, "batch floor")
    if from_budget > cap:
        return SlotPlan(cap, per_slot, "queue cap")
    return SlotPlan(from_budget, per_slot, "budget")


def slots_without_model(requested: int, max_batch: int) -> int:
    """Slot count where the slot size is not known here (the vLLM worker, Ray's multiplexing bound):
    the flag if given, else one per batch row."""
    return requested if requested > 0 else max_batch
