"""KVCache writes and reads through block tables: exactly the new tokens land at their blocks and offsets,
nothing else changes, and a row reads back its positions in order."""
import pytest
import torch

from server.model.kv_cache import KVCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, t", [(4, 1), (16, 1), (4, 5), (1, 3)])
def test_write_and_read_touches_only_the_new_tokens(dtype, block_size, t):
    layers, hkv, d, b, s = 3, 2, 8, 3, 16
    width = -(-s // block_size)
    num_blocks = b * width + 1
    cache = KVCache(layers, 1, hkv, s, d, dtype, block_size=block_size, num_blocks=num_blocks)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    tables = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0))[:b * width] + 1).view(b, width)
    starts = torch.tensor([0, 7, 11 - t])[:, None]
    cache_pos = starts + torch.arange(t)  # [B, T]
    k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    keys, values = cache.write_and_read(1, tables, cache.flat_index(tables, cache_pos), k, v, kv_len=12)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for i in range(b):
        for j in range(t):
            p = int(cache_pos[i, j])
            expected_k[1, tables[i, p // block_size], :, p % block_size] = k[i, :, j].to(dtype)
            expected_v[1, tables[i, p // block_size], :, p % block_size] = v[i, :, j].to(dtype)
    assert torch.equal(cache.k, expected_k) and torch.equal(cache.v, expected_v)
    assert keys.shape == values.shape == (b, hkv, 12, d)
    for i in range(b):
        for p in range(12):
            assert torch.equal(keys[i, :, p], expected_k[1, tables[i, p // block_size], :, p % block_size])
            assert torch.equal(values[i, :, p], expected_v[1, tables[i, p // block_size], :, p % block_size])


def test_prefix_written_through_a_table_reads_back():
    cache = KVCache(2, 1, 2, 32, 4, torch.float32, block_size=4, num_blocks=10)
    table = torch.tensor([7, 2, 5])
    keys, values = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)
    cache.write_prefix(table, keys, values)
    k, v = cache.read_row(table, 10)
    assert torch.equal(k, keys) and torch.equal(v, values)
    assert not cache.k[:, [0, 1, 3, 4, 6, 8, 9]].any()  # no other block touched


def test_rows_of_a_pool_skip_the_null_block_and_stop_at_its_end():
    cache = KVCache(1, 8, 1, 8, 2, torch.float32, block_size=4, num_blocks=6)  # 5 usable: 2 rows of 2 blocks
    assert cache.max_rows == 2 and cache.row_tables.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="backs 2"):
        cache.tables_of_rows(slice(1, 3))
