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

if TYPE_CHECKING:
    from server.model.llama import StepInputs


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding: x [B, h, T, D] with cos, sin [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           step: "StepInputs", sliding_window: int | None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] (before rope) of the rows step.rows, cos/sin [B, 1, T, D] of their
    rope positions -> [B, T, H*D]."""
    b, heads, t, d = q.shape
    cache = step.cache
    if t == 1 and q.device.type == "cpu" and q.dtype == cache.k.dtype == cos.dtype:
        kernel = cpu_ext.kernel()
        if kernel is not None:
            # T = 1, so views drop the unit dims: one aten call each, where x[:, :, 0] was two (select and its
            # as_strided) and cos[:, 0, 0] four; 270 of the ~4,500 aten calls per decoded token (profile_step
            # --count-ops). view accepts the transposed q/k/v because the dim their strides differ in has size 1.
            hkv = k.shape[1]
            out = kernel.decode_attention_(q.view(b, heads, d), k.view(b, hkv, d), v.view(b, hkv, d),
                                           cos.view(b, d), sin.view(b, d), cache.k[layer], cache.v[layer],
                                           step.cache_pos.view(b), step.block_tables, sliding_window or 0)  # [B, H, D]
            return out.view(b, 1, heads * d)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = cache.write_and_read(layer, step.block_tables, step.kv_index, k, v, step.kv_len)  # [B, Hkv, L, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.attn_mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, t, heads * d)
