"""Weight-only int8 / int4 linears on CPU (`--quantization int8-wo | int4-wo`, and the GGUF grid's modules).

Both hold weights in blocks of 32 along the input axis (K):
- Int4Linear: W[n, k] = q[n, k] * scale[n, b] + offset[n, b], q in [0, 15], b = k // 32 (int4-wo: min/max per
  group, offset = min; GGUF Q4_0: offset = -8 scale; Q4_1: offset = m).
- Int8Linear: W[n, k] = q[n, k] * scale[n, b], q int8 (int8-wo: max|w| / 127 per block, GGUF Q8_0's rule; GGUF
  Q8_0 as in the file). Before qgemm, int8-wo scaled per output channel (torch's `_weight_int8pack_mm`); blocks of
  32 are finer (each scale fits 32 weights, not 576-1536), at 4 bytes of fp32 scale per 32 weights.

Kernel: qgemm (server/model/csrc/qgemm_cpu.cpp) wherever the CPU kernels compile (`cpu_ext.kernel()`): codes
repacked once into 16-row tiles, scales/offsets in fp32, the activations quantized per row per block of 32 to int8
(as llama.cpp's Q8_1 / Q8_0 activations), integer dot products (AVX512-VNNI / AVX-VNNI / AVX2 / scalar), fp32
accumulation, y in x's dtype (bf16 or fp32). Measured on the 2-core Zen 4 (`make bench-gemm`, load ~5, bf16 x):
M=1 lm_head 49152x576 Q8 at ~1.0x and Q4 2.5x of bf16 oneDNN-packed; MLP 1536x576 / 576x1536 at 5-14x of
bf16-packed and 7-8x of torch's int4 kernel. It beats torch's int4 and int8 kernels at every M measured
(1, 4, 32, 512), so it serves every M (decode and prefill); at M >= 32 bf16-packed is faster still (0.6-0.9x), but
it needs a dense copy of the weights, which these quantizations exist to avoid.
Error: the activation quantization moves fp32 logits by 2.5-4.7% of the largest |logit| on the real default model
(tests/test_gguf_grid.py) and by up to 4.4% on the tiny random test model (tests/test_weight_only.py), as
llama.cpp's own int8 activations do; the weights themselves are exact.

Without the compiled module (ADAPTER_SERVER_NO_EXT=1, no compiler) or with ADAPTER_SERVER_QGEMM=0 (tests: fp32
exact against the dequantized model): Int4Linear runs torch's `_weight_int4pack_mm_for_cpu` (its formula
w = (q - 8) * scale + zero, zero = offset + 8 scale, scale and zero held in the compute dtype; fast only in bf16:
the lm_head took 4.4 ms in bf16 against 86 ms in fp32), Int8Linear a dense compute-dtype copy of its dequantized
weight (torch's int8 kernel cannot hold blocks of 32). The factory serves these quantizations in bf16 (see
server.engine.factory).

Which modules: every decoder linear and the lm_head. A tied embedding keeps its dense compute-dtype table for the
lookup (one row per token costs nothing; only the lm_head's GEMM reads the whole matrix each step), so the tied
weight is then held twice: dense for the lookup, quantized for the lm_head.

`weight` on these modules returns the dequantized [out, in] matrix (what the kernel computes with, in the compute
dtype), so merges (server.model.merge: a dense compute-dtype copy, never re-quantized) and DoRA norms
(quant.dequantized_weight) work over them as over any linear.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_ONLY = ("int8-wo", "int4-wo")
BLOCK = 32  # weights per block along K: a GGUF Q4_0 / Q4_1 / Q8_0 block, the int4 kernel's group, qgemm's block
INT4_GROUP = BLOCK
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
QGEMM_ENV = "ADAPTER_SERVER_QGEMM"  # "0": torch's kernels even where the compiled qgemm is present (see qgemm())


def qgemm():
    """The compiled module whose `qgemm` these linears run on (server/model/csrc/qgemm_cpu.cpp), or None: no
    compiler (ADAPTER_SERVER_NO_EXT=1), or ADAPTER_SERVER_QGEMM=0, which keeps torch's kernels (int4: fp32 compute
    exact against the dequantized model, no activation quantization) reachable for tests and comparisons. Read
    when a module is built, so a loaded model keeps its choice."""
    if os.environ.get(QGEMM_ENV, "1") == "0":
        return None
    from server.model import cpu_ext

    module = cpu_ext.kernel()
    return module if module is not None and hasattr(module, "qgemm") else None


def _as_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] -> [M, K] in the kernel's dtype; no aten call where nothing changes (decode runs 211 of these
    per token, so a no-op `to` alone was 210 aten calls per token)."""
    if x.dim() != 2:
        x = x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])
    return x if x.dtype == dtype else x.to(dtype)


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """[N, K/32] per-block values -> [N, K], each repeated over its block."""
    return t.float().repeat_interleave(BLOCK, dim=1)


class _BlockLinear(nn.Module):
    """Shared by Int8Linear / Int4Linear on qgemm: packed codes + fp32 params (d, m per block), y in x's dtype."""

    bits: int

    def _pack(self, kernel, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> None:
        self._kernel = kernel
        packed, params = kernel.qgemm_pack(codes.to(torch.int32).contiguous(), scales.float().contiguous(),
                                           offsets.float().contiguous(), self.bits)
        self.register_buffer("packed", packed)
        self.register_buffer("params", params)

    def _apply(self, fn, recurse=True):
        """`model.to(dtype)` casts float buffers: the kernel's fp32 params stay fp32 (the loader casts the dense
        rest of the model after quantizing)."""
        params = self._buffers.get("params")
        out = super()._apply(fn, recurse)
        if params is not None and self._buffers["params"].dtype != torch.float32:
            self._buffers["params"] = params
        return out

    def _qgemm(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else (x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1]))
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.to(self.dtype)
        y = self._kernel.qgemm(x2, self.packed, self.params, self.out_features, self.bits)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _unpacked(self) -> torch.Tensor:
        return self._kernel.qgemm_unpack(self.packed, self.params, self.out_features, self.in_features, self.bits)


class Int8Linear(_BlockLinear):
    """y = x @ W^T + b with W[n, k] = q[n, k] * scale[n, k // 32], q int8, scale fp32 (GGUF Q8_0's grid).

    On qgemm (8-bit codes, int8 activations, fp32 accumulation). Without it, a dense copy of the dequantized weight
    in the compute dtype (F.linear): torch's `_weight_int8pack_mm` scales per output channel only, so it cannot
    hold blocks of 32 exactly. Before qgemm, int8-wo quantized per output channel; blocks of 32 are more accurate
    (measured max weight error on SmolLM2's linears, tests/test_weight_only.py) at 1/32 more bytes of scales.
    """

    bits = 8

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        """qweight [N, K] integers in [-128, 127]; scales [N, K/32] (any float dtype, kept in fp32)."""
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype
        if scales.shape != (self.out_features, self.in_features // BLOCK) or self.in_features % BLOCK:
            raise ValueError(f"Int8Linear: scales {tuple(scales.shape)} do not fit weights {tuple(qweight.shape)} in "
                             f"blocks of {BLOCK}")
        kernel = qgemm()
        if kernel is not None:
            self._pack(kernel, qweight, scales, torch.zeros_like(scales, dtype=torch.float32))
        else:
            self._kernel = None
            self.register_buffer("dense", (qweight.float() * _blocks(scales)).to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int8Linear":
        """Symmetric per block of 32: scale = max|w| / 127, q = round(w / scale) (GGUF's Q8_0 rule)."""
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
        scales = (w.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
        q = torch.round(w / scales[..., None]).clamp_(-127, 127).reshape(n, k).to(torch.int8)
        return cls(q, scales, bias, dtype)

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        return in_features % BLOCK == 0

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized [N, K] in the compute dtype (q * scale, from the fp32 values the kernel uses)."""
        return self.dense if self._kernel is None else self._unpacked().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None:
            return self._qgemm(x)
        return nn.functional.linear(x.to(self.dtype), self.dense, self.bias)

    def extra_repr(self) -> str:
        where = "qgemm" if self._kernel is not None else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 blocks of {BLOCK}, {where}"


class Int4Linear(_BlockLinear):
    """y = x @ W^T + b with W[n, k] = q[n, k] * scale[n, k // 32] + offset[n, k // 32], q in [0, 15].

    On qgemm where it is compiled: 4-bit codes, fp32 scale and offset, int8 activations. Otherwise on torch's
    int4 kernel, whose formula is w = (q - 8) * scale + zero (zero = offset + 8 scale, both held in the compute
    dtype): `packed` is its uint8 layout of q [N', K/2], `scale_zeros` [K/32, N', 2]. That kernel needs
    N' % 16 == 0: other N (a vocabulary of 263) are padded with zero rows whose outputs are cut off.
    """

    bits = 4

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        """codes [N, K] integers in [0, 15]; scales, offsets [N, K/32] (any float dtype)."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = INT4_GROUP
        self.dtype = dtype
        kernel = qgemm()
        if kernel is not None:
            self._pack(kernel, codes, scales, offsets)
        else:
            self._kernel = None
            zeros = offsets.float() + 8.0 * scales.float()
            pad = -self.out_features % INT4_N_MULTIPLE
            if pad:  # zero rows: code 8, scale 0, zero 0
                codes = torch.cat([codes, torch.full((pad, self.in_features), 8, dtype=codes.dtype)])
                scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32).contiguous(), 1))
            self.register_buffer("scale_zeros", torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int4Linear":
        """Asymmetric min/max per group of 32: scale = (max - min) / 15, q = round((w - min) / scale),
        offset = min."""
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // INT4_GROUP, INT4_GROUP)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales = ((hi - lo) / 15.0).clamp_min(1e-12)
        codes = torch.round((w - lo[..., None]) / scales[..., None]).clamp_(0, 15).reshape(n, k)
        return cls(codes, scales, lo, bias, dtype)

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        return in_features % INT4_GROUP == 0

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized [N, K] in the compute dtype: on qgemm q * scale + offset from its fp32 values; on torch's
        kernel read back through the kernel itself (x = identity), the values it multiplies by."""
        if self._kernel is not None:
            return self._unpacked().to(self.dtype)
        eye = torch.eye(self.in_features, dtype=self.scale_zeros.dtype)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scale_zeros)
        return w[:, :self.out_features].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None:
            return self._qgemm(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_as_2d(x, self.scale_zeros.dtype), self.packed,
                                                        self.group, self.scale_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        # a view where it can be (one aten call; reshape is two), as _as_2d
        return y.view(*x.shape[:-1], self.out_features) if y.is_contiguous() else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        where = "qgemm" if self._kernel is not None else "torch int4"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group}, {where}"


def quantize_linear(linear: nn.Module, method: str, dtype: torch.dtype) -> nn.Module:
    """The weight-only module for a dense linear, or the linear itself where the int4 kernel's shapes do not fit."""
    weight, bias = linear.weight, linear.bias
    cls = {"int8-wo": Int8Linear, "int4-wo": Int4Linear}.get(method)
    if cls is not None:
        if not cls.fits(*weight.shape):
            log.warning("%s: %s stays dense (K %% %d is not 0)", method, tuple(weight.shape), BLOCK)
            return linear
        return cls.quantize(weight, bias, dtype)
    raise ValueError(f"unknown weight-only quantization {method!r}; choose one of {', '.join(WEIGHT_ONLY)}")


def quantize_weight_only(model: nn.Module, method: str, dtype: torch.dtype) -> int:
    """Replace every decoder linear and the lm_head of an fp32 model in place; returns how many were quantized.
    A tied embedding stays dense (see the module docstring)."""
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    new = quantize_linear(child, method, dtype)
                    setattr(parent, name, new)
                    count += new is not child
    if type(model.lm_head) is nn.Linear:
        new = quantize_linear(model.lm_head, method, dtype)
        count += new is not model.lm_head
        model.lm_head = new
    log.info("quantized %d linears to %s", count, method)
    return count


def is_weight_only(module: nn.Module) -> bool:
    return isinstance(module, (Int8Linear, Int4Linear))
