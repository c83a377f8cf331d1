"""bitsandbytes quantization of the base model's decoder linears.

Like transformers' bitsandbytes integration, only the linears inside decoder
layers are quantized; embeddings, norms and lm_head stay in the compute dtype.
Quantized modules are put in eval mode: bitsandbytes on CPU is 5-25x slower in
training mode.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
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
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")
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
