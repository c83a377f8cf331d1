"""Merge-on-demand in the layers: fold one slot's adapter into dense copies of the base weights.

`merge_slot` replaces, in every layer where the slot changes something, the layer's product by a
compute-dtype `nn.Linear` (packed like the base where the CPU packs) holding `AdapterLinear.folded`
(W + B^T A, IA3 scales, DoRA's g (W + B^T A)); a quantized base is never re-quantized. While merged,
the adapter's rows run on slot 0 and every other row is recomputed with the base's own product
(`BatchMapping.merged_correction`, see server.model.adapter_layers). `unmerge` drops the copies.
Which adapter to merge, and when, is the engine's policy (server.engine.merge_policy).
"""
from __future__ import annotations

import torch
from torch import nn

from server.model.adapter_layers import AdapterLinear
from server.model.packed_linear import PackedLinear, packing_available


def merge_slot(layers: dict[tuple[int, str], AdapterLinear], slot: int, device: torch.device) -> None:
    """Serve `slot`'s adapter from folded weights in every layer it touches (others keep their base)."""
    for layer in layers.values():
        folded = layer.folded(slot)
        layer.merged = None if folded is None else dense_linear(*folded, device,
                                                                getattr(layer.base, "batch_hint", 16))


def unmerge(layers: dict[tuple[int, str], AdapterLinear]) -> None:
    """Back to the base product in every layer."""
    for layer in layers.values():
        layer.merged = None


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                 batch_hint: int) -> nn.Module:
    """A compute-dtype linear holding a merged weight [O, I] and bias [O] (never re-quantized)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(False)
    if packing_available(device, weight.dtype):
        return PackedLinear(linear, batch_hint=batch_hint)  # packed like the base it stands in for
    return linear
