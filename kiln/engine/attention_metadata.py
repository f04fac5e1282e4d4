"""Per-step attention metadata: built by the ModelEngine, passed explicitly to the model's forward."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FreshPrompts:
    """Host facts about the step's trailing run of *fresh* sequences: context chunks whose new tokens
    are all of their KV (nothing cached before them), i.e. plain causal attention over themselves.
    An attention plugin may hand those to another kernel (``paged_attention_sdpa`` does), and the
    leading sequences ``[0, first_seq)`` to the paged kernel with the bounds given here."""

    first_seq: int
    starts: tuple[int, ...]  # each fresh sequence's first packed token
    lengths: tuple[int, ...]  # and its token count
    rest_max_query_len: int  # max_query_len / max_seq_len of the leading sequences (0 if none)
    rest_max_seq_len: int

    @staticmethod
    def of_step(num_computed: np.ndarray, num_new: np.ndarray, num_decode: int) -> FreshPrompts | None:
        """The trailing fresh run of a step's sequences (decode rows are never part of it), or None."""
        fresh = num_computed == 0
        fresh[:num_decode] = False
        if not fresh.size or not fresh[-1]:
            return None
        first = int(fresh.size - np.argmin(fresh[::-1])) if not fresh.all() else 0
        starts = np.cumsum(num_new) - num_new
        rest_len = num_computed[:first] + num_new[:first]
        return FreshPrompts(
            first_seq=first,
            starts=tuple(starts[first:].tolist()),
            lengths=tuple(num_new[first:].tolist()),
            rest_max_query_len=int(num_new[:first].max()) if first else 0,
            rest_max_seq_len=int(rest_len.max()) if first else 0,
        )


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
