"""The KV cache: one pool of fixed-size blocks that every request's block table points into (paged KV).

Layout: k, v [layers, num_blocks, Hkv, block_size, D]. A request's cache position p lives in block
table[p // block_size] at offset p % block_size (K/V of prefix-tuning virtual tokens first, then prompt
and generated tokens). The engine's tables come from `server.engine.block_manager` (block 0 is its null
block: padding tokens write there and unused table entries point at it).

Per-head blocks keep a head's block_size positions contiguous (block_size * D elements: 2 KiB at D = 64,
bf16, 16 positions), so a decode task streams whole blocks, and a prefill reads a row's context with one
gather (`write_and_read`).

Rows (the offline API that tests, golden checks and benchmarks use: `KVCache(layers, rows, Hkv, S, D)`,
`StepInputs(cache, rows, ...)`): row r owns a fixed table of ceil(S / block_size) blocks (`row_tables`).
A pool built for the engine (`num_blocks` given) lends those blocks to rows only while nothing else uses
the pool (block 0 excepted).
"""
from __future__ import annotations

import torch

DEFAULT_BLOCK_SIZE = 16


class KVCache:
    def __init__(self, num_layers: int, max_rows: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", block_size: int = DEFAULT_BLOCK_SIZE,
                 num_blocks: int | None = None):
        """num_blocks None: exactly max_rows rows of max_seq_len positions. Else a pool of num_blocks blocks
        (block 0 the null block) whose first blocks back as many rows as fit."""
        per_row = -(-max_seq_len // block_size)
        if num_blocks is None:
            num_blocks, first = max_rows * per_row, 0
        else:
            first = 1
            max_rows = min(max_rows, (num_blocks - 1) // per_row)
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # each layer's [num_blocks, Hkv, bs, D] view, made once: `k[layer]` is 2 aten calls (select, as_strided),
        # 120 per decoded token on the default model's 30 layers
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_rows = max_rows
        self.max_seq_len = max_seq_len
        self.row_tables = (first + torch.arange(max_rows * per_row, device=device)).view(max_rows, per_row)

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        """K and V of one block in every layer."""
        return 2 * num_layers * num_kv_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def tables_of_rows(self, rows: slice) -> torch.Tensor:
        if rows.stop > self.max_rows:
            raise ValueError(f"rows up to {rows.stop} asked, the pool backs {self.max_rows}")
        return self.row_tables[rows]

    def flat_index(self, tables: torch.Tensor, cache_pos: torch.Tensor) -> torch.Tensor:
        """[B*Hkv*T] index into a layer viewed as [num_blocks*Hkv*block_size, D] of the new tokens at
        cache_pos [B, T] of the rows with block tables [B, M], in k's [B, Hkv, T] order. The same for every
        layer, so a forward computes it once (StepInputs)."""
        heads, size = self.k.shape[2], self.block_size
        block = tables.gather(1, cache_pos // size)  # [B, T]
        head = torch.arange(heads, device=cache_pos.device)
        return ((block[:, None, :] * heads + head[None, :, None]) * size + (cache_pos % size)[:, None, :]).reshape(-1)

    def write_and_read(self, layer: int, tables: torch.Tensor, index: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k, v [B, Hkv, T, D] at `index` (`flat_index` of their cache positions); return the rows'
        keys and values [B, Hkv, L, D] at positions 0..kv_len-1, gathered through their tables [B, M].

        The write copies only the B*Hkv*T new D-vectors (`index_copy_` into the layer viewed as
        [blocks*Hkv*block_size, D]): O(new tokens) whatever the pool's size (measured on the contiguous cache
        before paging, fp32, B=32, Hkv=12, D=64, 1 thread: 0.04 ms per call; an advanced-index assignment
        0.11 ms; `scatter_` along a strided dim 10-112 ms). The read copies the rows' first
        ceil(L / block_size) blocks (prefill and the torch decode path; the CPU decode kernel reads the
        blocks in place).
        """
        d = k.shape[-1]
        k_layer, v_layer = self.k[layer], self.v[layer]  # [N, Hkv, bs, D], contiguous
        k_layer.view(-1, d).index_copy_(0, index, k.to(k_layer.dtype).reshape(-1, d))
        v_layer.view(-1, d).index_copy_(0, index, v.to(v_layer.dtype).reshape(-1, d))
        return self.gather(k_layer, tables, kv_len), self.gather(v_layer, tables, kv_len)

    def gather(self, layer_pool: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
        """[N, Hkv, bs, D] read through tables [B, M] -> [B, Hkv, length, D]."""
        b, m = tables.shape[0], -(-length // self.block_size)
        blocks = layer_pool[tables[:, :m]]  # [B, m, Hkv, bs, D]
        heads, d = blocks.shape[2], blocks.shape[4]
        return blocks.transpose(1, 2).reshape(b, heads, m * self.block_size, d)[:, :, :length]

    def write_prefix(self, table: int | torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write prefix K/V [layers, Hkv, P, D] at positions 0..P-1 of a row (its index, or its block table [M])."""
        if isinstance(table, int):
            table = self.tables_of_rows(slice(table, table + 1))[0]
        p = keys.shape[2]
        pos = torch.arange(p, device=table.device)
        block, offset = table[pos // self.block_size], pos % self.block_size
        # k[:, block, :, offset] is [P, layers, Hkv, D] (the two index tensors are split by a slice)
        self.k[:, block, :, offset] = keys.permute(2, 0, 1, 3).to(self.k.dtype)
        self.v[:, block, :, offset] = values.permute(2, 0, 1, 3).to(self.v.dtype)

    def read_row(self, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [layers, Hkv, length, D] of one row's positions 0..length-1 (table [M])."""
        k = torch.stack([self.gather(self.k[i], table[None], length)[0] for i in range(self.k.shape[0])])
        v = torch.stack([self.gather(self.v[i], table[None], length)[0] for i in range(self.v.shape[0])])
        return k, v
