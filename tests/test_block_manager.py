"""The block pool and prefix cache (pure Python): allocation, reference counts, LRU eviction, chain keys."""
import pytest

from server.engine.block_manager import VIRTUAL, BlockManager, NoFreeBlocks, block_keys


def test_allocation_counts_and_the_null_block():
    bm = BlockManager(num_blocks=5, block_size=4)
    assert bm.usable == 4 and bm.num_free == 4
    blocks = bm.allocate(3)
    assert blocks == [1, 2, 3] and 0 not in blocks and bm.num_used == 3
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2)
    bm.release(blocks)
    assert bm.num_free == 4 and bm.num_used == 0


@pytest.mark.parametrize("num_blocks, block_size", [(1, 16), (4, 0)])
def test_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


@pytest.mark.parametrize("tokens, size, salt, other_tokens, other_salt, shared", [
    (list(range(10)), 4, "a@1", list(range(10)), "a@1", 2),                 # same: both full blocks
    (list(range(10)), 4, "a@1", list(range(10)), "a@2", 0),                 # a new adapter version: none
    (list(range(10)), 4, "a@1", list(range(10)), "", 0),                    # the base vs an adapter: none
    (list(range(10)), 4, "a@1", [0, 1, 2, 3, 9, 5, 6, 7], "a@1", 1),        # differs in block 1
    (list(range(10)), 4, "a@1", [9, 1, 2, 3, 4, 5, 6, 7], "a@1", 0),        # differs in block 0: the chain breaks
    ([VIRTUAL] * 4 + [1, 2, 3, 4], 4, "p@1", [1, 2, 3, 4] * 2, "p@1", 0),   # virtual tokens are not token ids
])
def test_chain_keys(tokens, size, salt, other_tokens, other_salt, shared):
    a, b = block_keys(tokens, size, salt), block_keys(other_tokens, size, other_salt)
    assert len(a) == len(tokens) // size
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common == shared


def test_keys_continue_a_chain():
    tokens = list(range(20))
    whole = block_keys(tokens, 4, "s")
    assert block_keys(tokens, 4, "s", parent=whole[1], start=2) == whole[2:]


def test_lookup_take_and_evict_lru():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    keys = block_keys([1, 2, 3, 4, 5, 6], 2, "")
    blocks = bm.allocate(3)
    for block, key in zip(blocks, keys):
        bm.register(block, key)
    assert bm.lookup(keys) == blocks
    bm.release(blocks)                    # all cached, evictable; released in reverse: block 3 first
    assert bm.num_free == 3 and bm.lookup(keys) == blocks
    hit = bm.lookup(keys[:2])
    bm.take(hit)
    assert bm.num_free == 1 and not bm.can_allocate(2) and bm.can_allocate(1)
    (fresh,) = bm.allocate(1)             # evicts the only evictable one: the chain's tail
    assert fresh == blocks[2] and bm.lookup(keys) == blocks[:2]
    bm.release([fresh])                   # unkeyed: straight to the free list
    assert bm.num_free == 1 and bm.lookup(keys) == blocks[:2]


def test_can_allocate_counts_evictable_hits():
    bm = BlockManager(num_blocks=3, block_size=2)
    keys = block_keys([1, 2], 2, "")
    (block,) = bm.allocate(1)
    bm.register(block, keys[0])
    bm.release([block])
    assert bm.can_allocate(2) and not bm.can_allocate(2, hits=[block]) and bm.can_allocate(1, hits=[block])


def test_shared_block_is_freed_once_both_release():
    bm = BlockManager(num_blocks=3, block_size=2)
    key = block_keys([7, 8], 2, "")[0]
    (block,) = bm.allocate(1)
    bm.register(block, key)
    bm.take(bm.lookup([key]))
    bm.release([block])
    assert bm.ref[block] == 1 and block not in bm.evictable
    bm.release([block])
    assert block in bm.evictable
    with pytest.raises(AssertionError):
        bm.release([block])


def test_duplicate_key_keeps_the_first_block():
    bm = BlockManager(num_blocks=4, block_size=2)
    key = block_keys([7, 8], 2, "")[0]
    first, second = bm.allocate(2)
    bm.register(first, key)
    bm.register(second, key)
    assert bm.lookup([key]) == [first] and bm.key_of[second] is None
    bm.release([second])
    assert second in bm.free


def test_reset_forgets_every_key():
    bm = BlockManager(num_blocks=4, block_size=2)
    keys = block_keys([1, 2, 3, 4], 2, "")
    held, freed = bm.allocate(2)
    bm.register(held, keys[0])
    bm.register(freed, keys[1])
    bm.release([freed])
    bm.reset()
    assert bm.lookup(keys) == [] and freed in bm.free and bm.num_free == 2
    bm.release([held])
    assert held in bm.free and bm.num_free == 3


def test_caching_off_finds_nothing():
    bm = BlockManager(num_blocks=3, block_size=2, enable_caching=False)
    key = block_keys([1, 2], 2, "")[0]
    (block,) = bm.allocate(1)
    bm.register(block, key)
    bm.release([block])
    assert bm.lookup([key]) == [] and block in bm.free
