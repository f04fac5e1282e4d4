"""Per-step attention metadata: built by the ModelEngine, passed explicitly to the model's forward."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# A context chunk of c tokens after a cached prefix of p is plain causal attention over the p + c rows
# once the prefix rows stand in as queries whose outputs are dropped: (p + c)^2 / 2 of work against the
# c * p + c^2 / 2 needed, at most 1.45x for p <= 1.25 c, which cuDNN's ~1.9x speed over the paged
# kernel on long prompts (benchmarks/NOTES.md) more than repays. Longer prefixes stay on the paged kernel.
MAX_PREFIX_RATIO = 1.25


@dataclass(frozen=True)
class FreshPrompts:
    """Host facts about the step's trailing run of *fresh* sequences: context chunks with nothing
    cached before them, or a short prefix (at most ``MAX_PREFIX_RATIO`` times the chunk, and prefix
    plus chunk no more than the step's tokens), i.e. plain causal attention over the prefix and the
    chunk. An attention plugin may hand those to another kernel (``paged_attention_sdpa`` does), and
    the leading sequences ``[0, first_seq)`` to the paged kernel with the bounds given here."""

    first_seq: int
    starts: tuple[int, ...]  # each fresh sequence's first packed token
    lengths: tuple[int, ...]  # and its token count
    rest_max_query_len: int  # max_query_len / max_seq_len of the leading sequences (0 if none)
    rest_max_seq_len: int
    # each fresh sequence's first KV block when its pages are the ids b, b+1, ... in order, else -1
    # (its K/V then lie in the cache as one run of rows); () when the step did not say
    first_blocks: tuple[int, ...] = ()
    prefixes: tuple[int, ...] = ()  # each fresh sequence's cached tokens before its chunk; (): none

    def prefix(self, i: int) -> int:
        return self.prefixes[i] if self.prefixes else 0

    @staticmethod
    def of_step(
        num_computed: np.ndarray,
        num_new: np.ndarray,
        num_decode: int,
        slots: np.ndarray | None = None,
        block_updates: np.ndarray | None = None,
        tokens_per_block: int = 0,
    ) -> FreshPrompts | None:
        """The trailing fresh run of a step's sequences (decode rows are never part of it), or None.
        With the step's ``slots`` and ``block_updates`` ([k, 3]: slot | block index | block id, the
        blocks given this step: a sequence with nothing cached has every block among them) it also
        finds each fresh sequence's ``first_blocks``."""
        # a short prefix: chunks of 2+ tokens (never a decode row, whatever num_decode says), prefix +
        # chunk within the step's token count (SDPA's shapes stay those start-up built)
        short = (num_new > 1) & (num_computed <= MAX_PREFIX_RATIO * num_new)
        fresh = (num_computed == 0) | short & (num_computed + num_new <= num_new.sum())
        fresh[:num_decode] = False
        if not fresh.size or not fresh[-1]:
            return None
        first = int(fresh.size - np.argmin(fresh[::-1])) if not fresh.all() else 0
        starts = np.cumsum(num_new) - num_new
        rest_len = num_computed[:first] + num_new[:first]
        first_blocks: tuple[int, ...] = ()
        if slots is not None and block_updates is not None and tokens_per_block:
            pages = -(-(num_computed[first:] + num_new[first:]) // tokens_per_block)
            first_blocks = consecutive_first_blocks(slots[first:], pages, block_updates)
        return FreshPrompts(
            first_seq=first,
            starts=tuple(starts[first:].tolist()),
            lengths=tuple(num_new[first:].tolist()),
            rest_max_query_len=int(num_new[:first].max()) if first else 0,
            rest_max_seq_len=int(rest_len.max()) if first else 0,
            first_blocks=first_blocks,
            prefixes=tuple(num_computed[first:].tolist()),
        )


def consecutive_first_blocks(
    slots: np.ndarray, num_pages: np.ndarray, updates: np.ndarray
) -> tuple[int, ...]:
    """For each sequence (its slot, how many pages it uses): the block id b when ``updates`` ([k, 3]:
    slot | block index | block id) give it blocks b, b+1, ..., b+n-1 at indices 0..n-1 in consecutive
    rows, else -1. One pass over the updates, whatever the number of sequences."""
    upd = np.asarray(updates, dtype=np.int64).reshape(-1, 3)
    if not upd.shape[0]:
        return (-1,) * len(slots)
    slot, index, block = upd[:, 0], upd[:, 1], upd[:, 2]
    follows = np.zeros(upd.shape[0], dtype=bool)  # row r continues row r - 1's run
    follows[1:] = (slot[1:] == slot[:-1]) & (index[1:] == index[:-1] + 1) & (block[1:] == block[:-1] + 1)
    run = np.cumsum(~follows) - 1
    run_last = np.flatnonzero(np.append(~follows[1:], True))  # each run's last row
    rows_left = run_last[run] - np.arange(upd.shape[0]) + 1  # rows from r to its run's end
    start_row = {int(slot[r]): int(r) for r in np.flatnonzero(index == 0)}
    out = []
    for s, n in zip(slots.tolist(), num_pages.tolist(), strict=True):
        r = start_row.get(s)
        out.append(int(block[r]) if r is not None and rows_left[r] >= n else -1)
    return tuple(out)


@dataclass
class AttentionMetadata:
    """Device tensors describing one packed step of ``S`` sequences and ``T`` tokens.

    Tokens are packed decode first (one token each), then context chunks, with no padding.
    Sequence s owns tokens ``query_start_loc[s]:query_start_loc[s+1]``; its KV length after this
    step is ``seq_lens[s]``, so its queries sit at positions ``seq_lens[s] - q_len .. seq_lens[s] - 1``.
    """

    slot_mapping: torch.Tensor  # [T] int64: block * block_size + offset where token t's K/V goes; -1 = none
    block_tables: torch.Tensor  # [S, max_blocks] int32: KV block ids of each sequence (0 = null block)
    seq_lens: torch.Tensor  # [S] int32: KV length after this step
    query_start_loc: torch.Tensor  # [S + 1] int32: prefix sum of the new tokens per sequence
    max_query_len: int
    max_seq_len: int
    num_decode_seqs: int  # the first num_decode_seqs sequences have one new token each
    num_decode_tokens: int
    # host-side, for an attention plugin called eagerly (``forward_into``); None when the step does not
    # end with fresh prompts (and for decode steps replayed from a graph, which carry no metadata)
    fresh_prompts: FreshPrompts | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
