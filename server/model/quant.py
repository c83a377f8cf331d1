"""bitsandbytes quantization of the base model's decoder linears.

Like transformers' bitsandbytes integration, only the linears inside decoder
layers are quantized; embeddings, norms and lm_head stay in the compute dtype.
Quantized modules are put in eval mode: bitsandbytes on CPU is 5-25x slower in
training mode.

`dequantized_weight` is the one place that turns a (possibly quantized) linear back
into a dense [out, in] matrix (merging adapters needs it); see there for the states
bitsandbytes moves a weight through after quantization.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

BNB_METHODS = ("nf4", "fp4", "int8")  # bitsandbytes, decoder linears only (this module)
# every --quantization: none, bitsandbytes, CPU weight-only (server.model.weight_only), a GGUF's own grid (gguf_grid)
QUANTIZATIONS = ("none", *BNB_METHODS, "int8-wo", "int4-wo", "gguf")
NF4_BLOCK = 64


def quantize_linear(linear: nn.Linear, method: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Return a bitsandbytes module computing the same function as `linear` (up to quantization error)."""
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    weight = linear.weight.data
    if method in ("nf4", "fp4"):
        if device.type == "cpu" and linear.in_features % NF4_BLOCK:
            raise ValueError(
                f"{method} on CPU needs in_features to be a multiple of {NF4_BLOCK}; this base has a linear with "
                f"in_features={linear.in_features}: use --quantization none or int8"
            )
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                   compute_dtype=compute_dtype, quant_type=method, device="cpu")
        # no double quantization: transformers' default (bnb_4bit_use_double_quant=False)
        module.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=method,
                                          compress_statistics=False)
    elif method == "int8":
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                     has_fp16_weights=False, threshold=0.0, device="cpu")
        module.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"unknown bitsandbytes quantization {method!r}; choose one of {', '.join(BNB_METHODS)}")
    if has_bias:
        module.bias = nn.Parameter(linear.bias.data.to(compute_dtype).cpu(), requires_grad=False)
    return module.to(device).eval()  # .to() is where bitsandbytes quantizes


def quantize_decoder_linears(model: nn.Module, method: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every nn.Linear under model.model.layers in place; returns how many were replaced."""
    if method == "none":
        return 0
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, method, compute_dtype, device))
                    count += 1
    log.info("quantized %d decoder linears to %s", count, method)
    return count


def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] matrix that `module` multiplies by, in `dtype`, at any point of its life.

    `module` is a bitsandbytes Linear4bit (NF4/FP4), a Linear8bitLt, or anything with a plain
    `.weight` [out, in] (nn.Linear, PackedLinear; the result may then share its memory: do not
    write into it). bitsandbytes 0.50 changes a quantized weight's state in place at its first
    eval-mode forward, so the state seen at quantization time is not the one seen later:

    - 4-bit, on CPUs with AVX512-BF16 (bnb's `has_avx512bf16()`): `weight.data` [N*K/2, 1] is
      repacked into a blocked [N, K/2] layout for its CPU kernel, `quant_state.absmax` [N*K/64]
      fp32 becomes [K/64, N] bf16, `quant_state.dtype` becomes bf16 and
      `quant_state.packing_format_for_cpu` becomes True. `dequantize_4bit` does not know that
      layout (it returns garbage). The layout is undone here on a copy of the state with bnb's own
      inverse, and absmax is put back in its [N*K/64] order: the result is the weight that the
      repacked kernel computes with (absmax rounded to bf16, as the kernel reads it). The module
      is left as it is. On other CPUs (AMD AVX2) nothing is repacked.
    - int8: at its first forward Linear8bitLt moves the per-row scales `SCB` [N] from the weight
      to `module.state`; W = int8 rows * SCB / 127.
    """
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit
        import bitsandbytes.functional as bnbf

        data, state = _unpacked_4bit(weight.data, state, copy.copy(state))
        return bnbf.dequantize_4bit(data, state).to(dtype)
    scales = getattr(weight, "SCB", None)
    if scales is None and getattr(module, "state", None) is not None and weight.dtype == torch.int8:
        scales = module.state.SCB  # after the first forward
    if scales is not None:  # int8 rows with per-row absmax
        return (weight.data.float() * scales.float()[:, None] / 127.0).to(dtype)
    return weight.detach().to(dtype)


def _unpacked_4bit(data: torch.Tensor, state, scratch):
    """(data, state) of a 4-bit weight in bitsandbytes' portable layout: `data`/`state` as they are when not
    repacked for the AVX512-BF16 CPU kernel; otherwise undone with bnb's own inverse into `scratch` (a copy of
    `state`, or `state` itself to undo it in place), with absmax put back in its [N*K/64] fp32 order (bnb's
    inverse leaves it [K/64, N] bf16; the bf16 rounding of the repack stays)."""
    if not getattr(state, "packing_format_for_cpu", False):
        return data, state
    import bitsandbytes.functional as bnbf

    data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, scratch)
    if not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).float()
    return data, state


def keep_4bit_trainable(model: nn.Module) -> int:
    """Put every bitsandbytes 4-bit linear under `model` back in its portable layout and stop it from repacking
    again; returns how many were undone.

    On AVX512-BF16 CPUs (Intel AMX, AMD Zen 4) bitsandbytes 0.50 repacks a 4-bit weight at its first eval-mode
    forward, and every later forward of that layer, train mode included, goes through `bitsandbytes::gemv_4bit`,
    which has no autograd kernel: the layer's input gets no gradient, so nothing below it learns (measured on
    Zen 4: QLoRA loss 26.391 -> 26.391, every lora_B zero). A trainer calls this before it trains, whatever ran
    before (an eval pass, a merge, a served forward). Eval passes then use the portable path too (slower, and
    the same numbers as training's forward). bnb's own `_save_to_state_dict` undoes the repack the same way.
    """
    import bitsandbytes as bnb

    undone = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False  # Linear4bit.forward repacks only while this is true
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _unpacked_4bit(weight.data, weight.quant_state, weight.quant_state)
            undone += 1
    return undone


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized weights count as stored)."""
    seen: set[int] = set()
    total = sum(m.nbytes for m in model.modules() if type(m).__name__ == "PackedLinear")
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue  # tied weights count once
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total
