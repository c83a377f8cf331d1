"""The paged KV cache's bookkeeping (pure Python, no torch): a pool of fixed-size blocks, reference counts,
and the prefix cache (nano-vllm / vLLM v1 style).

A block holds `block_size` consecutive cache positions of one request (K and V of every layer; the model's
pool is `server.model.kv_cache.KVCache`). Block 0 is the null block: never handed out, it is where the
padding tokens of a padded prefill write and what unused block-table entries point at.

Prefix caching: a *full* block is keyed by a chain hash of (the previous block's key, its token ids, the
identity of the weights that computed it, `salt`). Two requests whose cache positions 0..n hold the same
tokens under the same adapter version get the same keys, so the second reuses the first's blocks and
prefills only the rest. Virtual tokens (prefix / prompt / P-tuning adapters) are hashed as the marker
`VIRTUAL` (-1): their K/V are a function of the adapter version alone, which the salt carries.

A freed block whose key is registered stays cached: it goes to the end of an LRU of evictable blocks and is
reused as-is if a later request looks its key up; it is only overwritten (and its key dropped) when a fresh
block is needed and the free list is empty. `reset()` drops every key (weights changed under the cache,
e.g. an adapter merged into the base): blocks in use stay with their requests, but no new request finds them.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

VIRTUAL = -1  # the token id that stands for a virtual token in a block's key
NULL_BLOCK = 0


def block_keys(token_ids: list[int], block_size: int, salt: str, parent: bytes = b"", start: int = 0) -> list[bytes]:
    """The chain keys of the full blocks of `token_ids` from block index `start` (parent: the key of block
    start - 1, b"" for the first). A key is 16 bytes of blake2b over (parent, salt, the block's token ids)."""
    keys = []
    for i in range(start, len(token_ids) // block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(salt.encode())
        h.update(b"\0")
        h.update(array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


class NoFreeBlocks(RuntimeError):
    """allocate() asked for more blocks than are free or evictable."""


class BlockManager:
    """`num_blocks` blocks (block 0 the null block, so num_blocks - 1 usable) of `block_size` positions.

    A block is in exactly one of: the free list (ref 0, no key), the evictable LRU (ref 0, keyed), in use
    (ref >= 1, keyed or not)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}            # key -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref-0 keyed blocks, least recently freed first
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out 1, 2, ...

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take (free + evictable)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.usable - self.num_free

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` cache positions."""
        return -(-positions // self.block_size)

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest cached chain of `keys` (no reference taken)."""
        if not self.enable_caching:
            return []
        found = []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def take(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (from `lookup`)."""
        for block in blocks:
            if self.ref[block] == 0:
                del self.evictable[block]
            self.ref[block] += 1

    def can_allocate(self, n: int, hits: list[int] = ()) -> bool:
        """Whether `n` fresh blocks can be allocated after taking `hits` (evictable hits stop being evictable)."""
        return n <= self.num_free - sum(1 for b in hits if self.ref[b] == 0)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref 1, no key): from the free list, then by evicting the least recently freed."""
        if n > self.num_free:
            raise NoFreeBlocks(f"{n} blocks asked, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
            else:
                block, _ = self.evictable.popitem(last=False)
                del self.cached[self.key_of[block]]
                self.key_of[block] = None
            self.ref[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each; a block at 0 becomes evictable if keyed, else free. Released in
        reverse, so a request's later blocks are evicted before its earlier ones (a chain's head is shared
        the most)."""
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] < 0:
                raise AssertionError(f"block {block} released more often than taken")
            if self.ref[block] == 0:
                if self.key_of[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def register(self, block: int, key: bytes) -> None:
        """Key a full block that a request holds (its K/V computed). A key already cached on another block
        keeps that block (the duplicate stays unkeyed and is freed with its request)."""
        if not self.enable_caching or key in self.cached or self.key_of[block] is not None:
            return
        self.cached[key] = block
        self.key_of[block] = key

    def reset(self) -> None:
        """Forget every key: evictable blocks go to the free list, blocks in use stay in use, unkeyed."""
        for block in self.evictable:
            self.free.append(block)
        self.evictable.clear()
        for key, block in self.cached.items():
            self.key_of[block] = None
        self.cached.clear()
