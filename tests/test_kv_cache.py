"""KVCache writes: exactly the new tokens land at their rows and positions, nothing else changes."""
import pytest
import torch

from server.model.kv_cache import KVCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first_row, t", [(0, 1), (2, 1), (1, 5)])
def test_write_and_read_touches_only_the_new_tokens(dtype, first_row, t):
    layers, rows, hkv, s, d, b = 3, 6, 2, 16, 8, 3
    cache = KVCache(layers, rows, hkv, s, d, dtype)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    starts = torch.tensor([0, 7, 11 - t])[:, None]
    cache_pos = starts + torch.arange(t)  # [B, T]
    k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    rows = slice(first_row, first_row + b)
    keys, values = cache.write_and_read(1, rows, cache.flat_index(rows, cache_pos), k, v, kv_len=12)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for i in range(b):
        for j in range(t):
            expected_k[1, first_row + i, :, cache_pos[i, j]] = k[i, :, j].to(dtype)
            expected_v[1, first_row + i, :, cache_pos[i, j]] = v[i, :, j].to(dtype)
    assert torch.equal(cache.k, expected_k) and torch.equal(cache.v, expected_v)
    assert keys.shape == (b, hkv, 12, d) and keys.data_ptr() == cache.k[1, first_row].data_ptr()  # a view
    assert torch.equal(values, expected_v[1, first_row:first_row + b, :, :12])
