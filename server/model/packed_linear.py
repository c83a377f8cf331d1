"""fp32 and bf16 linears on CPU through oneDNN with the weight pre-packed once at load time.

On CPUs where MKL takes a slow generic path (AMD EPYC with AVX2 here), aten's
`linear` repacks the weight at every call; for the small M of decode steps that
dominates. oneDNN's packed linear was measured 2-4x faster at M = 8..32 on this
machine's 768x2048 projections, and equal at M = 1. Results differ from aten's
only by float summation order (~1e-6 relative).

bf16 is packed too where the CPU multiplies bf16 natively (`cpu_features.cpu_has_fast_bf16`: AVX512-BF16 or
AMX). Measured on the 2-core Zen 4 (issue 23): the 49152x576 lm_head at M=1 takes 3.9 ms packed against 6.8 ms in
aten's bf16 mm, and packed is the fastest bf16 path at M=32 as well. Where bf16 is emulated (Intel without
avx512_bf16, AVX2-only AMD) bf16 stays on aten.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from server.model import cpu_features

log = logging.getLogger(__name__)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_features.cpu_has_fast_bf16())


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W held in oneDNN's blocked layout.

    `weight` returns the plain [out, in] matrix (unpacked on demand, e.g. for merging
    an adapter); `set_weight` repacks after the plain matrix changed.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.batch_hint = batch_hint
        self.dtype = linear.weight.dtype  # float32 or bfloat16 (packing_available)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), batch_hint)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(self.dtype),
                                                                   requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def set_weight(self, weight: torch.Tensor) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.dtype).contiguous(),
                                                              self.batch_hint)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module, batch_hint: int) -> int:
    """Replace the decoder linears and lm_head of a CPU model (float32, or bf16 per packing_available) in place;
    returns how many."""
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child, batch_hint))
                    count += 1
    if type(model.lm_head) is nn.Linear:
        model.lm_head = PackedLinear(model.lm_head, batch_hint)
        count += 1
    log.info("packed %d linears for oneDNN", count)
    return count
