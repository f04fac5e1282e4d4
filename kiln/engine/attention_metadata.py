"""Per-step attention metadata: built by the ModelEngine, passed explicitly to the model's forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
