"""Adapter-aware linear layers with preallocated slot tensors; each layer owns its slot state.

Every linear of every decoder layer (q, k, v, o, gate, up, down) is wrapped once
by `AdapterLinear`, which holds, for slots 0..S (slot 0 = identity):

- lora_a [S+1, R, I], lora_b [S+1, R, O]: LoRA factors (B transposed from PEFT's
  [O, r]) zero-padded to R = --max-lora-rank, PEFT's scaling folded into B;
- ia3_out [S+1, O]: IA3 output scale (PEFT's non-feed-forward modules: y = (W x + b) * l);
- ia3_in [S+1, I]: IA3 input scale (feed-forward modules: y = W (x * l) + b);
- dora_scale [S+1, O]: DoRA's g = m / ||W + sBA||_row, and, when the base has a bias,
  dora_shift [S+1, O] = b * (1 - g), so that y * g + b (1 - g) = g (W x + s B A x) + b;
- bias_delta [S+1, O]: an additive bias (LoRA's ``lora_bias`` s * b_B, times g under DoRA, plus
  b_new - b for a trained base bias, PEFT ``bias="all"/"lora_only"``), allocated at the first slot
  that has one; added last, only when a present slot has one.
- gate_weight [S+1, 1, I], gate_bias [S+1, 1], gate_on [S+1]: UniPELT's gated LoRA (adapters.kinds.unipelt),
  allocated at the first gated slot: the LoRA term reads x * sigmoid(gate(x)) per token instead of x (the
  gate is a per-token scalar, so B A (g x) = g B A x exactly: the row kernels are unchanged).

Slots are written only through the layer's methods (`clear`, `set_lora`, `set_ia3`,
`set_dora`, `set_bias`); `folded` gives a slot's adapter folded into the base weight (merge).
A shared `BatchMapping` says which slot each row uses; it is set once per forward
and read by all layers. Slots that a kind does not use stay at identity (zeros for
LoRA, ones for IA3 and DoRA scales, zeros for the DoRA shift), so one formula serves
every row:

    x' = x * ia3_in[s]
    y  = ((base(x') + (x' @ lora_a[s].T) @ lora_b[s]) * dora_scale[s] + dora_shift[s] + bias_delta[s]) * ia3_out[s]

For one kind the unused terms are exact identities, so each kind is PEFT's own formula. A slot
holding several kinds (a composition, adapters.composition) gets IA3 around the LoRA-adapted layer:
PEFT's IA3 loaded over the LoRA merged into the base. Each term runs only when a row of the batch
has a slot that uses it in this layer (per-slot sets and the mapping's any_* flags),
so a batch without DoRA rows pays nothing for DoRA.

A merged adapter (merge-on-demand, server.model.merge) replaces `base` by a dense
compute-dtype copy of its folded weight; its rows then use slot 0, and every other
row is recomputed with the base's own product (`merged_correction`), so all rows stay
exact.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from adapters.peft_targets import LINEAR_MODULES
from server.model.adapter_ops import add_lora, row_scale, token_gate
from server.model.bottleneck_layers import install_bottleneck_slots, uninstall_bottleneck_slots
from server.model.gate_layers import install_prefix_gates, uninstall_prefix_gates
from server.model.quant import dequantized_weight

# Lazy allocations of AdapterLinear's per-kind tensors (DoRA, bias terms, UniPELT gates): slot threads write
# different slots of one layer at once (server.engine.adapter_pool), and an unlocked check-then-allocate let one
# thread overwrite another's tensor or see a half-made state (measured: bench-bottleneck's 32 UniPELTs).
_ALLOC_LOCK = threading.Lock()
TARGET_MODULES = tuple(LINEAR_MODULES)  # the one list of adapter-capable modules (adapters.peft_targets)


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
    any_dora: bool = False
    any_bottleneck: bool = False  # a row's slot holds a bottleneck adapter (server.model.bottleneck_layers)
    merged_slot: int = 0
    merged_correction: torch.Tensor | None = None
    active: bool = False
    owner: object | None = None  # the adapter pool whose slot contents the layers hold
    model: object | None = None  # the model whose layers read this mapping (soft prompts run through it)


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
        # DoRA state is allocated at the first DoRA slot written into this layer (most servers never see one).
        self.dora_scale: torch.Tensor | None = None  # [S+1, O]
        self.dora_shift: torch.Tensor | None = None  # [S+1, O], only when the base has a bias
        self.dora_slots: set[int] = set()
        self.bias_delta: torch.Tensor | None = None  # [S+1, O], at the first slot with a bias term
        self.bias_slots: set[int] = set()
        self.gate_weight: torch.Tensor | None = None  # [S+1, 1, I], at the first gated LoRA slot (UniPELT)
        self.gate_bias: torch.Tensor | None = None  # [S+1, 1]
        self.gate_on: torch.Tensor | None = None  # [S+1] bool
        self.gate_slots: set[int] = set()

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
        rank = max(self.lora_ranks[s] for s in present) if m.any_lora else 0
        if rank:
            x_lora = x_in
            if self.gate_slots and not self.gate_slots.isdisjoint(present):  # UniPELT: g_t B A x_t = B A (g_t x_t)
                x_lora = x_in * token_gate(x_in, self.gate_weight, self.gate_bias, slots, self.gate_on, m.uniform_slot)
            y = add_lora(y, x_lora, self.lora_a, self.lora_b, slots, rank, m.uniform_slot, self.lora_rank)
        if m.any_dora and not self.dora_slots.isdisjoint(present):
            y = row_scale(y, self.dora_scale, slots)  # g (W x + b + s B A x)
            if self.dora_shift is not None:  # + b (1 - g); zero (exactly) for non-DoRA rows
                y = y + (self.dora_shift.index_select(0, slots)[:, None, :] if slots.numel() > 1
                         else self.dora_shift[int(slots[0])])
        if self.bias_slots and not self.bias_slots.isdisjoint(present):  # zero (exactly) for other rows
            y = y + (self.bias_delta.index_select(0, slots)[:, None, :] if slots.numel() > 1
                     else self.bias_delta[int(slots[0])])
        if m.any_ia3 and not self.ia3_out_slots.isdisjoint(present):  # last: IA3 scales the adapted layer
            y = row_scale(y, self.ia3_out, slots)
        return y

    # ---- slot state ----

    def clear(self, slot: int) -> None:
        """Reset a slot to the identity. Only what the slot's adapter wrote is reset: LoRA rows past a slot's
        rank are always zero (only set_lora writes them, up to the rank it records) and IA3 vectors of slots
        outside ia3_*_slots are ones, so a slot change costs the adapter's own bytes, not a memset of the whole
        rank-R slot (40 MB at R = 64 on the default model)."""
        rank = self.lora_ranks[slot]
        if not rank and slot not in self.ia3_out_slots and slot not in self.ia3_in_slots \
                and slot not in self.dora_slots and slot not in self.bias_slots and slot not in self.gate_slots:
            return  # already the identity (a layer the slot's adapter did not touch): no tensor writes
        if rank:
            self.lora_a[slot, :rank].zero_()
            self.lora_b[slot, :rank].zero_()
        if slot in self.ia3_out_slots:
            self.ia3_out[slot].fill_(1.0)
        if slot in self.ia3_in_slots:
            self.ia3_in[slot].fill_(1.0)
        self.lora_rank[slot] = 0
        self.lora_ranks[slot] = 0
        self.ia3_in_slots.discard(slot)
        self.ia3_out_slots.discard(slot)
        if self.dora_scale is not None:
            self.dora_scale[slot].fill_(1.0)
            if self.dora_shift is not None:
                self.dora_shift[slot].zero_()
        self.dora_slots.discard(slot)
        if self.bias_delta is not None:
            self.bias_delta[slot].zero_()
        self.bias_slots.discard(slot)
        if slot in self.gate_slots:
            self.gate_weight[slot].zero_()
            self.gate_bias[slot].zero_()
            self.gate_on[slot] = False
            self.gate_slots.discard(slot)

    def set_gate(self, slot: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """UniPELT's LoRA gate, after `set_lora` of the same slot: weight [1, I], bias [1] (the library's
        ``gate`` Linear); the slot's LoRA term becomes sigmoid(x_t @ weight.T + bias) * B A x_t per token."""
        with _ALLOC_LOCK:  # slot threads write different slots of one layer at once (engine.adapter_pool)
            if self.gate_on is None:  # gate_on, set last, marks the allocation done
                like = self.ia3_in
                self.gate_weight = torch.zeros(like.shape[0], 1, self.in_features, dtype=like.dtype,
                                               device=like.device)
                self.gate_bias = torch.zeros(like.shape[0], 1, dtype=like.dtype, device=like.device)
                self.gate_on = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)
        self.gate_weight[slot] = weight.reshape(1, self.in_features).to(self.gate_weight.dtype)
        self.gate_bias[slot] = bias.reshape(1).to(self.gate_bias.dtype)
        self.gate_on[slot] = True
        self.gate_slots.add(slot)

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """LoRA of PEFT's shapes: a [r, I], b [O, r]; the slot holds A and (scaling * B)^T."""
        r = int(a.shape[0])
        if r > self.lora_a.shape[1]:
            raise ValueError(f"LoRA rank {r} is above the slots' maximum {self.lora_a.shape[1]}")
        old = self.lora_ranks[slot]
        if old > r:  # keep rows past the rank zero (clear relies on it)
            self.lora_a[slot, r:old].zero_()
            self.lora_b[slot, r:old].zero_()
        self.lora_a[slot, :r] = a
        torch.mul(b.t(), scaling, out=self.lora_b[slot, :r])  # in b's dtype, rounded once into the slot's
        self.lora_rank[slot] = r
        self.lora_ranks[slot] = r

    def set_ia3(self, slot: int, vector: torch.Tensor, feedforward: bool) -> None:
        """IA3 scale: [I] on the input (feed-forward modules) or [O] on the output."""
        target = self.ia3_in if feedforward else self.ia3_out
        target[slot] = vector.to(target.dtype)
        (self.ia3_in_slots if feedforward else self.ia3_out_slots).add(slot)

    def set_dora(self, slot: int, magnitude: torch.Tensor) -> None:
        """DoRA magnitude m [O], after `set_lora` of the same slot: stores g = m / ||W + s B A|| (per output
        row, L2 over the input axis; W dequantized from a bitsandbytes base), computed in fp32 once here."""
        with _ALLOC_LOCK:  # dora_scale, set last, marks the allocation done
            if self.dora_scale is None:
                shape, like = self.ia3_out.shape, self.ia3_out
                if getattr(self.base, "bias", None) is not None:
                    self.dora_shift = torch.zeros(shape, dtype=like.dtype, device=like.device)
                self.dora_scale = torch.ones(shape, dtype=like.dtype, device=like.device)
        r = self.lora_ranks[slot]
        weight = dequantized_weight(self.base, torch.float32)
        delta = self.lora_b[slot, :r].t().float() @ self.lora_a[slot, :r].float()  # [O, I], scaling folded
        g = magnitude.to(weight.device, torch.float32) / torch.linalg.norm(weight + delta, dim=1)
        self.dora_scale[slot] = g.to(self.dora_scale.dtype)
        if self.dora_shift is not None:
            self.dora_shift[slot] = (self.base.bias.detach().float() * (1 - g)).to(self.dora_shift.dtype)
        self.dora_slots.add(slot)

    def set_bias(self, slot: int, lora_bias: torch.Tensor | None = None, new_bias: torch.Tensor | None = None) -> None:
        """Bias terms of a slot, after `set_lora` / `set_dora`: ``lora_bias`` [O] = scaling * b_B (multiplied
        here by DoRA's g when the slot is DoRA), ``new_bias`` [O] a trained bias replacing the base's (the slot
        adds new_bias - b; the base must have a bias). Stored as one additive vector, computed in fp32."""
        delta = torch.zeros(self.out_features, dtype=torch.float32, device=self.ia3_out.device)
        if lora_bias is not None:
            lora_bias = lora_bias.to(delta.device, torch.float32)
            delta += lora_bias * self.dora_scale[slot].float() if slot in self.dora_slots else lora_bias
        if new_bias is not None:
            base = getattr(self.base, "bias", None)
            if base is None:
                raise ValueError("a trained base bias for a linear without a bias")
            delta += new_bias.to(delta.device, torch.float32) - base.detach().float()
        with _ALLOC_LOCK:
            if self.bias_delta is None:
                self.bias_delta = torch.zeros_like(self.ia3_out)
        self.bias_delta[slot] = delta.to(self.bias_delta.dtype)
        self.bias_slots.add(slot)

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
        in-scaling y = W (x * l) + b gives W diag(l). DoRA: g (W + B^T A) with b unchanged (PEFT's
        merge: exact). A bias term: b + bias_delta (a bias of its own where the base has none). In one
        slot, in the forward's order: l_out * (g (W + B^T A) diag(l_in)), l_out * (b + bias_delta).
        """
        if slot in self.gate_slots:
            raise ValueError("a gated LoRA (UniPELT) depends on each token's input and cannot be folded into W")
        rank = self.lora_ranks[slot]
        scales_in, scales_out = slot in self.ia3_in_slots, slot in self.ia3_out_slots
        biased = slot in self.bias_slots
        if not (rank or scales_in or scales_out or biased):
            return None
        weight, bias = self.base_weight(), self.base_bias()
        if rank:
            weight = weight + self.lora_b[slot, :rank].t() @ self.lora_a[slot, :rank]  # [O, r] @ [r, I]
        if scales_in:
            weight = weight * self.ia3_in[slot][None, :]
        if slot in self.dora_slots:
            weight = weight * self.dora_scale[slot][:, None]
        if biased:
            bias = self.bias_delta[slot].clone() if bias is None else bias + self.bias_delta[slot]
        if scales_out:
            weight = weight * self.ia3_out[slot][:, None]
            bias = None if bias is None else bias * self.ia3_out[slot]
        return weight, bias


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear install_adapter_layers wraps (or has wrapped), for slot sizing."""
    shapes = []
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGET_MODULES:
                linear = getattr(parent, name, None)
                if linear is not None:
                    shapes.append((linear.in_features, linear.out_features))
    return shapes


def slot_itemsize(model: nn.Module) -> int:
    """Bytes per element of the slot tensors (the embedding's dtype, as install_adapter_layers allocates)."""
    return model.model.embed_tokens.weight.element_size()


def install_adapter_layers(model: nn.Module, num_slots: int, max_rank: int) -> tuple[BatchMapping, "AdapterLayers"]:
    """Wrap every decoder linear and give every decoder layer its bottleneck slots (widths bounded by the same
    max_rank); returns the shared mapping and the AdapterLayers ({(layer, module): AdapterLinear}, with
    ``.bottleneck`` {layer: BottleneckSlots})."""
    mapping = BatchMapping(model=model)
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
    return mapping, AdapterLayers(layers, bottleneck=install_bottleneck_slots(model, num_slots, max_rank, mapping),
                                  prefix_gate=install_prefix_gates(model, num_slots, mapping))


def uninstall_adapter_layers(model: nn.Module) -> None:
    """Put the base linears back (e.g. to install slots of another size)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, AdapterLinear):
                    setattr(parent, name, child.base)
    uninstall_bottleneck_slots(model)
    uninstall_prefix_gates(model)
    model.adapter_install = None


class AdapterLayers(dict):
    """{(layer, module): AdapterLinear}, the state adapters write into, plus ``bottleneck`` {layer index:
    BottleneckSlots} (server.model.bottleneck_layers) and ``prefix_gate`` {layer index: PrefixGateSlots}
    (server.model.gate_layers), which hold per-layer rather than per-linear state."""

    def __init__(self, linears: dict, bottleneck: dict | None = None, prefix_gate: dict | None = None):
        super().__init__(linears)
        self.bottleneck = dict(bottleneck or {})
        self.prefix_gate = dict(prefix_gate or {})


def clear_slot(layers: dict[tuple[int, str], AdapterLinear], slot: int) -> None:
    """Reset a slot to the identity in every layer (and its bottleneck slots, if any)."""
    for layer in layers.values():
        layer.clear(slot)
    for block in getattr(layers, "bottleneck", {}).values():
        block.clear(slot)
    for gate in getattr(layers, "prefix_gate", {}).values():
        gate.clear(slot)


def write_slot(layers: dict[tuple[int, str], AdapterLinear], slot: int, adapter) -> None:
    """Clear a slot, then let the adapter (an `adapters.kinds` instance) write its state into it."""
    clear_slot(layers, slot)
    adapter.write(layers, slot)
