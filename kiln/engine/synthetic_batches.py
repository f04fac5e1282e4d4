"""Steps made up at start-up, before any request: the KV-sizing step and the warm-up steps.

The engine runs them so that first-use work (Triton variants of the attention kernels, allocator
growth, torch.compile specialisations) happens during start-up, never in a user's first real step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable

import numpy as np

from kiln.config import EngineLimits
from kiln.executor.messages import ScheduledBatch

Shape = tuple[list[int], list[int]]  # (tokens already computed, new tokens) of each sequence


def synthetic_batch(
    num_computed: list[int], num_new: list[int], tokens_per_block: int
) -> tuple[ScheduledBatch, int]:
    """A step over fresh sequences in slots 0.. : sequence i has ``num_computed[i]`` tokens cached
    (garbage KV: only the shapes matter) and computes ``num_new[i]``; every sequence samples.
    Sequences with one new token and a cached prefix come first, as the generation rows.
    Returns the batch and the KV blocks it addresses (ids 1..n; 0 is the null block), plus one."""
    computed = np.asarray(num_computed, dtype=np.int64)
    new = np.asarray(num_new, dtype=np.int64)
    if computed.shape != new.shape or len(new) == 0 or (new < 1).any() or (computed < 0).any():
        raise ValueError(f"bad synthetic step: computed {num_computed}, new {num_new}")
    is_decode = (new == 1) & (computed > 0)
    order = np.argsort(~is_decode, kind="stable")  # generation rows first
    computed, new = computed[order], new[order]
    num_seqs = len(new)
    lens = computed + new
    blocks_per_seq = -(-lens // tokens_per_block)
    first_block = 1 + np.concatenate(([0], np.cumsum(blocks_per_seq)[:-1]))
    seq_of_block = np.repeat(np.arange(num_seqs), blocks_per_seq)
    index_in_seq = np.arange(int(blocks_per_seq.sum())) - np.repeat(first_block - 1, blocks_per_seq)
    block_ids = np.arange(1, int(blocks_per_seq.sum()) + 1)
    rows = np.arange(num_seqs, dtype=np.int32)
    batch = ScheduledBatch(
        step_id=-1,
        seq_ids=rows,
        slots=rows,
        num_computed=computed.astype(np.int32),
        num_new_tokens=new.astype(np.int32),
        num_decode=int(is_decode.sum()),
        input_ids=np.zeros(int(new.sum()), np.int32),
        block_updates=np.stack([seq_of_block, index_in_seq, block_ids], axis=1).astype(np.int32),
        copy_blocks=np.zeros((0, 2), np.int32),
        sample_rows=rows,
        sample_slots=rows,
        sample_seq_ids=rows,
        sample_positions=lens.astype(np.int32),
        sample_num_output=np.zeros(num_seqs, np.int32),
    )
    return batch, int(blocks_per_seq.sum()) + 1


def profile_batch(limits: EngineLimits, tokens_per_block: int) -> tuple[ScheduledBatch, int]:
    """The largest step the engine can be asked to run: max_num_tokens tokens of fresh context chunks
    over as many sequences as fit (each <= max_seq_len), every one of them sampling."""
    total = limits.max_num_tokens
    num_seqs = min(limits.max_batch_size, total)
    total = min(total, num_seqs * limits.max_seq_len)
    lens = np.full(num_seqs, total // num_seqs, dtype=np.int64)
    lens[: total % num_seqs] += 1
    return synthetic_batch([0] * num_seqs, lens.tolist(), tokens_per_block)


def warm_up_shapes(limits: EngineLimits) -> list[Shape]:
    """(num_computed, num_new) of the mixed steps run at start-up: the kinds of step in-flight batching
    makes, at the largest token budget. Each picks its own attention passes (decode rows alone or
    split over the KV length, prefill tiles mapped statically or by search), so together they compile
    the kernel variants that real traffic reaches."""
    budget, max_seqs, max_len = limits.max_num_tokens, limits.max_batch_size, limits.max_seq_len
    shapes: list[Shape] = []
    ctx = min(256, max_len - 1)
    # many generation rows beside many equal context chunks (a wave of new requests joining)
    decode = max(1, min(max_seqs // 4, budget // 4))
    chunks = max(1, min(max_seqs - decode, 64))
    per_chunk = max(1, min((budget - decode) // chunks, max_len))
    if ctx > 0 and decode + chunks <= max_seqs and decode + chunks * per_chunk <= budget:
        shapes.append(([ctx] * decode + [0] * chunks, [1] * decode + [per_chunk] * chunks))
    # one long prompt beside a generation row, and one chunk of a long prompt after its cached prefix
    long_chunk = min(budget - 1, max_len)
    if ctx > 0 and max_seqs >= 2 and long_chunk >= 1:
        shapes.append(([ctx, 0], [1, long_chunk]))
    tail = min(budget, max_len // 2)
    prefix = min(max_len - tail, 4 * budget)  # long enough to be a long prompt, cheap at start-up
    if tail >= 1 and prefix > 0:
        shapes.append(([prefix], [tail]))
    # unequal chunks: a short one next to long ones
    if max_seqs >= 3 and budget >= 3:
        short = min(max_len, 1 + min(15, budget // 8))
        long_each = min(max_len, max(1, (budget - short) // 2))
        shapes.append(([0, 0, 0], [short, long_each, long_each]))
    return shapes


def covering_shapes(
    limits: EngineLimits, variants_of: Callable[[list[int], list[int]], set[Hashable]], base: list[Shape]
) -> list[Shape]:
    """Small steps that reach kernel variants ``base`` does not, so each compiles at start-up.

    ``variants_of(num_computed, num_new)`` names the variants a step launches (e.g. the attention
    passes' constexprs). Full-budget steps never reach some of them: a lone short prompt, say, whose
    few tiles make the kernel split the keys. Candidates are small and cheap; each kept one adds at
    least one variant, in a fixed order, so start-up stays deterministic."""
    budget, max_seqs, max_len = limits.max_num_tokens, limits.max_batch_size, limits.max_seq_len
    seen: set[Hashable] = set()
    for computed, new in base:
        seen |= variants_of(computed, new)
    chosen: list[Shape] = []
    counts = sorted({s for s in (1, 2, 3, 4, 8, 16, 32, 64, 128) if s <= max_seqs})
    for num_seqs in counts:
        for decode in sorted({0, 1, num_seqs - 1, num_seqs}):
            chunks = num_seqs - decode
            # fixed lengths, and the chunks that fill the budget (a small budget fits none of the others)
            fill = (budget - decode) // chunks if chunks else 0
            for chunk_len in sorted({8, 100, 1000, 4000, fill} - {0}):
                # the longest context too: an engine of short sequences splits only its longest keys
                for ctx, prefix in itertools.product(sorted({64, 1000, 4000, max_len - 1}), (False, True)):
                    # prefix: the chunks continue a cached prefix of ctx tokens (a prefix-cache hit)
                    start = ctx if prefix else 0
                    if chunks and chunk_len * chunks + decode > budget:
                        continue
                    if max(ctx + 1, start + chunk_len) > max_len or (prefix and not chunks):
                        continue
                    computed = [ctx] * decode + [start] * chunks
                    new = [1] * decode + [chunk_len] * chunks
                    fresh = variants_of(computed, new) - seen
                    if fresh:
                        seen |= fresh
                        chosen.append((computed, new))
    return chosen
