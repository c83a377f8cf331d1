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

bf16 where the CPU has it natively and the C++ kernels are built is held twice: packed for oneDNN, and as the plain
row-major [out, in] matrix for our GEMV (`bf16_linear`, csrc/bf16_gemm_cpu.cpp), which serves up to
`GEMV_MAX_ROWS` rows of x (decode); more rows (prefill, large batches) go to oneDNN as before. The lm_head stays on
oneDNN alone (pack_linears: measured faster there). Why twice, measured (see GEMV_MAX_ROWS and
docs/BENCHMARKS.md): our GEMV is 1.2-10x faster than oneDNN on the decoder's linears at M <= 8, slower at
M = 16-32 on the larger ones and at prefill sizes, and aten's linear on the plain matrix alone (the one-copy
alternative) is slower than oneDNN-packed at every M measured, prefill included. So the decoder linears' bf16 bytes
double (SmolLM2-135M: +212 MB); `weight_bytes` counts both. Where the second copy would take more than
PLAIN_COPY_MAX_SHARE of the available memory, it is not made (a warning says so) and oneDNN serves every step.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from server.model import cpu_ext, cpu_features

log = logging.getLogger(__name__)


# Rows of x (tokens in the step) up to which bf16 goes through our GEMV; above, oneDNN-packed. Measured on the
# 2-core Zen 4 (make bench-gemm, load 3-4): ours / oneDNN per call at M = 1, 4, 8 on SmolLM2's 1536x576,
# 576x1536, 576x576 and 192x576: 1.2-10x faster (M = 8: 1.2-8.7x); at M = 16-32 from 0.45x (1536x576) to 2.7x.
GEMV_MAX_ROWS = 8
# The plain copies add the decoder linears' bf16 bytes once more. They are held only while that is at most this share
# of the memory available at load (MemAvailable): SmolLM2-135M adds 212 MB, an 8B model would add ~14 GB and then
# keeps its one packed copy (a 24 GiB machine would not hold both).
PLAIN_COPY_MAX_SHARE = 0.25


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where there is no such file."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gemv_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where bf16 linears are held plain for our GEMV: bf16 on a CPU with native bf16 (the only kind measured;
    the AVX-512F / AVX2 paths of the kernel are tested for correctness but not timed) and the kernels built."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and cpu_features.cpu_has_fast_bf16()
            and cpu_ext.kernel() is not None)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_features.cpu_has_fast_bf16())


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W held in oneDNN's blocked layout, and (bf16 where `gemv_available`) plain as well for
    our GEMV at up to GEMV_MAX_ROWS rows.

    `weight` returns the plain [out, in] matrix (unpacked on demand, e.g. for merging an adapter; the held plain
    matrix itself where there is one: do not write into it); `set_weight` repacks after the plain matrix changed.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int, gemv: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.batch_hint = batch_hint
        self.dtype = linear.weight.dtype  # float32 or bfloat16 (packing_available)
        self.gemv = gemv and gemv_available(linear.weight.device, self.dtype)
        self.register_buffer("plain", None, persistent=False)  # a buffer: weight_bytes counts a tied one once
        self.set_weight(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(self.dtype),
                                                                   requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.plain if self.gemv else self.packed.to_dense()

    def set_weight(self, weight: torch.Tensor) -> None:
        weight = weight.detach().to(self.dtype).contiguous()  # no copy when it already is (a tied lm_head shares)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.batch_hint)
        if self.gemv:
            self.plain = weight

    @property
    def nbytes(self) -> int:
        """Bytes of the oneDNN-packed copy (the plain matrix is a buffer, counted with the model's buffers)."""
        return self.packed.numel() * self.packed.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not self.gemv or rows > GEMV_MAX_ROWS or x.dtype != self.dtype or x.requires_grad:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = cpu_ext.kernel().bf16_linear(x.reshape(rows, self.in_features).contiguous(), self.plain, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module, batch_hint: int) -> int:
    """Replace the decoder linears and lm_head of a CPU model (float32, or bf16 per packing_available) in place;
    returns how many."""
    linears = [(parent, name, child) for layer in model.model.layers for parent in (layer.self_attn, layer.mlp)
               for name, child in list(parent.named_children()) if type(child) is nn.Linear]
    gemv = True
    if linears and gemv_available(linears[0][2].weight.device, linears[0][2].weight.dtype):
        extra, available = sum(c.weight.numel() * c.weight.element_size() for _, _, c in linears), available_bytes()
        if available is not None and extra > PLAIN_COPY_MAX_SHARE * available:
            gemv = False
            log.warning("bf16 decode GEMV off: its plain copies of the decoder linears (%.1f GB) would exceed %.0f%% "
                        "of the available memory (%.1f GB); oneDNN-packed alone serves every step",
                        extra / 1e9, PLAIN_COPY_MAX_SHARE * 100, available / 1e9)
    for parent, name, child in linears:
        setattr(parent, name, PackedLinear(child, batch_hint, gemv=gemv))
    count = len(linears)
    if type(model.lm_head) is nn.Linear:
        # oneDNN only: on SmolLM2's 49152x576 lm_head our GEMV took 0.63-0.73x oneDNN's speed at M = 1 and 8
        # (make bench-gemm, Zen 4, load 3.3, three runs): one long matrix streams faster in oneDNN's layout
        model.lm_head = PackedLinear(model.lm_head, batch_hint, gemv=False)
        count += 1
    log.info("packed %d linears for oneDNN", count)
    return count
