"""Triton kernels for the batched adapter ops on GPU: mixed-adapter LoRA (SGMV) and per-row IA3.

adapter_ops.add_lora / row_scale call these on CUDA when triton is importable; their
semantics are the reference op's (adapter_ops.lora_delta_reference). The module imports
without triton (then `available()` is False and nothing here may be called).

Shapes: N rows of T tokens, M = N * T tokens, S1 = S + 1 slots (slot 0 = identity),
Rmax, I in_features, O out_features.

- x [N, T, I], y [N, T, O]; lora_a [S1, Rmax, I] ("shrink"), lora_b [S1, Rmax, O]
  ("expand": PEFT's B transposed, scaling folded in); slot_of_row [N] long; slot_rank
  [S1] long, a slot's own rank (0 = no LoRA in this layer: its rows are not touched);
  `rank` caps every slot's rank (the largest among the batch's slots).

LoRA, SGMV-style as in Punica and vLLM's lora ops: every token takes its row's slot;
tokens are sorted by slot (a stable argsort on the device, no host sync) and cut into
tiles of BLOCK_M tokens of one slot, each slot's tiles numbered after the previous
slot's (`_Tiles`). A program finds its tile's slot by counting the tile ends at or
below its program id, gathers its tokens' rows, and multiplies them by that slot's
factors read once per tile, rows past the slot's rank masked to zero (never read):

- shrink: z[m, :rank_s] = x[m] @ A[s, :rank_s].T, fp32 accumulation, the I axis split
  over SPLIT_K programs whose partial sums are added afterwards (deterministic);
- expand: y[m] = y[m] + z[m] @ B[s, :rank_s], z kept in fp32 (the reference op rounds it
  to the compute dtype; the CPU kernel does not either), accumulated and added in fp32,
  rounded once.

The grid is sized from M and S1 alone (cdiv(M, BLOCK_M) + S1 tiles at most), so a
forward launches without reading anything back. Decode (T = 1) and prefill (T > 1,
flattened to tokens) take the same path. The tile table depends only on slot_of_row,
so it is built once per forward and reused by every layer (`_tiles`).

IA3: out[n, t] = y[n, t] * scales[slot_of_row[n]] in one pass (no gathered copy),
the product in fp32 rounded once, which is what torch's elementwise multiply does.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: nothing below is launched
    triton = None

    class tl:  # noqa: N801 - stands in for triton.language in the kernels' annotations
        constexpr = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


def available() -> bool:
    """Triton is importable and not disabled by ADAPTER_SERVER_NO_TRITON=1."""
    return triton is not None and os.environ.get("ADAPTER_SERVER_NO_TRITON", "") in ("", "0")


def _emulate_bf16(*dtypes: torch.dtype) -> bool:
    """Under Triton's CPU interpreter (TRITON_INTERPRET=1, the tests), bf16 arithmetic is emulated."""
    return torch.bfloat16 in dtypes and os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@_jit
def _add(a, b):
    return a + b


@_jit
def _cast(v, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. EMULATE_BF16 (interpreter only, which truncates to bf16 and
    cannot multiply bf16): the rounding done on integer bits, as the GPU's conversion does it."""
    if EMULATE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@_jit
def _tile_tokens(tile_end_ptr, counts_ptr, starts_ptr, order_ptr, n_slots, BLOCK_M: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    """(slot, token ids [BLOCK_M], valid [BLOCK_M]) of this program's tile; slot >= n_slots: no tile."""
    p = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    ends = tl.load(tile_end_ptr + offs_s, mask=offs_s < n_slots, other=2147483647)
    s = tl.reduce((ends <= p).to(tl.int32), 0, _add)  # tl.sum, from builtins only
    s_safe = tl.minimum(s, n_slots - 1)
    count = tl.load(counts_ptr + s_safe)
    first_tile = tl.load(tile_end_ptr + s_safe) - (count + BLOCK_M - 1) // BLOCK_M
    offs = (p - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs < count
    tokens = tl.load(order_ptr + tl.load(starts_ptr + s_safe) + offs, mask=valid, other=0)
    return s, tokens, valid


@_jit
def _shrink_kernel(x_ptr, a_ptr, z_ptr, slot_rank_ptr, tile_end_ptr, counts_ptr, starts_ptr, order_ptr,
                   n_slots, rank, in_features, k_per_split, stride_xm, stride_as, stride_ar, stride_zs,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
                   PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    s, tokens, valid = _tile_tokens(tile_end_ptr, counts_ptr, starts_ptr, order_ptr, n_slots, BLOCK_M, BLOCK_S)
    if s < n_slots:
        r_s = tl.minimum(tl.load(slot_rank_ptr + s), rank)
        if r_s > 0:
            offs_r = tl.arange(0, BLOCK_R)
            offs_k = tl.arange(0, BLOCK_K)
            acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
            k_start = tl.program_id(1) * k_per_split
            for k in range(k_start, tl.minimum(k_start + k_per_split, in_features), BLOCK_K):
                kk = k + offs_k
                xt = tl.load(x_ptr + tokens[:, None] * stride_xm + kk[None, :],
                             mask=valid[:, None] & (kk[None, :] < in_features), other=0.0)
                at = tl.load(a_ptr + s * stride_as + offs_r[:, None] * stride_ar + kk[None, :],
                             mask=(offs_r[:, None] < r_s) & (kk[None, :] < in_features), other=0.0)
                if EMULATE_BF16:  # the same products: bf16 x bf16 is exact in fp32
                    xt, at = xt.to(tl.float32), at.to(tl.float32)
                acc += tl.dot(xt, tl.trans(at), input_precision=PRECISION)
            z = z_ptr + tl.program_id(1) * stride_zs + tokens[:, None] * BLOCK_R + offs_r[None, :]
            tl.store(z, acc, mask=valid[:, None])


@_jit
def _expand_kernel(z_ptr, b_ptr, y_ptr, slot_rank_ptr, tile_end_ptr, counts_ptr, starts_ptr, order_ptr,
                   n_slots, rank, out_features, stride_bs, stride_br, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                   EMULATE_BF16: tl.constexpr):
    s, tokens, valid = _tile_tokens(tile_end_ptr, counts_ptr, starts_ptr, order_ptr, n_slots, BLOCK_M, BLOCK_S)
    if s < n_slots:
        r_s = tl.minimum(tl.load(slot_rank_ptr + s), rank)
        if r_s > 0:
            offs_r = tl.arange(0, BLOCK_R)
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            zt = tl.load(z_ptr + tokens[:, None] * BLOCK_R + offs_r[None, :],
                         mask=valid[:, None] & (offs_r[None, :] < r_s), other=0.0)
            bt = tl.load(b_ptr + s * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :],
                         mask=(offs_r[:, None] < r_s) & (offs_n[None, :] < out_features), other=0.0)
            delta = tl.dot(zt, bt.to(tl.float32), input_precision="ieee")  # K = rank: cheap in fp32
            y = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
            mask = valid[:, None] & (offs_n[None, :] < out_features)
            yt = tl.load(y, mask=mask, other=0.0)
            tl.store(y, _cast(yt.to(tl.float32) + delta, yt.dtype, EMULATE_BF16), mask=mask)


@_jit
def _row_scale_kernel(y_ptr, scales_ptr, slot_ptr, out_ptr, n_tokens, tokens_per_row, features,
                      BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, EMULATE_BF16: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_m[:, None] < n_tokens) & (offs_f[None, :] < features)
    slots = tl.load(slot_ptr + offs_m // tokens_per_row, mask=offs_m < n_tokens, other=0)
    yv = tl.load(y_ptr + offs_m[:, None].to(tl.int64) * features + offs_f[None, :], mask=mask, other=0.0)
    sv = tl.load(scales_ptr + slots[:, None] * features + offs_f[None, :], mask=mask, other=0.0)
    out = out_ptr + offs_m[:, None].to(tl.int64) * features + offs_f[None, :]
    tl.store(out, _cast(yv.to(tl.float32) * sv.to(tl.float32), out.dtype.element_ty, EMULATE_BF16), mask=mask)


@dataclass
class _Tiles:
    """Tokens sorted by slot: order [M] (token ids), counts/starts [S1] (per slot, into order),
    tile_end [S1] (cumulative tiles of BLOCK_M tokens, slot by slot), grid (an upper bound on tiles)."""
    order: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    tile_end: torch.Tensor
    grid: int


_last_tiles: tuple[object, tuple, _Tiles] | None = None  # (weakref to slot_of_row, key, tiles)


def _tiles(slot_of_row: torch.Tensor, tokens_per_row: int, n_slots: int, block_m: int) -> _Tiles:
    """The tile table, cached for the last slot_of_row seen (one forward: every layer shares it).

    An in-place change of slot_of_row is seen by its version counter, except for inference tensors
    (the engine's, made in inference mode), which have none: the engine makes a new one per forward."""
    global _last_tiles
    version = None if slot_of_row.is_inference() else slot_of_row._version
    key = (version, tokens_per_row, n_slots, block_m)
    if _last_tiles is not None and _last_tiles[0]() is slot_of_row and _last_tiles[1] == key:
        return _last_tiles[2]
    token_slot = slot_of_row if tokens_per_row == 1 else slot_of_row.repeat_interleave(tokens_per_row)
    order = torch.argsort(token_slot, stable=True)
    counts = torch.zeros(n_slots, dtype=torch.long, device=slot_of_row.device)
    counts.scatter_add_(0, token_slot, torch.ones_like(token_slot))
    tile_end = torch.div(counts + block_m - 1, block_m, rounding_mode="floor").cumsum(0)
    grid = triton.cdiv(token_slot.numel(), block_m) + n_slots  # each slot adds at most one partial tile
    tiles = _Tiles(order, counts, counts.cumsum(0) - counts, tile_end, grid)
    _last_tiles = (weakref.ref(slot_of_row), key, tiles)
    return tiles


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             slot_of_row: torch.Tensor, rank: int, slot_rank: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, T, O] + each row's LoRA delta, in place (y is made contiguous first) and returned.

    x [N, T, I]; lora_a [S1, Rmax, I], lora_b [S1, Rmax, O]; slot_of_row [N]; slot_rank [S1]
    (None: every slot but 0 has `rank`). Exact to the reference op up to fp32 summation order.
    """
    n, t, in_features = x.shape
    n_slots, _, out_features = lora_b.shape
    m = n * t
    y = y.contiguous()
    x2 = x.reshape(m, in_features).to(lora_a.dtype).contiguous()
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    if slot_rank is None:
        slot_rank = torch.full((n_slots,), rank, dtype=torch.long, device=x.device)
        slot_rank[0] = 0
    block_m = 16 if m <= 256 else 64
    block_r = max(16, triton.next_power_of_2(rank))
    block_k, block_n, block_s = 128, 128, triton.next_power_of_2(n_slots)
    tiles = _tiles(slot_of_row, t, n_slots, block_m)
    k_blocks = triton.cdiv(in_features, block_k)
    split_k = 1 if m > 256 else min(8, max(1, k_blocks // 4))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(in_features, k_per_split)
    z = torch.empty(split_k, m, block_r, dtype=torch.float32, device=x.device)
    emulate = _emulate_bf16(lora_a.dtype, y.dtype)
    precision = "ieee" if lora_a.dtype == torch.float32 or emulate else "tf32"  # fp32: no tf32; 16-bit: ignored
    table = (tiles.tile_end, tiles.counts, tiles.starts, tiles.order, n_slots, rank)
    _shrink_kernel[(tiles.grid, split_k)](
        x2, lora_a, z, slot_rank, *table, in_features, k_per_split, x2.stride(0), lora_a.stride(0),
        lora_a.stride(1), z.stride(0), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_S=block_s,
        PRECISION=precision, EMULATE_BF16=emulate, num_warps=4)
    z = z[0] if split_k == 1 else z.sum(0)  # rows of rank-0 slots hold garbage and are never read
    y2 = y.view(m, out_features)
    _expand_kernel[(tiles.grid, triton.cdiv(out_features, block_n))](
        z, lora_b, y2, slot_rank, *table, out_features, lora_b.stride(0), lora_b.stride(1), y2.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_S=block_s, EMULATE_BF16=emulate, num_warps=4)
    return y


def row_scale(y: torch.Tensor, scales: torch.Tensor, slot_of_row: torch.Tensor) -> torch.Tensor:
    """IA3: a new tensor y [N, T, F] * scales[slot_of_row] ([S1, F], broadcast over T)."""
    n, t, features = y.shape
    y = y.contiguous()
    scales = scales.contiguous()
    out = torch.empty_like(y, dtype=torch.result_type(y, scales))
    block_m, block_f = 16, 128
    grid = (triton.cdiv(n * t, block_m), triton.cdiv(features, block_f))
    _row_scale_kernel[grid](y, scales, slot_of_row, out, n * t, t, features, BLOCK_M=block_m, BLOCK_F=block_f,
                            EMULATE_BF16=out.dtype == torch.bfloat16 and _emulate_bf16(out.dtype), num_warps=4)
    return out
