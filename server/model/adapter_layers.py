"""Adapter-aware linear layers with preallocated slot tensors, and the slot writer.

Every linear of every decoder layer (q, k, v, o, gate, up, down) is wrapped once
by `AdapterLinear`, which holds, for slots 0..S (slot 0 = identity):

- lora_a [S+1, R, I], lora_b [S+1, R, O]: LoRA factors (B transposed from PEFT's
  [O, r]) zero-padded to R = --max-lora-rank, PEFT's scaling folded into B;
- ia3_out [S+1, O]: IA3 output scale (PEFT's non-feed-forward modules: y = (W x + b) * l);
- ia3_in [S+1, I]: IA3 input scale (feed-forward modules: y = W (x * l) + b).

A shared `BatchMapping` says which slot each row uses; it is set once per forward
and read by all layers. Slots that a kind does not use stay at identity (zeros for
LoRA, ones for IA3), so one formula serves every row:

    y = base(x * ia3_in[s]) * ia3_out[s] + (x @ lora_a[s].T) @ lora_b[s]

(PEFT never puts LoRA and IA3 in one adapter, so the order of terms only matters
per kind, and matches PEFT for each.)

A merged adapter (merge-on-demand) replaces `base` by a dense compute-dtype copy
of W + delta; its rows then use slot 0, and every other row is recomputed with the
base's own product (`merged_correction`), so all rows stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.model.adapter_ops import add_lora, row_scale
from server.model.quant import dequantized_weight

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class BatchMapping:
    """Per-forward adapter routing shared by every AdapterLinear.

    slot_of_row [N]: each row's slot; slots_present: the distinct ones; uniform_slot:
    the slot when every row has the same one, else None. Flags let layers skip work no
    row needs (each layer slices LoRA compute to the largest rank its present slots hold).
    merged_correction [K] long: rows that must not see the merged adapter (they get the
    base's own product).
    """

    slot_of_row: torch.Tensor | None = None
    slots_present: frozenset[int] = frozenset()
    uniform_slot: int | None = None
    any_lora: bool = False
    any_ia3: bool = False
    merged_slot: int = 0
    merged_correction: torch.Tensor | None = None
    active: bool = False
    owner: object | None = None  # the adapter pool whose slot contents the layers hold


class AdapterLinear(nn.Module):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, num_slots: int, max_rank: int,
                 mapping: BatchMapping, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.mapping = mapping
        self.merged: nn.Module | None = None
        slots = num_slots + 1
        self.register_buffer("lora_a", torch.zeros(slots, max_rank, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(slots, max_rank, out_features, dtype=dtype, device=device))
        self.register_buffer("ia3_out", torch.ones(slots, out_features, dtype=dtype, device=device))
        self.register_buffer("ia3_in", torch.ones(slots, in_features, dtype=dtype, device=device))
        # What each slot holds in this layer, so a forward skips work no row of the batch needs here
        # (an adapter on q and v only costs nothing in o or the MLP). Ranks are kept twice: a tensor
        # the CPU kernel reads, and a list Python reads without touching the device.
        self.register_buffer("lora_rank", torch.zeros(slots, dtype=torch.long, device=device))
        self.lora_ranks = [0] * slots
        self.ia3_in_slots: set[int] = set()
        self.ia3_out_slots: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, T, I]
        m = self.mapping
        base = self.merged or self.base
        if not m.active:
            return base(x)
        slots, present = m.slot_of_row, m.slots_present
        x_in = row_scale(x, self.ia3_in, slots) if m.any_ia3 and not self.ia3_in_slots.isdisjoint(present) else x
        y = base(x_in)
        if m.merged_correction is not None and self.merged is not None:  # other rows: undo the merge
            # Recomputed with the base's own product, for LoRA as for IA3: exact on every CPU kind. Subtracting
            # the LoRA delta from the merged product drifted on AVX512-BF16 CPUs, whose NF4 kernel runs with
            # bf16 block scales (a row under another adapter changed its greedy token 11 of 20).
            rows = m.merged_correction
            y = y.index_copy(0, rows, self.base(x_in.index_select(0, rows)).to(y.dtype))
        if m.any_ia3 and not self.ia3_out_slots.isdisjoint(present):
            y = row_scale(y, self.ia3_out, slots)
        rank = max(self.lora_ranks[s] for s in present) if m.any_lora else 0
        if rank:
            y = add_lora(y, x, self.lora_a, self.lora_b, slots, rank, m.uniform_slot, self.lora_rank)
        return y

    def base_weight(self) -> torch.Tensor:
        """The base's [O, I] weight in compute dtype, dequantized if the base is bitsandbytes."""
        return dequantized_weight(self.base, self.lora_a.dtype)

    def base_bias(self) -> torch.Tensor | None:
        bias = getattr(self.base, "bias", None)
        return None if bias is None else bias.detach().to(self.lora_a.dtype)

    def folded(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Weight [O, I] and bias [O] with the slot's adapter folded in, in compute dtype, or None
        if the slot changes nothing in this layer.

        LoRA: W + B^T A. IA3 (PEFT's order): out-scaling y = (W x + b) * l gives l W and l b;
        in-scaling y = W (x * l) + b gives W diag(l).
        """
        rank = self.lora_ranks[slot]
        scales_in, scales_out = slot in self.ia3_in_slots, slot in self.ia3_out_slots
        if not (rank or scales_in or scales_out):
            return None
        weight, bias = self.base_weight(), self.base_bias()
        if rank:
            weight = weight + self.lora_b[slot, :rank].t() @ self.lora_a[slot, :rank]  # [O, r] @ [r, I]
        if scales_in:
            weight = weight * self.ia3_in[slot][None, :]
        if scales_out:
            weight = weight * self.ia3_out[slot][:, None]
            bias = None if bias is None else bias * self.ia3_out[slot]
        return weight, bias


def install_adapter_layers(model: nn.Module, num_slots: int, max_rank: int) -> tuple[BatchMapping, dict]:
    """Wrap every decoder linear; returns the shared mapping and {(layer, module): AdapterLinear}."""
    mapping = BatchMapping()
    dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    layers: dict[tuple[int, str], AdapterLinear] = {}
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGET_MODULES:
                base = getattr(parent, name, None)
                if base is None:
                    continue
                wrapped = AdapterLinear(base, base.in_features, base.out_features, num_slots, max_rank, mapping,
                                        dtype, device)
                setattr(parent, name, wrapped)
                layers[(i, name)] = wrapped
    return mapping, layers


def uninstall_adapter_layers(model: nn.Module) -> None:
    """Put the base linears back (e.g. to install slots of another size)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, AdapterLinear):
                    setattr(parent, name, child.base)
    model.adapter_install = None


def clear_slot(layers: dict[tuple[int, str], AdapterLinear], slot: int) -> None:
    """Reset a slot to the identity in every layer."""
    for layer in layers.values():
        layer.lora_a[slot].zero_()
        layer.lora_b[slot].zero_()
        layer.ia3_out[slot].fill_(1.0)
        layer.ia3_in[slot].fill_(1.0)
        layer.lora_rank[slot] = 0
        layer.lora_ranks[slot] = 0
        layer.ia3_in_slots.discard(slot)
        layer.ia3_out_slots.discard(slot)


def write_slot(layers: dict[tuple[int, str], AdapterLinear], slot: int, adapter) -> None:
    """Copy an `adapters.format.Adapter`'s weights into a slot (prefix adapters need none)."""
    clear_slot(layers, slot)
    for key, weights in adapter.lora.items():
        layer = layers[key]
        r = weights.rank
        if r > layer.lora_a.shape[1]:
            raise ValueError(f"adapter {adapter.name} has rank {r}, above the slots' maximum {layer.lora_a.shape[1]}")
        layer.lora_a[slot, :r] = weights.a.to(layer.lora_a.dtype)
        layer.lora_b[slot, :r] = (weights.b * weights.scaling).t().to(layer.lora_b.dtype)
        layer.lora_rank[slot] = r
        layer.lora_ranks[slot] = r
    for (i, module), vector in adapter.ia3.items():
        layer = layers[(i, module)]
        feedforward = module in adapter.ia3_feedforward
        target = layer.ia3_in if feedforward else layer.ia3_out
        target[slot] = vector.to(target.dtype)
        (layer.ia3_in_slots if feedforward else layer.ia3_out_slots).add(slot)
