"""attention.attend: the fused CPU decode kernel against rope + the cache write + SDPA in torch, and its guards."""
from types import SimpleNamespace

import pytest
import torch

from server.model import cpu_ext
from server.model.attention import attend
from server.model.kv_cache import KVCache

LAYERS, ROWS, S, D = 2, 6, 40, 16


def step_for(cache: KVCache, first_row: int, positions: list[int], window: int | None):
    """A decode StepInputs-like object with the causal (+ window) mask of its cache positions."""
    cache_pos = torch.tensor(positions)[:, None]  # [B, 1]
    kv_len = max(positions) + 1
    keys = torch.arange(kv_len)[None, None, None, :]
    query = cache_pos[:, None, :, None]
    mask = keys <= query
    if window:
        mask &= keys > query - window
    rows = slice(first_row, first_row + len(positions))
    return SimpleNamespace(cache=cache, rows=rows, cache_pos=cache_pos, kv_len=kv_len, attn_mask=mask,
                           kv_index=cache.flat_index(rows, cache_pos))


@pytest.mark.parametrize("dtype, heads, kv_heads, first_row, positions, window", [
    (torch.float32, 4, 4, 0, [0, 5, 39, 12], None),   # a row at position 0 and one at the cache's end
    (torch.float32, 8, 2, 1, [7, 3, 20], None),       # GQA, rows not starting at 0
    (torch.float32, 4, 1, 2, [30, 9, 0, 17], 8),      # MQA with a sliding window
    (torch.bfloat16, 4, 2, 0, [11, 25], None),
    (torch.float32, 4, 4, 0, [3], None),              # one row
])
def test_kernel_equals_write_then_sdpa(dtype, heads, kv_heads, first_row, positions, window, monkeypatch):
    if cpu_ext.kernel() is None:
        pytest.skip("no compiler for the CPU kernels here")
    torch.manual_seed(0)
    b = len(positions)
    q, k, v = torch.randn(b, heads, 1, D, dtype=dtype), torch.randn(b, kv_heads, 1, D, dtype=dtype), \
        torch.randn(b, kv_heads, 1, D, dtype=dtype)
    angles = torch.tensor(positions, dtype=torch.float32)[:, None] * torch.rand(D // 2)  # a row's rope angles
    angles = torch.cat((angles, angles), dim=-1)[:, None, None, :]  # [B, 1, 1, D]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    fused, plain = (KVCache(LAYERS, ROWS, kv_heads, S, D, dtype) for _ in range(2))
    for cache in (fused, plain):  # the same history in both caches
        gen = torch.Generator().manual_seed(1)
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    got = attend(1, q, k, v, cos, sin, step_for(fused, first_row, positions, window), window)
    monkeypatch.setattr(cpu_ext, "kernel", lambda: None)
    expected = attend(1, q, k, v, cos, sin, step_for(plain, first_row, positions, window), window)
    assert got.shape == expected.shape == (b, 1, heads * D) and got.dtype == dtype
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(fused.k, plain.k, **tol)  # the rotated new K written, nothing else
    assert torch.equal(fused.v, plain.v)


def test_kernel_rejects_a_position_outside_the_cache():
    kernel = cpu_ext.kernel()
    if kernel is None:
        pytest.skip("no compiler for the CPU kernels here")
    cache = KVCache(1, 2, 2, 8, D, torch.float32)
    q, k, cos = torch.randn(1, 2, D), torch.randn(1, 2, D), torch.ones(1, D)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel.decode_attention_(q, k, k, cos, cos, cache.k[0], cache.v[0], torch.tensor([8]), 0, 0)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # rows past the cache
        kernel.decode_attention_(q, k, k, cos, cos, cache.k[0], cache.v[0], torch.tensor([1]), 2, 0)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # cos of the wrong width
        kernel.decode_attention_(q, k, k, cos[:, :4], cos[:, :4], cache.k[0], cache.v[0], torch.tensor([1]), 0, 0)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        kernel.decode_attention_(q, k, k, cos.double(), cos, cache.k[0], cache.v[0], torch.tensor([1]), 0, 0)
    assert not cache.k.any() and not cache.v.any()  # nothing half-written
