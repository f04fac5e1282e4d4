"""BlockPool: the KV cache blocks, their reference counts, and which of them can be handed out.

Every block except the reserved null block 0 is in exactly one of four states:

- used:    ref_count > 0 (held by one or more block-table rows);
- free:    ref_count == 0, no prefix hash, allocatable now (``_free``, FIFO);
- cached:  ref_count == 0, holds a full block registered in the prefix cache, allocatable now by
           evicting it (``_lru``, least recently released first);
- pending: ref_count == 0, released less than ``free_delay_steps`` steps ago; not allocatable yet
           (a step still in flight may write into it), though a cached one may be hit (read-only).

Prefix hashes live in ``cached``: hash -> block id, for used and unused blocks alike. Evicting a block
removes its entry. This class knows nothing of sequences; KVCacheManager owns the block tables.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np

NULL_BLOCK = 0  # never allocated: padded rows of the block table point at it


class BlockPool:
    def __init__(self, num_blocks: int, free_delay_steps: int = 0) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}"
            )
        if free_delay_steps < 0:
            raise ValueError(f"free_delay_steps must be >= 0, got {free_delay_steps}")
        self.num_blocks = num_blocks
        self.free_delay_steps = free_delay_steps
        self.ref_count = np.zeros(num_blocks, dtype=np.int32)  # [num_blocks]
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # prefix hash -> block id
        self._free: deque[int] = deque(range(1, num_blocks))  # ref 0, unhashed
        self._lru: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest release first
        self._pending: deque[tuple[int, int]] = deque()  # (ready step, block); ready steps never decrease
        self._pending_ready: dict[int, int] = {}  # block -> its ready step; entries not here are stale
        self.step = 0
        self.num_used = 0

    # ------------------------------------------------------------------ sizes
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_allocatable(self) -> int:
        """Blocks an allocation can take now: free ones, then cached ones by eviction."""
        return len(self._free) + len(self._lru)

    @property
    def num_pending(self) -> int:
        return len(self._pending_ready)

    # ------------------------------------------------------------------ clock
    def advance(self, step: int) -> None:
        """Set the current step; blocks whose delay ran out become allocatable."""
        assert step >= self.step, f"steps go forward: {step} < {self.step}"
        self.step = step
        self._release_pending(step)

    def release_pending(self) -> None:
        """No step is in flight any more, so none can write a pending block: all become allocatable now
        (an engine gone idle would otherwise keep them until its next step)."""
        self._release_pending(None)

    def _release_pending(self, step: int | None) -> None:
        while self._pending and (step is None or self._pending[0][0] <= step):
            ready, b = self._pending.popleft()
            if self._pending_ready.get(b) != ready:
                continue  # stale: the block was hit while pending (and maybe released again since)
            del self._pending_ready[b]
            self._make_allocatable(b)

    # ------------------------------------------------------------------ references
    def allocate(self) -> int:
        """A block with ref_count 1: a free one, else the least recently released cached one."""
        return self.allocate_many(1)[0]

    def allocate_many(self, n: int) -> list[int]:
        """``n`` blocks, each as ``allocate`` would give it, in the same order (a prompt's pages at once:
        one reference-count write, not one a block)."""
        if n > self.num_allocatable:
            raise RuntimeError(
                f"KV cache out of blocks: {n} asked, {self.num_allocatable} allocatable (callers must check "
                "num_allocatable first)"
            )
        free = self._free
        blocks = [free.popleft() for _ in range(min(n, len(free)))]
        while len(blocks) < n:
            b, _ = self._lru.popitem(last=False)
            self._drop_hash(b)
            blocks.append(b)
        self.ref_count[blocks] = 1
        self.num_used += n
        return blocks

    def is_evictable(self, b: int) -> bool:
        """True if taking a reference to ``b`` removes it from the allocatable blocks."""
        return b in self._lru

    def acquire(self, b: int) -> None:
        """One more reference to an existing block (a prefix hit or a fork)."""
        assert b != NULL_BLOCK
        if self.ref_count[b] == 0:
            if b in self._lru:
                del self._lru[b]
            else:
                # only a cached block can be found while unused; if pending, its queue entry goes stale
                assert b in self._pending_ready and self.block_hash[b] is not None, f"block {b} is not cached"
                del self._pending_ready[b]
            self.num_used += 1
        self.ref_count[b] += 1

    def release(self, b: int) -> bool:
        """Drop one reference; returns True if the block became unused."""
        assert b != NULL_BLOCK and self.ref_count[b] > 0, f"release of unreferenced block {b}"
        self.ref_count[b] -= 1
        if self.ref_count[b] > 0:
            return False
        self.num_used -= 1
        if self.free_delay_steps:
            ready = self.step + self.free_delay_steps
            self._pending.append((ready, b))
            self._pending_ready[b] = ready
        else:
            self._make_allocatable(b)
        return True

    def _make_allocatable(self, b: int) -> None:
        if self.block_hash[b] is not None:
            self._lru[b] = None  # most recently released: evicted last
        else:
            self._free.append(b)

    # ------------------------------------------------------------------ prefix hashes
    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def register(self, b: int, h: bytes) -> bool:
        """Make used block ``b`` the cached block of hash ``h``; False if another block already is."""
        assert self.ref_count[b] > 0, f"only a used block can be registered, block {b} is unused"
        if self.block_hash[b] is not None:
            assert self.block_hash[b] == h, f"block {b} already holds a different prefix"
            return True
        if h in self.cached:
            return False  # the same content was computed twice; this copy stays unhashed
        self.block_hash[b] = h
        self.cached[h] = b
        return True

    def _drop_hash(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            del self.cached[h]
            self.block_hash[b] = None

    # ------------------------------------------------------------------ checks
    def check_integrity(self, expected_refs: np.ndarray) -> None:
        """Assert every invariant; ``expected_refs[b]`` counts the live table rows holding block b."""
        n = self.num_blocks
        assert np.array_equal(self.ref_count, expected_refs), (
            f"ref counts differ from the block tables at blocks "
            f"{np.nonzero(self.ref_count != expected_refs)[0].tolist()}"
        )
        assert self.ref_count[NULL_BLOCK] == 0 and self.block_hash[NULL_BLOCK] is None
        free, lru, pending = set(self._free), set(self._lru), set(self._pending_ready)
        used = set(np.nonzero(self.ref_count > 0)[0].tolist())
        assert len(free) == len(self._free), "a block is twice in the free queue"
        assert self.num_used == len(used)
        parts = [free, lru, pending, used]
        assert sum(len(p) for p in parts) == n - 1 and set().union(*parts) == set(range(1, n)), (
            "free, cached, pending and used blocks must partition blocks 1..num_blocks-1"
        )
        assert all(self.block_hash[b] is None for b in free), "a free block still has a prefix hash"
        assert all(self.block_hash[b] is not None for b in lru), "an LRU block has no prefix hash"
        queued = set(self._pending)
        assert all((r, b) in queued for b, r in self._pending_ready.items()), "pending block lost its entry"
        assert all(r > self.step for r in self._pending_ready.values()), "a ready block is still pending"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"hash map points at block {b} which holds another hash"
        assert sum(h is not None for h in self.block_hash) == len(self.cached), "unmapped block hash"
