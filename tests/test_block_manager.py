"""Block manager: allocation, reference counts, prefix caching and LRU eviction."""

from shoal.runtime.engine.block_manager import BlockManager
from shoal.runtime.engine.sequence import Sequence
from shoal.runtime.sampling_params import SamplingParams


def seq(tokens, rid="r"):
    return Sequence(rid, 0, list(tokens), SamplingParams())


def compute(bm, s, n):
    """What a step does: allocate, 'compute' n tokens, register full blocks."""
    bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def test_allocation_covers_tokens_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    assert bm.blocks_needed(s, 10) == 3
    compute(bm, s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.usage() == 3 / 8
    bm.free_sequence(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_shared_prefix_is_reused_and_refcounted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, a, 9)  # two full blocks cached
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43], "b")
    hit = bm.attach_cached_prefix(b)
    assert hit == 8
    assert b.block_table == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.count_prefix_lookup(b)
    assert bm.prefix_hits == 8 and bm.prefix_queries == 10


def test_whole_prompt_cached_still_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(8), "a")
    compute(bm, a, 8)
    b = seq(range(8), "b")
    assert bm.attach_cached_prefix(b) == 4  # last block recomputed, its last token sampled
    assert b.num_uncomputed_tokens == 4


def test_different_prefix_does_not_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, seq([1, 2, 3, 4, 5], "a"), 5)
    assert bm.attach_cached_prefix(seq([9, 2, 3, 4, 5], "b")) == 0


def test_freed_cached_blocks_survive_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")  # 2 full blocks + 1 partial
    compute(bm, a, 5)
    bm.free_sequence(a)
    # Still cached after free:
    assert bm.attach_cached_prefix(seq([1, 2, 3, 4, 9], "b")) == 4
    bm2 = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4], "a")
    compute(bm2, a, 4)
    bm2.free_sequence(a)
    c = seq([7, 7, 7, 7, 7, 7], "c")  # needs all 3 blocks: evicts the cached ones
    compute(bm2, c, 6)
    assert bm2.attach_cached_prefix(seq([1, 2, 3, 4, 5], "d")) == 0


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    compute(bm, seq(range(9), "a"), 9)
    assert bm.attach_cached_prefix(seq(range(9), "b")) == 0
