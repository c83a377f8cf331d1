"""Attention of one group of rows over the KV cache: rope, store the new K/V, attend, return the heads' outputs.

Two paths, same result up to float rounding (~1e-6 relative in fp32):
- decode (T = 1) on CPU with the compiled kernels: `decode_attention_` rotates each row's q and k, writes
  its new K/V and attends over its own length in one pass over its blocks, read in place through the
  row's block table (cpu_ext; measured before paging: 0.68 vs 1.5 ms per layer for index_copy_ + SDPA at
  batch 32, fp32, 2 cores: +5.6% tok/s for the engine step);
- otherwise (prefill, CUDA, no compiler): rope in torch, `KVCache.write_and_read` (writes the new K/V
  through the block tables and gathers each row's blocks), then SDPA with the step's mask.

The kernel derives the mask from the cache positions (key j is visible to the query at position p iff
j <= p and, with a sliding window W, j > p - W), which is the mask every StepInputs carries.

Shapes: B rows, T new tokens per row, H query heads, Hkv key/value heads, D head dim.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from server.model import cpu_ext
from server.model.gate_layers import gated_prefix_attention

if TYPE_CHECKING:
    from server.model.llama import StepInputs


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding: x [B, h, T, D] with cos, sin [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


def decode_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, step: "StepInputs", sliding_window: int | None, kv_heads: int
                  ) -> torch.Tensor | None:
    """The compiled decode kernel on the projections as they come: q [B, 1, H*D], k/v [B, 1, Hkv*D], cos/sin
    [B, 1, 1, D] -> [B, 1, H*D]; None where it does not apply (T > 1, not CPU, dtypes differ, no compiler).

    Views only, and the per-step ones (cos, sin, positions as [B, D], [B]) made once per step in
    `step.decode_inputs`: at batch 1 the calls are the cost, and the path through `attend` (view + transpose
    of q/k/v, views back, `cache.k[layer]`) was ~20 aten calls per layer, this is 4 (profile_step --count-ops).
    """
    b, t, width = q.shape
    cache = step.cache
    if t != 1 or q.device.type != "cpu" or not q.dtype == cache.k.dtype == cos.dtype:
        return None
    kernel = cpu_ext.kernel()
    if kernel is None:
        return None
    d = cos.shape[-1]
    made = getattr(step, "decode_inputs", None)
    if made is None or made[0] is not cos:
        made = step.decode_inputs = (cos, cos.view(b, d), sin.view(b, d), step.cache_pos.view(b))
    _, cos_bd, sin_bd, positions = made

    def heads(x: torch.Tensor, n: int) -> torch.Tensor:  # [B, 1, n*D] -> [B, n, D]
        return x.view(b, n, d) if x.is_contiguous() else x.reshape(b, n, d)

    out = kernel.decode_attention_(heads(q, width // d), heads(k, kv_heads), heads(v, kv_heads), cos_bd, sin_bd,
                                   cache.k_layers[layer], cache.v_layers[layer], positions, step.block_tables,
                                   sliding_window or 0)  # [B, H, D]
    return out.view(b, 1, width)


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           step: "StepInputs", sliding_window: int | None, gate=None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] (before rope) of the rows step.rows, cos/sin [B, 1, T, D] of their
    rope positions -> [B, T, H*D]. (A decode step of the model goes through `decode_attend` first.)
    gate: (g [B, T, 2], prefix_len [B]) when a row has UniPELT's gated prefix (server.model.gate_layers): the
    torch path, then those rows recomputed with their gates."""
    b, heads, t, d = q.shape
    if t == 1 and gate is None:
        hkv = k.shape[1]
        out = decode_attend(layer, q.transpose(1, 2).reshape(b, 1, heads * d), k.transpose(1, 2).reshape(b, 1, hkv * d),
                            v.transpose(1, 2).reshape(b, 1, hkv * d), cos, sin, step, sliding_window, hkv)
        if out is not None:
            return out
    cache = step.cache
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = cache.write_and_read(layer, step.block_tables, step.kv_index, k, v, step.kv_len)  # [B, Hkv, L, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.attn_mask, enable_gqa=True)
    if gate is not None:
        out = gated_prefix_attention(out, q, keys, values, step.attn_mask, gate)
    return out.transpose(1, 2).reshape(b, t, heads * d)
