"""Launch planning for paged attention: block sizes, grid and kv splits from shapes and int args.

A step is covered by at most two passes of the same tile kernel, split by each sequence's new-token
count: a *decode pass* with small query tiles (the group's heads fill the MMA rows) for sequences of
at most ``decode_tokens`` new tokens, and a *prefill pass* with large tiles for the rest. One tile
size for both would make every decode row pay a prefill tile's MMA work (measured on an H200: a
mixed step of 128 decode rows and a 1k chunk took ~3.5x its bound). Both passes and their grids
are fixed by shapes and int arguments, so a captured CUDA graph stays valid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import triton

from kiln.plugins.triton._common import max_shared_memory, next_pow2, num_sms

# Split-KV sizing (timed on an H200 with Llama-8B heads): aim for ~3 waves of programs; each split
# keeps at least this many keys, since shorter splits cost more in merging than they gain.
_SPLIT_TARGET_WAVES = 3
_MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64
# fp32 partials are [splits, T, Hq, D + 2]; splits shrink rather than let them pass this size.
_MAX_WORKSPACE_BYTES = 64 << 20
NO_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class AttentionPass:
    """One launch of the tile kernel over the sequences with q_len_lo < new tokens <= q_len_hi."""

    q_len_lo: int
    q_len_hi: int
    block_m: int
    block_n: int
    tokens_per_tile: int
    num_tiles: int  # grid axis 0
    use_search: bool  # map tiles to sequences by binary search (else tiles_per_seq per sequence)
    tiles_per_seq: int
    num_splits: int
    num_warps: int
    num_stages: int

    @property
    def variant(self) -> tuple[int | bool, ...]:
        """What Triton compiles a separate kernel for (the other fields are unspecialised ints)."""
        return (self.block_m, self.block_n, self.tokens_per_tile, self.use_search, self.num_splits > 1,
                self.num_warps, self.num_stages)  # fmt: skip


def plan_passes(
    num_tokens: int, num_seqs: int, num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
    max_query_len: int, max_seq_len: int, device: torch.device,
    *, num_splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
    decode_num_warps: int | None = None, decode_num_stages: int | None = None,
) -> tuple[AttentionPass, ...]:  # fmt: skip
    """The passes of one call. ``num_splits`` and ``block_n`` (both passes), ``block_m``, ``num_warps``
    and ``num_stages`` (prefill pass), ``decode_num_warps`` and ``decode_num_stages`` override the
    heuristics, for tests and tuning."""
    # Every layer of a step asks the same question: planned once per step shape, not per layer.
    return _plan(num_tokens, num_seqs, num_kv_heads, group, head_dim, dtype, max_query_len, max_seq_len,
                 num_sms(device), max_shared_memory(device), num_splits, block_m, block_n, num_warps,
                 num_stages, decode_num_warps, decode_num_stages)  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _plan(
    num_tokens: int, num_seqs: int, num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
    max_query_len: int, max_seq_len: int, sms: int, smem_bytes: int,
    num_splits: int | None, block_m: int | None, block_n: int | None,
    num_warps: int | None, num_stages: int | None,
    decode_num_warps: int | None, decode_num_stages: int | None,
) -> tuple[AttentionPass, ...]:  # fmt: skip
    block_d = next_pow2(head_dim)
    wide = block_d > 128 or dtype == torch.float32  # more bytes per row: smaller tiles fit on chip
    elem = torch.finfo(dtype).bits // 8
    workspace_per_split = num_tokens * group * num_kv_heads * (head_dim + 2) * 4
    split_cap = max(1, _MAX_WORKSPACE_BYTES // max(workspace_per_split, 1))

    def make(lo: int, hi: int, bm: int, bn: int, q_len_bound: int, warps: int, stages: int) -> AttentionPass:
        tokens_per_tile = bm // group
        tiles_per_seq = max(1, triton.cdiv(max(q_len_bound, 1), tokens_per_tile))
        static_tiles = num_seqs * tiles_per_seq
        search_tiles = num_tokens // tokens_per_tile + num_seqs
        use_search = search_tiles < static_tiles
        num_tiles = search_tiles if use_search else static_tiles
        splits = num_splits
        if splits is None:
            base = num_tiles * num_kv_heads
            splits = 1
            if base < sms:
                splits = min(triton.cdiv(_SPLIT_TARGET_WAVES * sms, base), max_seq_len // _MIN_KEYS_PER_SPLIT,
                             MAX_SPLITS, split_cap)  # fmt: skip
        return AttentionPass(lo, hi, bm, bn, tokens_per_tile, num_tiles, use_search, tiles_per_seq,
                             max(1, splits), warps, stages)  # fmt: skip

    decode_m = max(16, next_pow2(group))  # decode rows are the group's heads
    decode_tokens = decode_m // group
    decode_n = block_n or (32 if wide else 64)
    passes = [make(0, decode_tokens, decode_m, decode_n, min(max_query_len, decode_tokens),
                   decode_num_warps or 4, decode_num_stages or 2)]  # fmt: skip
    if max_query_len > decode_tokens:
        bm = max(block_m or (64 if wide else 128), 16, next_pow2(group))

        # Three K/V stages in flight plus the q tile, in the shared memory a block may use: 128-key tiles
        # where they fit (16-bit D=128 prefill on an H100: 1.04-1.10x the 64-key tiles,
        # scripts/bench_attention.py), else 64-key tiles.
        def smem(bn: int, stages: int) -> int:
            return (stages * 2 * bn + bm) * block_d * elem

        bn = block_n or (32 if wide else 128 if smem(128, 3) <= smem_bytes else 64)
        stages = num_stages or (3 if smem(bn, 3) <= smem_bytes else 2)
        warps = num_warps or (8 if bm >= 128 else 4)
        passes.append(make(decode_tokens, NO_LIMIT, bm, bn, max_query_len, warps, stages))
    return tuple(passes)


def step_variants(
    num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> Callable[[list[int], list[int]], set[Hashable]]:
    """For one model's attention: (num_computed, num_new) of a step -> the kernel variants it launches
    (each pass's ``variant``, and the merge's when a pass splits the keys: one for decode steps, whose
    sequences are one token each, one for the others)."""

    def variants_of(computed: list[int], new: list[int]) -> set[Hashable]:
        max_seq_len = max(c + n for c, n in zip(computed, new, strict=True))
        passes = plan_passes(sum(new), len(new), num_kv_heads, group, head_dim, dtype, max(new), max_seq_len,
                             device)  # fmt: skip
        split = any(p.num_splits > 1 for p in passes)
        return {p.variant for p in passes} | ({("merge", max(new) == 1)} if split else set())

    return variants_of
