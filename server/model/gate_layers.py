"""UniPELT's gated prefix in the attention, per token and batched by slot (adapters.kinds.unipelt).

The library (AdapterHub ``adapters`` 1.3.0, ``PrefixTuningLayer.compose_single``) multiplies the prefix keys by
g_k and the prefix values by g_v, with g = sigmoid(gate(x)) of the attention input x (after input_layernorm),
``gate`` a Linear(hidden, 2) (or 1 output, used for both, with ``shared_gating``). The server's gate is per token
(the library averages it over the sequence, which no KV cache can reproduce at decode: see the kind's docstring).
A key scaled by g_k(t) for query t alone is query t's logits to the prefix columns times g_k(t); its values scaled
by g_v(t) are its attention weights on those columns times g_v(t) after the softmax (not renormalised):

    logits[t, j] = g_k(t) * q_t . k_j / sqrt(D)   (j < P; else q_t . k_j / sqrt(D))
    p[t] = softmax(logits[t] + mask);  out_t = sum_{j<P} g_v(t) p[t, j] v_j + sum_{j>=P} p[t, j] v_j

The prefix K/V themselves are the raw cache entries at positions 0..P-1 (written before the prompt as MAM's are),
so prefix caching, chunked prefill and preemption see the same cache as for any prefix row: the gate depends only
on each token's own hidden state. One :class:`PrefixGateSlots` per decoder layer (``Attention.prefix_gate``) holds
weight [S+1, 2, H], bias [S+1, 2] and prefix_len [S+1] (P, 0 for slots without a gated prefix), allocated at the
first gated slot. Rows with a gated prefix are recomputed by :func:`gated_prefix_attention` (torch, over the
row's gathered cache) after the group's ordinary attention; every other row keeps the ordinary result, and a
batch with no such row never reaches this module's ops.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from server.model.adapter_ops import token_gate


class PrefixGateSlots(nn.Module):
    """The gated prefixes of one decoder layer's attention for every slot (see the module docstring)."""

    def __init__(self, num_slots: int, hidden: int, mapping, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.num_slots, self.hidden, self.mapping = num_slots + 1, hidden, mapping
        self.dtype, self.device = dtype, device
        self.weight = self.bias = self.prefix_len = self.gate_on = None
        self.slots: set[int] = set()
        self._lock = threading.Lock()

    def set_gate(self, slot: int, weight: torch.Tensor, bias: torch.Tensor, prefix_len: int) -> None:
        """weight [G, H], bias [G] with G = 1 (shared gating: keys and values) or 2 (keys, values)."""
        with self._lock:
            if self.gate_on is None:
                s, kw = self.num_slots, dict(dtype=self.dtype, device=self.device)
                self.weight, self.bias = torch.zeros(s, 2, self.hidden, **kw), torch.zeros(s, 2, **kw)
                self.prefix_len = torch.zeros(s, dtype=torch.long, device=self.device)
                self.gate_on = torch.zeros(s, dtype=torch.bool, device=self.device)
        g = int(weight.shape[0])
        if g not in (1, 2) or tuple(weight.shape[1:]) != (self.hidden,) or tuple(bias.shape) != (g,):
            raise ValueError(f"a prefix gate is [1 or 2, {self.hidden}] with a bias of as many outputs")
        self.weight[slot] = weight.expand(2, self.hidden).to(self.dtype)  # shared: row 0 for keys and values
        self.bias[slot] = bias.expand(2).to(self.dtype)
        self.prefix_len[slot] = int(prefix_len)
        self.gate_on[slot] = True
        self.slots.add(slot)

    def clear(self, slot: int) -> None:
        if slot not in self.slots:
            return
        self.slots.discard(slot)
        self.weight[slot].zero_()
        self.bias[slot].zero_()
        self.prefix_len[slot] = 0
        self.gate_on[slot] = False

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(g [N, T, 2] per token: keys, values; prefix_len [N] per row, 0 for rows without a gated prefix) of the
        attention input x [N, T, H], or None when no row of the batch has a gated prefix in this layer."""
        m = self.mapping
        if not (self.slots and m.active and not self.slots.isdisjoint(m.slots_present)):
            return None
        slots = m.slot_of_row
        g = token_gate(x, self.weight, self.bias, slots, self.gate_on, m.uniform_slot)
        plen = self.prefix_len.index_select(0, slots) if slots.numel() > 1 else self.prefix_len[slots]
        return g, plen


def group_gates(gate: tuple[torch.Tensor, torch.Tensor] | None, start: int, rows: int, t: int):
    """One group of a flat step (tokens [start, start + rows * t), row-major) -> (g [rows, t, 2], plen [rows])."""
    if gate is None:
        return None
    g, plen = gate
    stop = start + rows * t
    return g[start:stop].reshape(rows, t, g.shape[-1]), plen[start:stop].view(rows, t)[:, 0]


def gated_prefix_attention(out: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Replace the rows with a gated prefix in ``out`` [B, H, T, D] (the group's ordinary attention) by the gated
    formula of the module docstring. q [B, H, T, D] after rope, keys/values [B, Hkv, L, D] (the rows' caches,
    prefix at 0..P-1), mask [B, 1, T, L] bool (True: may attend), gate (g [B, T, 2], prefix_len [B])."""
    g, plen = gate
    rows = (plen > 0).nonzero().flatten()
    if not rows.numel():
        return out
    heads, kv_heads, length = q.shape[1], keys.shape[1], keys.shape[2]
    qs = q.index_select(0, rows)
    k = keys.index_select(0, rows).repeat_interleave(heads // kv_heads, dim=1)
    v = values.index_select(0, rows).repeat_interleave(heads // kv_heads, dim=1)
    gs = g.index_select(0, rows)  # [n, T, 2]
    cols = (torch.arange(length, device=q.device)[None, :] < plen.index_select(0, rows)[:, None])[:, None, None, :]
    logits = torch.matmul(qs, k.transpose(2, 3)) * q.shape[-1] ** -0.5  # [n, H, T, L]
    logits = torch.where(cols, logits * gs[:, None, :, 0:1], logits)
    logits = logits.masked_fill(~mask.index_select(0, rows), float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = torch.where(cols, weights * gs[:, None, :, 1:2], weights)
    return out.index_copy(0, rows, torch.matmul(weights, v))


def install_prefix_gates(model: nn.Module, num_slots: int, mapping) -> dict:
    """Attach one PrefixGateSlots to every decoder layer's attention; returns {layer index: PrefixGateSlots}."""
    weight = model.model.embed_tokens.weight
    out = {}
    for i, layer in enumerate(model.model.layers):
        gates = PrefixGateSlots(num_slots, weight.shape[1], mapping, weight.dtype, weight.device)
        layer.self_attn.prefix_gate = gates
        out[i] = gates
    return out


def uninstall_prefix_gates(model: nn.Module) -> None:
    for layer in model.model.layers:
        if isinstance(getattr(layer.self_attn, "prefix_gate", None), PrefixGateSlots):
            del layer.self_attn.prefix_gate
            layer.self_attn.prefix_gate = None
