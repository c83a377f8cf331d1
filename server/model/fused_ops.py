"""The decoder layer's elementwise ops, each as one call to the compiled CPU kernels where it can be, else torch.

- `rms_norm(x, weight, eps)`: RMSNorm, normalised in fp32 and scaled in x's dtype (HF's order of casts);
- `add_rms_norm(acc, other, weight, eps)`: the residual add and the next block's norm; the kernel
  (`add_rms_norm_`) updates acc in place to acc + other, as vLLM's fused_add_rms_norm, and normalises it;
- `silu_mul(gate, up)`: silu(gate) * up, the MLP's activation (the kernel `silu_mul_` writes it into gate).

Why (issue 23, point 4): at batch 1 a decoded token is ~4,200 aten calls on the default model, and the calls,
not the arithmetic, are what a token costs outside its GEMMs. In torch the norm is 8 calls plus its casts'
nested ones (~27 profiler events; F.rms_norm is composite on CPU in torch 2.13, 32), the residual add 1 and
SiLU-mul 2; each kernel here is one call (server/model/csrc/norm_act_cpu.cpp).

The `*_reference` functions are the torch path and the semantics: the kernels round every intermediate the
reference stores in the dtype, so they agree with it to the dtype's rounding (tests/test_fused_ops.py). The
kernels run only where their result is the reference's: CPU tensors in bf16 or fp16 (KERNEL_DTYPES), one dtype for
all, contiguous, and no autograd graph wanted (the serving forward runs under inference_mode); anything else takes the reference, which never
writes into its inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from server.model import cpu_ext


# fp32 keeps the torch path: the kernels' last-bit differences (exp, the order of the sum of squares) grew through the
# real model's 30 layers to 1.5-2.2e-4 in its fp32 logits against transformers + PEFT (prefix tuning), over the
# golden bound of 1e-4 (tests/test_real_model_golden.py); in bf16 / fp16 they are below the dtype's rounding.
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm_reference(acc: torch.Tensor, other: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = acc + other
    return rms_norm_reference(total, weight, eps), total


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _kernel(*tensors: torch.Tensor):
    """The compiled module if it may run on these tensors, else None."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in KERNEL_DTYPES:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if any(t.dtype != first.dtype or not t.is_contiguous() for t in tensors):
        return None
    return cpu_ext.kernel()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., E], weight [E] -> [..., E] in x's dtype."""
    kernel = _kernel(x, weight)
    return kernel.rms_norm(x, weight, eps) if kernel is not None else rms_norm_reference(x, weight, eps)


def add_rms_norm(acc: torch.Tensor, other: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """acc, other [..., E], weight [E] -> (rms_norm(acc + other), acc + other). The kernel writes the sum into
    acc's storage (pass a temporary, e.g. a block's output) and returns acc as it; torch returns a new tensor."""
    kernel = _kernel(acc, other, weight) if acc.shape == other.shape else None
    if kernel is None:
        return add_rms_norm_reference(acc, other, weight, eps)
    return kernel.add_rms_norm_(acc, other, weight, eps), acc


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., F] -> silu(gate) * up. The kernel writes it into gate's storage (pass a temporary)."""
    kernel = _kernel(gate, up) if gate.shape == up.shape else None
    return kernel.silu_mul_(gate, up) if kernel is not None else silu_mul_reference(gate, up)
