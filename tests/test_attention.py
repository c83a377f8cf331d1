"""attention.attend over the paged KV cache: the fused CPU decode kernel against rope + the cache write (through
block tables) + SDPA in torch, both against a dense per-row reference, and the kernel's guards."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from server.model import cpu_ext
from server.model.attention import apply_rope, attend
from server.model.kv_cache import KVCache

LAYERS, D, NUM_BLOCKS = 2, 16, 40


def step_for(cache: KVCache, tables: torch.Tensor, positions: list[int], window: int | None):
    """A decode StepInputs-like object with the causal (+ window) mask of its cache positions."""
    cache_pos = torch.tensor(positions)[:, None]  # [B, 1]
    kv_len = max(positions) + 1
    keys = torch.arange(kv_len)[None, None, None, :]
    query = cache_pos[:, None, :, None]
    mask = keys <= query
    if window:
        mask &= keys > query - window
    return SimpleNamespace(cache=cache, block_tables=tables, cache_pos=cache_pos, kv_len=kv_len, attn_mask=mask,
                           kv_index=cache.flat_index(tables, cache_pos))


def dense_reference(cache: KVCache, layer: int, tables, positions, q, k, v, cos, sin, window):
    """Row by row: rope, the new K/V appended to the row's history read position by position, SDPA."""
    outs = []
    size = cache.block_size
    for b, p in enumerate(positions):
        def history(pool, new):  # [Hkv, p, D]: positions 0..p-1 of row b, block by block
            if not p:
                return new.new_zeros(new.shape[1], 0, D)
            return torch.stack([pool[layer, tables[b, j // size], :, j % size] for j in range(p)], dim=1)
        hist_k, hist_v = history(cache.k, k), history(cache.v, v)
        qb, kb = apply_rope(q[b:b + 1], cos[b:b + 1], sin[b:b + 1]), apply_rope(k[b:b + 1], cos[b:b + 1], sin[b:b + 1])
        keys = torch.cat((hist_k[None], kb), dim=2)
        values = torch.cat((hist_v[None], v[b:b + 1]), dim=2)
        lo = max(0, p - window + 1) if window else 0
        out = F.scaled_dot_product_attention(qb.float(), keys[:, :, lo:].float(), values[:, :, lo:].float(),
                                             enable_gqa=True)
        outs.append(out.transpose(1, 2).reshape(1, 1, -1))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype, heads, kv_heads, block_size, positions, window", [
    (torch.float32, 4, 4, 4, [0, 5, 39, 12], None),   # a row at position 0, one at its table's end
    (torch.float32, 8, 2, 16, [7, 3, 20], None),      # GQA
    (torch.float32, 4, 1, 4, [30, 9, 0, 17], 8),      # MQA with a sliding window
    (torch.bfloat16, 4, 2, 8, [11, 25], None),
    (torch.float32, 4, 4, 1, [3], None),              # one row, one position a block
])
def test_kernel_equals_write_then_sdpa(dtype, heads, kv_heads, block_size, positions, window, monkeypatch):
    if cpu_ext.kernel() is None:
        pytest.skip("no compiler for the CPU kernels here")
    torch.manual_seed(0)
    b = len(positions)
    width = -(-40 // block_size)
    num_blocks = max(NUM_BLOCKS, b * width + 1)
    order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(3))[:b * width] + 1
    tables = order.view(b, width)
    q, k, v = torch.randn(b, heads, 1, D, dtype=dtype), torch.randn(b, kv_heads, 1, D, dtype=dtype), \
        torch.randn(b, kv_heads, 1, D, dtype=dtype)
    angles = torch.tensor(positions, dtype=torch.float32)[:, None] * torch.rand(D // 2)  # a row's rope angles
    angles = torch.cat((angles, angles), dim=-1)[:, None, None, :]  # [B, 1, 1, D]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    fused, plain = (KVCache(LAYERS, 1, kv_heads, 40, D, dtype, block_size=block_size, num_blocks=num_blocks)
                    for _ in range(2))
    for cache in (fused, plain):  # the same history in both caches
        gen = torch.Generator().manual_seed(1)
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    reference = dense_reference(plain, 1, tables, positions, q, k, v, cos, sin, window)
    got = attend(1, q, k, v, cos, sin, step_for(fused, tables, positions, window), window)
    monkeypatch.setattr(cpu_ext, "kernel", lambda: None)
    expected = attend(1, q, k, v, cos, sin, step_for(plain, tables, positions, window), window)
    assert got.shape == expected.shape == (b, 1, heads * D) and got.dtype == dtype
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(expected.float(), reference, **tol)
    torch.testing.assert_close(fused.k, plain.k, **tol)  # the rotated new K written, nothing else
    assert torch.equal(fused.v, plain.v)
    for i, p in enumerate(positions):  # the new V landed at its block and offset
        assert torch.equal(fused.v[1, tables[i, p // block_size], :, p % block_size], v[i, :, 0])


def test_kernel_rejects_bad_positions_tables_and_shapes():
    kernel = cpu_ext.kernel()
    if kernel is None:
        pytest.skip("no compiler for the CPU kernels here")
    cache = KVCache(1, 1, 2, 8, D, torch.float32, block_size=4, num_blocks=3)
    q, k, cos = torch.randn(1, 2, D), torch.randn(1, 2, D), torch.ones(1, D)
    table = torch.tensor([[1, 2]])
    with pytest.raises(RuntimeError, match="outside the block table"):
        kernel.decode_attention_(q, k, k, cos, cos, cache.k[0], cache.v[0], torch.tensor([8]), table, 0)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernel.decode_attention_(q, k, k, cos, cos, cache.k[0], cache.v[0], torch.tensor([1]), torch.tensor([[3]]), 0)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # one table for two rows
        kernel.decode_attention_(q.repeat(2, 1, 1), k.repeat(2, 1, 1), k.repeat(2, 1, 1), cos.repeat(2, 1),
                                 cos.repeat(2, 1), cache.k[0], cache.v[0], torch.tensor([1, 1]), table, 0)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # cos of the wrong width
        kernel.decode_attention_(q, k, k, cos[:, :4], cos[:, :4], cache.k[0], cache.v[0], torch.tensor([1]), table, 0)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        kernel.decode_attention_(q, k, k, cos.double(), cos, cache.k[0], cache.v[0], torch.tensor([1]), table, 0)
    assert not cache.k.any() and not cache.v.any()  # nothing half-written
