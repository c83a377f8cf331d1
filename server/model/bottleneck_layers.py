"""Bottleneck adapters (AdapterHub houlsby / pfeiffer / parallel) in the decoder layer, batched by slot.

A bottleneck adapter is not a weight delta: it is a small residual module
``f(x) = W_up act(W_down x + b_down) + b_up`` placed after a sublayer of the decoder block. One
:class:`BottleneckSlots` per decoder layer holds, for each of the two places ("attn": after the
attention block, "out": after the MLP), slot tensors stacked over slots 0..S (slot 0 = identity):

- down [S+1, R, H] (W_down, PEFT-style [r, H] rows), down_bias [S+1, R];
- up [S+1, R, H] (scaling * W_up transposed, [r, H]), up_bias [S+1, H] (scaling * b_up): the library's
  ``scaling`` (parallel: 4.0 by default) is folded into the up-projection when the slot is written;
- width [S+1] (long): each slot's width at this place, 0 for slots without an adapter here;
- take_sub [S+1], take_res [S+1]: which of the sublayer output s and the block's residual input r the
  adapter reads (1 or 0): houlsby reads s, pfeiffer s + r, parallel r.

with R = --max-lora-rank (widths zero-padded). The block's output at that place is

    out = r + s + scaling[slot] * f_slot(take_sub[slot] * s + take_res[slot] * r)

which is, per slot kind (a = attention output, h the block input, h' = h + a (+ its adapter),
m = mlp(post_attention_layernorm(h'))): houlsby h' = h + a + f_attn(a), out = h' + m + f_out(m);
pfeiffer out = h' + m + f(m + h'); parallel out = h' + m + scale f(h').

Zero padding is exact for any activation: a padded width column has zero down row and bias, so its
activation is act(0), and its up row is zero, so it adds nothing. Rows whose slot holds no adapter at
a place get a delta of exactly zero (zero weights and width 0: the row kernel skips them), so their
output equals ``r + s`` bit for bit.
Rows of different activations share one batch: the activation runs per group of rows.

Mixed-slot batches of one token per row (decode, and the flat forward of a prefill chunk beside decoding
rows) run both projections through the compiled LoRA row kernel (server.model.adapter_ops, ``add_lora_rows_``)
with an identity for the other factor: down is ``x @ D[s]^T = (x @ D[s]^T) @ I`` and up is ``z @ I @ U[s]``,
so each row reads its own slot's matrices in place. The first version gathered each row's down and up
matrices per place and step ([32, 48, 768] fp32, twice per place, 24 places for houlsby on the 134M bench
Llama): `make bench-bottleneck` measured houlsby at x0.11 of base, and torch.profiler put 66% of a houlsby
step in those index_selects (fp32, Zen 4, 2 cores under load). Rows of several tokens (a padded prefill)
keep the gather and two baddbmm: N requests, not N tokens, are gathered there.

UniPELT's gated bottleneck (adapters.kinds.unipelt) adds, per place, gate_weight [S+1, 1, H], gate_bias [S+1, 1]
and gate_on [S+1] (allocated at the first gated slot): the adapter's term is multiplied per token by
g_t = sigmoid(gate(x_t)) of the adapter's own input x, the library's ``Adapter.forward`` with the server's per-token
gate: out = r + s + g_t * scaling * f(x_t). Applied as (g z) U + g b_up, so the row kernel is unchanged; rows
without a gate get g = 1 exactly.

The tensors are allocated at the first bottleneck slot written into the layer (like DoRA's scales, they
are outside the slot-sizing budget: server.engine.slot_sizing), so servers that never see one pay nothing.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from server.model import cpu_ext
from server.model.adapter_ops import token_gate

PLACES = ("attn", "out")
# The library's activation names (transformers ACT2FN, via adapters' Activation_Function_Class).
ACTIVATIONS = {
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,  # transformers GELUActivation: the exact erf form
    "tanh": torch.tanh,
}
# What the adapter reads at its place: (take the sublayer output, take the residual input).
INPUTS = {"sublayer": (1.0, 0.0), "sum": (1.0, 1.0), "residual": (0.0, 1.0)}


class _Place:
    """Slot tensors of one place (allocated on first use)."""

    def __init__(self) -> None:
        self.down = self.down_bias = self.up = self.up_bias = None
        self.width = self.take_sub = self.take_res = None
        self.eye: torch.Tensor | None = None   # [S+1, R, R] identities: the row kernel's other factor
        self.widths: dict[int, int] = {}       # slot -> width
        self.activation: dict[int, str] = {}   # slot -> activation name
        self.gate_weight = self.gate_bias = self.gate_on = None  # [S+1, 1, H], [S+1, 1], [S+1] bool (UniPELT)
        self.gated: set[int] = set()


class BottleneckSlots(nn.Module):
    """Bottleneck adapters of one decoder layer for every slot (see the module docstring)."""

    def __init__(self, num_slots: int, max_width: int, hidden: int, mapping, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.num_slots, self.max_width, self.hidden = num_slots + 1, max_width, hidden
        self.mapping = mapping
        self.dtype, self.device = dtype, device
        self.places = {p: _Place() for p in PLACES}
        self._alloc_lock = threading.Lock()

    # ---- slot state ----

    def _allocate(self, place: _Place) -> None:
        """Allocate a place's tensors once. Slot threads write different slots of one layer at the same time
        (server.engine.adapter_pool), so allocation is locked and ``down``, which marks it done, is set last."""
        with self._alloc_lock:
            if place.down is not None:
                return
            s, r, h = self.num_slots, self.max_width, self.hidden
            kw = dict(dtype=self.dtype, device=self.device)
            place.down_bias = torch.zeros(s, r, **kw)
            place.up, place.up_bias = torch.zeros(s, r, h, **kw), torch.zeros(s, h, **kw)
            place.take_sub, place.take_res = (torch.zeros(s, **kw) for _ in range(2))
            place.width = torch.zeros(s, dtype=torch.long, device=self.device)
            place.eye = torch.eye(r, **kw).expand(s, r, r).contiguous()
            place.down = torch.zeros(s, r, h, **kw)

    def set_adapter(self, slot: int, where: str, down: torch.Tensor, down_bias: torch.Tensor | None,
                    up: torch.Tensor, up_bias: torch.Tensor | None, activation: str, scaling: float,
                    reads: str) -> None:
        """One adapter at ``where`` ("attn" | "out"): down [r, H], down_bias [r], up [H, r] (the library's
        shapes), ``reads`` one of INPUTS."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        r = int(down.shape[0])
        if r > self.max_width:
            raise ValueError(f"bottleneck width {r} is above the slots' maximum {self.max_width}")
        place = self.places[where]
        if place.down is None:
            self._allocate(place)
        self._clear_place(place, slot)
        place.down[slot, :r] = down.to(self.dtype)
        place.up[slot, :r] = (up.float().t() * float(scaling)).to(self.dtype)
        if down_bias is not None:
            place.down_bias[slot, :r] = down_bias.to(self.dtype)
        if up_bias is not None:
            place.up_bias[slot] = (up_bias.float() * float(scaling)).to(self.dtype)
        place.width[slot] = r
        place.take_sub[slot], place.take_res[slot] = INPUTS[reads]
        place.widths[slot] = r
        place.activation[slot] = activation

    def set_gate(self, slot: int, where: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """UniPELT's gate of the adapter at ``where``, after `set_adapter`: weight [1, H], bias [1]."""
        place = self.places[where]
        with self._alloc_lock:
            if place.gate_on is None:
                kw = dict(dtype=self.dtype, device=self.device)
                place.gate_weight = torch.zeros(self.num_slots, 1, self.hidden, **kw)
                place.gate_bias = torch.zeros(self.num_slots, 1, **kw)
                place.gate_on = torch.zeros(self.num_slots, dtype=torch.bool, device=self.device)
        place.gate_weight[slot] = weight.reshape(1, self.hidden).to(self.dtype)
        place.gate_bias[slot] = bias.reshape(1).to(self.dtype)
        place.gate_on[slot] = True
        place.gated.add(slot)

    def clear(self, slot: int) -> None:
        for place in self.places.values():
            self._clear_place(place, slot)

    @staticmethod
    def _clear_place(place: _Place, slot: int) -> None:
        r = place.widths.pop(slot, 0)
        place.activation.pop(slot, None)
        if slot in place.gated:
            place.gated.discard(slot)
            place.gate_weight[slot].zero_()
            place.gate_bias[slot].zero_()
            place.gate_on[slot] = False
        if place.down is None or not r:
            return
        place.down[slot, :r].zero_()
        place.down_bias[slot, :r].zero_()
        place.up[slot, :r].zero_()
        place.up_bias[slot].zero_()
        place.width[slot] = 0
        place.take_sub[slot] = place.take_res[slot] = 0.0

    # ---- forward ----

    def in_use(self, where: str) -> bool:
        m = self.mapping
        # membership tests only: a slot thread may add another slot to `widths` during a forward
        return bool(m.active and m.any_bottleneck and any(s in self.places[where].widths for s in m.slots_present))

    def add(self, where: str, residual: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
        """The block output ``residual + sub (+ the rows' adapters)``; residual, sub [N, T, H]."""
        if not self.in_use(where):
            return residual + sub
        place, m = self.places[where], self.mapping
        present = [s for s in m.slots_present if s in place.widths]
        width = max(place.widths[s] for s in present)
        if m.uniform_slot is not None or m.slot_of_row.numel() == 1:
            s = int(m.slot_of_row[0]) if m.uniform_slot is None else m.uniform_slot
            x = sub * place.take_sub[s] + residual * place.take_res[s]
            z = ACTIVATIONS[place.activation[s]](x @ place.down[s, :width].t() + place.down_bias[s, :width])
            y = z @ place.up[s, :width] + place.up_bias[s]
            if s in place.gated:  # UniPELT: times each token's gate
                y = y * torch.sigmoid(torch.nn.functional.linear(x, place.gate_weight[s], place.gate_bias[s]))
            return residual + sub + y
        slots = m.slot_of_row
        n, t, h = sub.shape
        take = torch.stack((place.take_sub, place.take_res), 1).index_select(0, slots)  # [N, 2]
        x = sub * take[:, 0, None, None] + residual * take[:, 1, None, None]
        gate = (token_gate(x, place.gate_weight, place.gate_bias, slots, place.gate_on)  # [N, T, 1], 1 if ungated
                if place.gated and not place.gated.isdisjoint(present) else None)
        kernel = cpu_ext.kernel() if t == 1 and sub.device.type == "cpu" else None
        if kernel is not None:  # one token per row: each row reads its slot's matrices in place
            x = x.reshape(n, h).contiguous()
            z = place.down_bias.index_select(0, slots)  # [N, R], filled in place with + x D[s]^T
            kernel.add_lora_rows_(z, x, place.down, place.eye, slots, place.width, width)
            z = self._activate(z, place, present, slots)
            up_bias = place.up_bias.index_select(0, slots)
            if gate is not None:  # g (z U + b_up) = (g z) U + g b_up
                g = gate.reshape(n, 1)
                z, up_bias = (z * g).contiguous(), up_bias * g
            y = (residual + sub).reshape(n, h) + up_bias
            kernel.add_lora_rows_(y, z, place.eye, place.up, slots, place.width, width)
            return y.view(n, t, h)
        down = place.down[:, :width].index_select(0, slots)  # [N, w, H]
        z = torch.baddbmm(place.down_bias[:, :width].index_select(0, slots)[:, None, :], x, down.transpose(1, 2))
        z = self._activate(z, place, present, slots)
        y = torch.baddbmm(place.up_bias.index_select(0, slots)[:, None, :], z,
                          place.up[:, :width].index_select(0, slots))  # [N, T, H]
        if gate is not None:
            y = y * gate
        return residual + sub + y

    @staticmethod
    def _activate(z: torch.Tensor, place: _Place, present: list[int], slots: torch.Tensor) -> torch.Tensor:
        """Each row's own activation on z [N, ...] (rows without an adapter here: any; their up is zero)."""
        names = sorted({place.activation[s] for s in present})
        if len(names) == 1:
            return ACTIVATIONS[names[0]](z)
        out = ACTIVATIONS[names[0]](z)
        for name in names[1:]:
            rows = torch.tensor([place.activation.get(int(s)) == name for s in slots.tolist()], device=z.device)
            out = torch.where(rows.view(-1, *[1] * (z.dim() - 1)), ACTIVATIONS[name](z), out)
        return out


def install_bottleneck_slots(model: nn.Module, num_slots: int, max_width: int, mapping) -> dict:
    """Attach one BottleneckSlots to every decoder layer; returns {layer index: BottleneckSlots}."""
    dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    out = {}
    for i, layer in enumerate(model.model.layers):
        slots = BottleneckSlots(num_slots, max_width, model.args.hidden_size if hasattr(model, "args")
                                else model.model.embed_tokens.weight.shape[1], mapping, dtype, device)
        layer.bottleneck = slots
        out[i] = slots
    return out


def uninstall_bottleneck_slots(model: nn.Module) -> None:
    for layer in model.model.layers:
        if isinstance(getattr(layer, "bottleneck", None), BottleneckSlots):
            del layer.bottleneck
            layer.bottleneck = None


def lm_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The base's lm_head weight [V, H] as a plain floating tensor, or None where it is quantized or packed
    (then a saved AdapterHub head cannot be compared with it: adapters.kinds.bottleneck.check_saved_head)."""
    weight = getattr(getattr(model, "lm_head", None), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and weight.dim() == 2:
        return weight
    return None
