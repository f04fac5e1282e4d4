"""KVCacheManager / BlockPool: allocation, prefix reuse, LRU eviction, fork + copy on write, free delay."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.executor.block_pool import NULL_BLOCK
from kiln.executor.kv_cache_manager import ROOT_HASH, KVCacheManager, block_hash, salt_digest

BS = 4


def make(num_blocks: int = 9, slots: int = 4, max_blocks: int = 8, **kw) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, max_batch_size=slots, max_blocks_per_seq=max_blocks, **kw)


def run_seq(kv: KVCacheManager, slot: int, tokens: list[int], salt: str | None = None) -> int:
    """Open a slot with its prefix match, compute all tokens, register the full blocks; returns cached."""
    cached = kv.open_slot(slot, salt, kv.match_prefix(tokens, salt))
    kv.check_integrity()
    kv.allocate(slot, cached, len(tokens))
    kv.check_integrity()
    kv.cache_full_blocks(slot, tokens, len(tokens))
    kv.check_integrity()
    return cached


def test_alloc_free_reports_updates_and_never_hands_out_the_null_block():
    kv = make()
    kv.open_slot(1, None)
    assert kv.allocate(1, 0, 10) == 3  # ceil(10 / 4)
    kv.check_integrity()
    updates, copies = kv.take_updates()
    row = kv.blocks_of(1).tolist()
    assert updates.tolist() == [[1, j, b] for j, b in enumerate(row)] and copies.shape == (0, 2)
    assert NULL_BLOCK not in row and kv.num_free_blocks == 8 - 3
    assert kv.allocate(1, 10, 12) == 0  # still inside the third block
    assert kv.allocate(1, 12, 13) == 1
    assert kv.take_updates()[0].tolist() == [[1, 3, int(kv.block_table[1, 3])]]
    kv.check_integrity()
    assert kv.free(1) == 4
    kv.check_integrity()
    assert kv.num_free_blocks == 8 and kv.usage == 0.0 and np.all(kv.block_table[1] == NULL_BLOCK)
    # every usable block can be handed out, block 0 never
    kv.open_slot(0, None)
    kv.allocate(0, 0, 8 * BS)
    assert sorted(kv.blocks_of(0).tolist()) == list(range(1, 9)) and kv.usage == 1.0
    assert kv.max_new_tokens(0, 8 * BS, 5) == 0
    with pytest.raises(RuntimeError, match="allocatable"):
        kv.open_slot(2, None)
        kv.allocate(2, 0, 1)


def test_max_new_tokens_counts_the_partial_block_and_the_free_pool():
    kv = make(num_blocks=4)  # 3 usable
    kv.open_slot(0, None)
    kv.allocate(0, 0, 5)  # 2 blocks, 3 free slots left in the second one
    assert kv.max_new_tokens(0, 5, 100) == 3 + 1 * BS
    assert kv.blocks_needed(0, 5, 8) == 0 and kv.blocks_needed(0, 5, 9) == 1


def test_block_hash_is_chained_blake2b_and_salted():
    salt = salt_digest("s")
    expected = hashlib.blake2b(
        ROOT_HASH + np.array([1, 2, 3, 4], "<i4").tobytes() + salt, digest_size=32
    ).digest()
    assert block_hash(ROOT_HASH, [1, 2, 3, 4], salt) == expected
    assert salt_digest(None) == salt_digest("") != salt
    unsalted = salt_digest(None)
    h1 = block_hash(ROOT_HASH, [1, 2, 3, 4], unsalted)
    assert block_hash(h1, [5, 6, 7, 8], unsalted) != block_hash(ROOT_HASH, [5, 6, 7, 8], unsalted)


def test_prefix_hits_and_counters_leave_one_token_to_compute():
    kv = make()
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    assert run_seq(kv, 0, prompt) == 0
    assert kv.prefix_queries == 13 and kv.prefix_hits == 0
    kv.free(0)
    kv.check_integrity()
    assert run_seq(kv, 1, prompt) == 12  # all three full blocks
    assert kv.prefix_queries == 26 and kv.prefix_hits == 12
    # exactly 12 tokens: only 2 blocks are reused so that the last token is computed
    assert run_seq(kv, 2, prompt[:12]) == 8
    # shared blocks are counted once per row holding them
    assert kv.pool.ref_count[kv.block_table[1, 0]] == 2
    # a different first block breaks the chain even if later blocks are equal
    other = [0] + prompt[1:]
    assert kv.match_prefix(other, None).num_blocks == 0
    kv.check_integrity()


def test_salt_separates_caches():
    kv = make()
    prompt = list(range(9))
    run_seq(kv, 0, prompt, salt="alice")
    kv.free(0)
    assert kv.match_prefix(prompt, "bob").num_blocks == 0
    assert kv.match_prefix(prompt, None).num_blocks == 0
    assert kv.match_prefix(prompt, "alice").num_blocks == 2
    assert run_seq(kv, 1, prompt, salt="alice") == 8
    kv.check_integrity()


def test_disabled_reuse_never_hashes_or_hits():
    kv = make(enable_block_reuse=False)
    prompt = list(range(9))
    run_seq(kv, 0, prompt)
    kv.free(0)
    assert run_seq(kv, 1, prompt) == 0
    assert kv.pool.cached == {} and kv.prefix_queries == 0 and kv.prefix_hits == 0


def test_lru_evicts_least_recently_released_tail_first():
    kv = make(num_blocks=7)  # 6 usable
    a, b, c = [list(range(s, s + 9)) for s in (100, 200, 300)]  # 2 full blocks + 1 partial each
    for slot, p in enumerate((a, b)):
        run_seq(kv, slot, p)
    a_blocks, b_blocks = kv.blocks_of(0)[:2].tolist(), kv.blocks_of(1)[:2].tolist()
    kv.free(0)  # a's full blocks go to the LRU first (its partial block to the free queue)
    kv.free(1)
    kv.check_integrity()
    assert list(kv.pool._lru) == a_blocks[::-1] + b_blocks[::-1]  # tail first within a sequence
    assert len(kv.pool.cached) == 4 and kv.num_free_blocks == 6
    # c needs 3 blocks: the 2 free ones, then a's tail block is evicted (its hash entry goes too)
    run_seq(kv, 2, c)
    assert kv.blocks_of(2)[2] == a_blocks[1] and kv.pool.block_hash[a_blocks[1]] is None
    assert kv.match_prefix(a, None).num_blocks == 1  # a's head block survives
    assert kv.match_prefix(b, None).num_blocks == 2
    kv.free(2)
    kv.check_integrity()


def test_lru_hit_makes_a_block_most_recent():
    kv = make(num_blocks=12, max_blocks=12)
    a, b = [list(range(s, s + 9)) for s in (100, 200)]
    run_seq(kv, 0, a)
    run_seq(kv, 1, b)
    a_blocks, b_blocks = kv.blocks_of(0)[:2].tolist(), kv.blocks_of(1)[:2].tolist()
    kv.free(0)
    kv.free(1)
    assert run_seq(kv, 0, a) == 8  # hits take a's blocks out of the LRU
    assert list(kv.pool._lru) == b_blocks[::-1]
    kv.free(0)
    assert list(kv.pool._lru) == b_blocks[::-1] + a_blocks[::-1]
    # once the free queue is empty, b's blocks (released longer ago) are evicted first
    kv.open_slot(2, None)
    kv.allocate(2, 0, (kv.num_free_blocks - 4 + 2) * BS)
    assert kv.match_prefix(b, None).num_blocks == 0 and kv.match_prefix(a, None).num_blocks == 2
    kv.check_integrity()


def test_fork_shares_blocks_and_copy_on_write():
    kv = make()
    prompt = list(range(6))  # one full block, one partial
    run_seq(kv, 0, prompt)
    kv.take_updates()
    kv.fork(0, 1)
    kv.check_integrity()
    shared = kv.blocks_of(0).tolist()
    assert kv.blocks_of(1).tolist() == shared and all(kv.pool.ref_count[b] == 2 for b in shared)
    assert kv.take_updates()[0].tolist() == [[1, j, b] for j, b in enumerate(shared)]
    # the child writes position 6 into the shared partial block: it gets a copy first
    assert kv.blocks_needed(1, 6, 7) == 1
    assert kv.allocate(1, 6, 7) == 1
    kv.check_integrity()
    updates, copies = kv.take_updates()
    new = int(kv.block_table[1, 1])
    assert copies.tolist() == [[shared[1], new]] and updates.tolist() == [[1, 1, new]]
    assert kv.block_table[1, 0] == shared[0] and kv.pool.ref_count[shared[0]] == 2
    assert kv.pool.ref_count[shared[1]] == 1
    # the parent is now the only holder of the old block: no copy
    assert kv.allocate(0, 6, 7) == 0 and kv.take_updates()[1].shape == (0, 2)
    kv.free(0)
    kv.free(1)
    kv.check_integrity()
    assert kv.num_free_blocks == 8


def test_fork_on_block_boundary_needs_no_copy():
    kv = make()
    run_seq(kv, 0, list(range(8)))
    kv.fork(0, 1)
    assert kv.blocks_needed(1, 8, 9) == 1 and kv.allocate(1, 8, 9) == 1
    assert kv.take_updates()[1].shape == (0, 2)
    kv.check_integrity()


def test_free_delay_steps():
    kv = make(num_blocks=5, free_delay_steps=1)
    kv.begin_step(1)
    kv.open_slot(0, None)
    kv.allocate(0, 0, 3 * BS)
    kv.free(0)  # freed at step 1
    kv.check_integrity()
    assert kv.num_free_blocks == 1 and kv.num_pending_blocks == 3
    kv.begin_step(2)
    kv.check_integrity()
    assert kv.num_free_blocks == 4 and kv.num_pending_blocks == 0


def test_pending_blocks_are_released_at_once_when_no_step_is_in_flight():
    kv = make(num_blocks=5, free_delay_steps=1)
    prompt = list(range(9))
    kv.begin_step(1)
    run_seq(kv, 0, prompt)
    kv.free(0)
    run_seq(kv, 1, prompt)  # hits the pending cached blocks: their queue entries go stale
    kv.free(1)
    assert kv.num_free_blocks == 0 and kv.num_pending_blocks == 4
    kv.pool.release_pending()
    kv.check_integrity()
    assert kv.num_free_blocks == 4 and kv.num_pending_blocks == 0
    assert run_seq(kv, 2, prompt) == 8  # still cached
    kv.begin_step(2)
    kv.check_integrity()


def test_pending_cached_block_can_be_hit_and_is_released_once():
    kv = make(num_blocks=5, free_delay_steps=2)
    prompt = list(range(9))
    kv.begin_step(1)
    run_seq(kv, 0, prompt)
    kv.free(0)
    kv.begin_step(2)
    assert kv.num_pending_blocks == 3
    assert run_seq(kv, 1, prompt) == 8  # reads the pending cached blocks
    assert kv.num_pending_blocks == 1
    kv.free(1)  # released again at step 2: ready at 4, not at 3
    kv.begin_step(3)
    kv.check_integrity()
    assert kv.num_free_blocks == 1
    kv.begin_step(4)
    kv.check_integrity()
    assert kv.num_free_blocks == 4


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_operations_keep_integrity(data):
    """Random opens / growth / forks / frees over a small pool never break an invariant or leak."""
    kv = make(num_blocks=10, slots=4, max_blocks=6, free_delay_steps=data.draw(st.integers(0, 1)))
    tokens: dict[int, list[int]] = {}
    computed: dict[int, int] = {}
    step = 0
    for _ in range(data.draw(st.integers(1, 30))):
        op = data.draw(st.sampled_from(["open", "grow", "fork", "free", "step"]))
        free_slots = [s for s in range(4) if s not in tokens]
        if op == "open" and free_slots:
            s = free_slots[0]
            toks = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=20))
            m = kv.match_prefix(toks, None)
            if len(toks) - m.num_blocks * BS > (kv.num_free_blocks - m.num_evictable) * BS:
                continue
            computed[s] = kv.open_slot(s, None, m)
            tokens[s] = toks
            kv.allocate(s, computed[s], len(toks))
            computed[s] = len(toks)
            kv.cache_full_blocks(s, toks, len(toks))
        elif op == "grow" and tokens:
            s = data.draw(st.sampled_from(sorted(tokens)))
            if len(tokens[s]) < 23 and kv.max_new_tokens(s, computed[s], 1) == 1:
                tokens[s].append(data.draw(st.integers(0, 2)))
                kv.allocate(s, computed[s], computed[s] + 1)
                computed[s] += 1
                kv.cache_full_blocks(s, tokens[s], computed[s])
        elif op == "fork" and tokens and free_slots:
            p = data.draw(st.sampled_from(sorted(tokens)))
            kv.fork(p, free_slots[0])
            tokens[free_slots[0]], computed[free_slots[0]] = list(tokens[p]), computed[p]
        elif op == "free" and tokens:
            s = data.draw(st.sampled_from(sorted(tokens)))
            kv.free(s)
            del tokens[s], computed[s]
        elif op == "step":
            step += 1
            kv.begin_step(step)
        kv.check_integrity()
    for s in list(tokens):
        kv.free(s)
    kv.begin_step(step + 2)
    kv.check_integrity()
    assert kv.num_free_blocks == 9 and kv.usage == 0.0


def test_full_blocks_are_hashed_lazily_before_the_cache_is_next_read_or_changed():
    """cache_full_blocks only records; the hashes (of the first num_computed tokens, however the list
    grows) appear at hash_full_blocks, or before match_prefix / open_slot / fork / free read the cache."""
    kv = make()
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    kv.open_slot(0, None)
    kv.allocate(0, 0, len(tokens))
    kv.cache_full_blocks(0, tokens, 8)  # two full blocks
    assert kv.pool.cached == {}  # recorded, not hashed yet
    tokens.append(10)  # a sampled token appended meanwhile: not part of the two blocks
    h0 = block_hash(ROOT_HASH, [1, 2, 3, 4], salt_digest(None))
    h1 = block_hash(h0, [5, 6, 7, 8], salt_digest(None))
    assert kv.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0], None).hashes == [h0, h1]  # hashed first
    assert kv.pool.cached == {h0: int(kv.block_table[0, 0]), h1: int(kv.block_table[0, 1])}
    kv.check_integrity()
    # a slot freed with its blocks still unhashed keeps them cached: a later prompt reuses them
    kv.open_slot(1, None)
    kv.allocate(1, 0, 8)
    kv.cache_full_blocks(1, [7, 7, 7, 7, 8, 8, 8, 8], 8)
    blocks = kv.blocks_of(1).tolist()
    kv.free(1)
    kv.check_integrity()
    match = kv.match_prefix([7, 7, 7, 7, 8, 8, 8, 8, 9], None)
    assert match.block_ids == blocks and match.num_evictable == 2
    # hash_full_blocks registers without a read; a second call has nothing left to do
    kv.allocate(0, 8, 12)
    kv.cache_full_blocks(0, tokens + [11, 12], 12)
    kv.hash_full_blocks()
    assert len(kv.pool.cached) == 5
    kv.hash_full_blocks()
    assert len(kv.pool.cached) == 5
    kv.check_integrity()


def test_allocate_many_takes_the_blocks_allocate_would_in_order():
    # A prompt's pages at once: free blocks first (FIFO), then cached ones least recently released
    # first (evicted: their hashes dropped), exactly as that many single allocations.
    from kiln.executor.block_pool import BlockPool

    def pool_with_cached_blocks() -> BlockPool:
        pool = BlockPool(9)
        held = [pool.allocate() for _ in range(6)]
        for i, b in enumerate(held[:3]):
            assert pool.register(b, bytes([i]))
        for b in (held[2], held[0], held[1], held[4]):  # three cached (LRU order 3, 1, 2), one free
            pool.release(b)
        return pool

    one_by_one, at_once = pool_with_cached_blocks(), pool_with_cached_blocks()
    expected = [one_by_one.allocate() for _ in range(5)]  # free 7, 8, 5, then cached 3, 1
    assert at_once.allocate_many(5) == expected == [7, 8, 5, 3, 1]
    assert at_once.cached == one_by_one.cached == {bytes([1]): 2}
    assert np.array_equal(at_once.ref_count, one_by_one.ref_count) and at_once.num_used == one_by_one.num_used
    with pytest.raises(RuntimeError, match="out of blocks"):
        at_once.allocate_many(at_once.num_allocatable + 1)
