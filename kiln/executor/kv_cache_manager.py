"""KVCacheManager: per-slot block tables over a BlockPool, prefix reuse, fork and copy on write.

The block tables are rows of one persistent array ``block_table[max_batch_size, max_blocks_per_seq]``
indexed by slot. A row is only appended to (or one entry replaced by copy on write); every write is
recorded as ``(slot, index, block id)`` so the engine can mirror the table on the device.

Prefix reuse: a full block is keyed by a chained hash,
``blake2b(parent hash || token ids as int32 || blake2b(cache salt))``, with 32 zero bytes as the first
parent. Every input has the same length, so no two (parent, tokens, salt) triples share a byte string.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kiln.executor.block_pool import NULL_BLOCK, BlockPool

_HASH_BYTES = 32
ROOT_HASH = bytes(_HASH_BYTES)


def salt_digest(cache_salt: str | None) -> bytes:
    """Fixed-length digest of a request's cache salt (None and "" are the same, unsalted, cache)."""
    return hashlib.blake2b((cache_salt or "").encode(), digest_size=_HASH_BYTES).digest()


def block_hash(parent: bytes, token_ids: Sequence[int], salt: bytes) -> bytes:
    """Hash of one full block; a cryptographic hash, stable across processes (never Python's hash())."""
    return _hash_block_bytes(parent, np.asarray(token_ids, dtype="<i4").tobytes(), salt)


def _hash_block_bytes(parent: bytes, tokens: bytes, salt: bytes) -> bytes:
    """``block_hash`` of a block whose token ids are already little-endian int32 bytes."""
    h = hashlib.blake2b(parent, digest_size=_HASH_BYTES)
    h.update(tokens)
    h.update(salt)
    return h.digest()


@dataclass
class PrefixMatch:
    """The cached full blocks that start a token sequence (found by match_prefix, used by open_slot)."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    num_evictable: int = 0  # matched blocks that are unused now: taking them uses allocatable blocks
    num_queried_tokens: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        tokens_per_block: int,
        max_batch_size: int,
        max_blocks_per_seq: int,
        enable_block_reuse: bool = True,
        free_delay_steps: int = 0,
    ) -> None:
        if tokens_per_block < 1:
            raise ValueError(f"tokens_per_block must be >= 1, got {tokens_per_block}")
        if max_batch_size < 1 or max_blocks_per_seq < 1:
            raise ValueError(
                "max_batch_size and max_blocks_per_seq must be >= 1, "
                f"got {max_batch_size} and {max_blocks_per_seq}"
            )
        self.pool = BlockPool(num_blocks, free_delay_steps)
        self.block_size = tokens_per_block
        self.max_blocks_per_seq = max_blocks_per_seq
        self.enable_block_reuse = enable_block_reuse
        # row s lists the blocks of the sequence in slot s; entries past num_blocks_of[s] are NULL_BLOCK
        self.block_table = np.zeros((max_batch_size, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks_of = np.zeros(max_batch_size, dtype=np.int32)
        self._live = np.zeros(max_batch_size, dtype=bool)
        self._hashes: list[list[bytes]] = [[] for _ in range(max_batch_size)]  # hashes of full blocks
        self._salt: list[bytes] = [salt_digest(None)] * max_batch_size
        self._updates: list[tuple[int, int, int]] = []
        self._copies: list[tuple[int, int]] = []
        # full blocks to register, by slot: (its token ids, tokens computed); see cache_full_blocks
        self._unhashed: dict[int, tuple[Sequence[int], int]] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens served from it

    # ------------------------------------------------------------------ sizes and clock
    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (free plus evictable cached ones); pending ones are not counted."""
        return self.pool.num_allocatable

    @property
    def num_pending_blocks(self) -> int:
        return self.pool.num_pending

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_usable

    def begin_step(self, step: int) -> None:
        """A step is being scheduled: the last update's full blocks are hashed now, after its results
        went out (``cache_full_blocks``), and blocks freed long enough ago become allocatable."""
        self.hash_full_blocks()
        self.pool.advance(step)

    def take_updates(self) -> tuple[np.ndarray, np.ndarray]:
        """Block-table writes [U, 3] (slot, index, block) and copies [C, 2] (src, dst) since the last call."""
        updates = np.asarray(self._updates, dtype=np.int32).reshape(-1, 3)
        copies = np.asarray(self._copies, dtype=np.int32).reshape(-1, 2)
        self._updates, self._copies = [], []
        return updates, copies

    def blocks_of(self, slot: int) -> np.ndarray:
        return self.block_table[slot, : self.num_blocks_of[slot]]

    # ------------------------------------------------------------------ prefix reuse
    def match_prefix(self, token_ids: Sequence[int], cache_salt: str | None) -> PrefixMatch:
        """Longest chain of cached full blocks starting ``token_ids``; changes nothing.

        At most ``(len - 1) // block_size`` blocks match, so at least one token is left to compute.
        """
        if not self.enable_block_reuse:
            return PrefixMatch()
        self.hash_full_blocks()
        bs, salt = self.block_size, salt_digest(cache_salt)
        m = PrefixMatch(num_queried_tokens=len(token_ids))
        parent = ROOT_HASH
        for j in range((len(token_ids) - 1) // bs):
            h = block_hash(parent, token_ids[j * bs : (j + 1) * bs], salt)
            b = self.pool.lookup(h)
            if b is None:
                break
            m.block_ids.append(b)
            m.hashes.append(h)
            m.num_evictable += self.pool.is_evictable(b)
            parent = h
        return m

    def open_slot(self, slot: int, cache_salt: str | None, match: PrefixMatch | None = None) -> int:
        """Give ``slot`` to a new sequence, starting with the matched blocks; returns cached tokens."""
        assert not self._live[slot] and self.num_blocks_of[slot] == 0, f"slot {slot} is in use"
        self.hash_full_blocks()
        self._live[slot] = True
        self._salt[slot] = salt_digest(cache_salt)
        self._hashes[slot] = []
        if match is None:
            return 0
        for b, h in zip(match.block_ids, match.hashes, strict=True):
            assert self.pool.lookup(h) == b, "the prefix cache changed between match_prefix and open_slot"
            self.pool.acquire(b)
        self._append_many(slot, list(match.block_ids))
        self._hashes[slot].extend(match.hashes)
        self.prefix_queries += match.num_queried_tokens
        self.prefix_hits += match.num_blocks * self.block_size
        return match.num_blocks * self.block_size

    def cache_full_blocks(self, slot: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the blocks of ``slot`` that the first ``num_computed`` tokens fill completely.

        Lazily: hashed when the cache is next read or changed (``match_prefix``, ``open_slot``,
        ``fork``, ``free``) or the next step begins, so a step's results reach their callers before
        its prompt blocks are hashed (a 2,048-token prompt's 64 blocks: ~0.2 ms of host time before
        its first token). ``token_ids`` may grow meanwhile; only its first ``num_computed`` are read."""
        if not self.enable_block_reuse:
            return
        assert num_computed <= len(token_ids) and num_computed <= self.num_blocks_of[slot] * self.block_size
        self._unhashed[slot] = (token_ids, num_computed)

    def hash_full_blocks(self) -> None:
        """Register every full block that ``cache_full_blocks`` recorded."""
        if not self._unhashed:
            return
        unhashed, self._unhashed = self._unhashed, {}
        for slot, (token_ids, num_computed) in unhashed.items():
            self._register_full_blocks(slot, token_ids, num_computed)

    def _register_full_blocks(self, slot: int, token_ids: Sequence[int], num_computed: int) -> None:
        bs, hashes = self.block_size, self._hashes[slot]
        salt, row = self._salt[slot], self.block_table[slot]
        first, end = len(hashes), num_computed // bs
        if end <= first:
            return
        # one conversion for every new block (a prompt's first step fills dozens), then byte slices
        data = np.asarray(token_ids[first * bs : end * bs], dtype="<i4").tobytes()
        width = 4 * bs
        for j in range(first, end):
            parent = hashes[-1] if hashes else ROOT_HASH
            at = (j - first) * width
            h = _hash_block_bytes(parent, data[at : at + width], salt)
            hashes.append(h)
            self.pool.register(int(row[j]), h)

    # ------------------------------------------------------------------ growth
    def _cow_index(self, slot: int, num_computed: int) -> int | None:
        """Index of the held block the next write lands in, if it is shared (must be copied first)."""
        j = num_computed // self.block_size
        if j < self.num_blocks_of[slot] and self.pool.ref_count[self.block_table[slot, j]] > 1:
            return j
        return None

    def blocks_needed(self, slot: int, num_computed: int, new_total: int) -> int:
        """Blocks taken from the pool for ``slot`` to hold ``new_total`` tokens, writing from num_computed."""
        grow = max(0, -(-new_total // self.block_size) - int(self.num_blocks_of[slot]))
        return grow + (self._cow_index(slot, num_computed) is not None and new_total > num_computed)

    def max_new_tokens(self, slot: int, num_computed: int, limit: int) -> int:
        """The most tokens (<= limit) that ``slot`` can compute next with the blocks allocatable now."""
        avail = self.num_free_blocks - (self._cow_index(slot, num_computed) is not None)
        if avail < 0:
            return 0
        capacity = (int(self.num_blocks_of[slot]) + avail) * self.block_size
        capacity = min(capacity, self.max_blocks_per_seq * self.block_size)
        return max(0, min(limit, capacity - num_computed))

    def allocate(self, slot: int, num_computed: int, new_total: int) -> int:
        """Make ``slot`` hold ``new_total`` tokens before a step writes positions num_computed..new_total-1.

        Copies a shared block about to be written (copy on write). Returns the blocks taken from the pool.
        """
        assert self._live[slot], f"slot {slot} is not open"
        need = self.blocks_needed(slot, num_computed, new_total)
        if need == 0:  # the common decode step: room left in an unshared last block
            return 0
        if need > self.num_free_blocks:
            raise RuntimeError(f"slot {slot} needs {need} KV blocks, only {self.num_free_blocks} allocatable")
        if -(-new_total // self.block_size) > self.max_blocks_per_seq:
            raise RuntimeError(f"{new_total} tokens exceed max_blocks_per_seq={self.max_blocks_per_seq}")
        j = self._cow_index(slot, num_computed) if new_total > num_computed else None
        if j is not None:
            old = int(self.block_table[slot, j])
            new = self.pool.allocate()
            self._copies.append((old, new))
            self.block_table[slot, j] = new
            self._updates.append((slot, j, new))
            self.pool.release(old)  # still held by another row: ref_count was > 1
        more = -(-new_total // self.block_size) - int(self.num_blocks_of[slot])
        if more > 0:
            self._append_many(slot, self.pool.allocate_many(more))
        return need

    def _append_many(self, slot: int, blocks: list[int]) -> None:
        j, k = int(self.num_blocks_of[slot]), len(blocks)
        assert j + k <= self.max_blocks_per_seq, f"slot {slot} would pass {self.max_blocks_per_seq} blocks"
        self.block_table[slot, j : j + k] = blocks
        self.num_blocks_of[slot] = j + k
        self._updates.extend(zip(itertools.repeat(slot, k), range(j, j + k), blocks, strict=True))

    def fork(self, parent_slot: int, child_slot: int) -> None:
        """The child starts with the parent's blocks (shared; copied on the first write to a shared one)."""
        assert self._live[parent_slot]
        assert not self._live[child_slot] and self.num_blocks_of[child_slot] == 0, f"slot {child_slot} in use"
        self.hash_full_blocks()  # the child takes the parent's hashes
        self._live[child_slot] = True
        self._salt[child_slot] = self._salt[parent_slot]
        self._hashes[child_slot] = list(self._hashes[parent_slot])
        blocks = self.blocks_of(parent_slot).tolist()
        for b in blocks:
            self.pool.acquire(b)
        self._append_many(child_slot, blocks)

    def free(self, slot: int) -> int:
        """Release the slot's blocks, tail first (evicted first); returns how many became unused."""
        assert self._live[slot], f"slot {slot} is not open"
        self.hash_full_blocks()  # a released full block stays cached under its hash
        freed = 0
        for b in reversed(self.blocks_of(slot).tolist()):
            freed += self.pool.release(b)
        self.block_table[slot, :] = NULL_BLOCK
        self.num_blocks_of[slot] = 0
        self._hashes[slot] = []
        self._live[slot] = False
        return freed

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        refs = np.zeros(self.pool.num_blocks, dtype=np.int32)
        for s in range(self.block_table.shape[0]):
            n = int(self.num_blocks_of[s])
            row = self.block_table[s]
            assert self._live[s] or n == 0, f"free slot {s} holds blocks"
            assert np.all(row[n:] == NULL_BLOCK), f"slot {s} has blocks past its length"
            assert np.all(row[:n] != NULL_BLOCK), f"slot {s} references the null block"
            assert len(set(row[:n].tolist())) == n, f"slot {s} holds a block twice"
            assert len(self._hashes[s]) <= n, f"slot {s} has more hashes than blocks"
            for j, h in enumerate(self._hashes[s]):
                bh = self.pool.block_hash[row[j]]
                assert bh is None or bh == h, f"slot {s} block {j} holds another prefix than its hash chain"
            np.add.at(refs, row[:n], 1)
        self.pool.check_integrity(refs)
