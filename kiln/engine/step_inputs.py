"""One step's device inputs: a ScheduledBatch checked, laid out with vectorised numpy, moved in one copy.

The packed token order (decode rows first, then context chunks), the AttentionMetadata, the rows of
the logits to sample and the step's block-table updates and block copies (applied to the engine's
persistent device table here) come from the batch. With overlap scheduling, decode input tokens not
known on the host are gathered on the device from the previous step's sampled tokens. A step a
decode graph runs needs only the graph's [5, S] rows: the graph builds its block tables and KV
slots itself (cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.config import EngineLimits
from kiln.engine.attention_metadata import AttentionMetadata, FreshPrompts
from kiln.engine.staging import HostStaging
from kiln.executor.messages import ScheduledBatch


@dataclass
class StepInputs:
    """Device tensors of one step (what the model and the logits gather need)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata | None  # None for a graph step: the graph builds its own
    # graph step: [5, S] int64 input ids, positions, slots, KV lengths, rows of the previous step's samples
    graph_rows: torch.Tensor | None
    sample_token_idx: torch.Tensor  # [Ru] int64: packed index of each distinct sampling row's last token
    sample_inverse: torch.Tensor | None  # [R] int64 into [Ru]; None when rows are distinct and in order
    sample_all_in_order: bool  # the sampling rows are exactly the packed tokens 0..T-1, in order
    copy_src: torch.Tensor | None  # [C] int64
    copy_dst: torch.Tensor | None


class StepInputBuilder:
    """Checks batches and builds their device inputs against the engine's limits and block table
    ([max_batch_size, max_blocks_per_seq] int32 by slot, written here)."""

    def __init__(self, limits: EngineLimits, block_table: torch.Tensor, tokens_per_block: int,
                 staging: HostStaging) -> None:  # fmt: skip
        self.limits = limits
        self.block_table = block_table
        self.tokens_per_block = tokens_per_block
        self.max_blocks_per_seq = int(block_table.shape[1])
        self._staging = staging

    def validate(self, batch: ScheduledBatch, prev_sampled: torch.Tensor | None, num_blocks: int) -> None:
        """Reject a batch the engine cannot run, saying what was wrong and what is allowed."""
        lim = self.limits
        prev_rows = np.asarray(batch.prev_sample_rows)
        if prev_rows.size and prev_rows.size != batch.num_decode:
            raise ValueError(
                f"prev_sample_rows has {prev_rows.size} rows, the batch {batch.num_decode} decodes"
            )
        if batch.reads_prev_samples:
            num_prev = 0 if prev_sampled is None else int(prev_sampled.shape[0])
            if prev_rows.max() >= num_prev:
                raise ValueError(
                    f"prev_sample_rows reads row {int(prev_rows.max())} of the previous step's sampled "
                    f"tokens, which has {num_prev}: pass that step's tokens as prev_sampled"
                )
        num_new = np.asarray(batch.num_new_tokens)
        if batch.num_seqs > lim.max_batch_size or batch.num_tokens > lim.max_num_tokens:
            raise ValueError(
                f"batch of {batch.num_seqs} sequences / {batch.num_tokens} tokens exceeds the engine limits "
                f"(max_batch_size={lim.max_batch_size}, max_num_tokens={lim.max_num_tokens})"
            )
        if num_new.size and (num_new.min() < 1 or int(num_new.sum()) != batch.num_tokens):
            raise ValueError(
                "every scheduled sequence needs >= 1 new token, and input_ids must hold all of them: got "
                f"new tokens from {int(num_new.min())} per sequence, {int(num_new.sum())} in all, "
                f"{batch.num_tokens} input ids"
            )
        if (
            num_new.size
            and (longest := int((np.asarray(batch.num_computed) + num_new).max())) > lim.max_seq_len
        ):
            raise ValueError(f"a sequence reaches {longest} tokens, past max_seq_len={lim.max_seq_len}")
        slots = np.asarray(batch.slots)
        if slots.size and (slots.min() < 0 or slots.max() >= lim.max_batch_size):
            raise ValueError(
                f"slots must be in [0, {lim.max_batch_size}), got {int(slots.min())}..{int(slots.max())}"
            )
        upd = np.asarray(batch.block_updates).reshape(-1, 3)
        if upd.size and (
            upd.min() < 0
            or upd[:, 0].max() >= lim.max_batch_size
            or upd[:, 1].max() >= self.max_blocks_per_seq
            or upd[:, 2].max() >= num_blocks
        ):
            raise ValueError(
                f"block update out of range: rows are (slot < {lim.max_batch_size}, block index < "
                f"{self.max_blocks_per_seq}, block id < {num_blocks}), none negative; got maxima "
                f"{upd.max(axis=0).tolist()} and minimum {int(upd.min())}"
            )
        cp = np.asarray(batch.copy_blocks).reshape(-1, 2)
        if cp.size and (cp.min() < 1 or cp.max() >= num_blocks):
            raise ValueError(
                f"copy_blocks ids must be in [1, {num_blocks}), got {int(cp.min())}..{int(cp.max())}"
            )

    def build(
        self, batch: ScheduledBatch, prev_sampled: torch.Tensor | None = None, graph_step: bool = False
    ) -> StepInputs:
        """The step's device inputs; ``graph_step``: a decode graph runs it (its rows, no metadata)."""
        if graph_step:
            short = self._graph_step(batch)
            if short is not None:
                return short
        num_seqs, num_tokens = batch.num_seqs, batch.num_tokens
        prev_rows = np.asarray(batch.prev_sample_rows, dtype=np.int64) if batch.reads_prev_samples else None
        num_new = np.asarray(batch.num_new_tokens, dtype=np.int64)
        num_computed = np.asarray(batch.num_computed, dtype=np.int64)
        slots = np.asarray(batch.slots, dtype=np.int64)
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        seq_lens = num_computed + num_new
        # position of packed token t = its sequence's first position + its offset in the chunk
        offsets = np.repeat(num_computed - query_start[:-1], num_new)
        positions = np.arange(num_tokens, dtype=np.int64) + offsets
        token_slots = np.repeat(slots, num_new)
        sample_rows = np.asarray(batch.sample_rows, dtype=np.int64)
        uniq, inverse = np.unique(sample_rows, return_inverse=True)
        in_order = uniq.size == sample_rows.size and bool(np.all(uniq == sample_rows))
        sample_token_idx = query_start[1:][uniq] - 1  # last token of each distinct sampling sequence
        updates = np.asarray(batch.block_updates, dtype=np.int64).reshape(-1, 3)
        copies = np.asarray(batch.copy_blocks, dtype=np.int64).reshape(-1, 2)
        if graph_step and prev_rows is None:
            prev_rows_in = np.full(num_seqs, -1, np.int64)  # a graph always reads this row: none here
        else:
            prev_rows_in = np.zeros(0, np.int64) if prev_rows is None else prev_rows
        # The first five are a graph step's [5, S] input rows (one token per sequence: token slots are
        # the slots; every row decodes), contiguous in the staged buffer: a replay copies them at once.
        segments = [
            np.asarray(batch.input_ids, dtype=np.int64),
            positions,
            token_slots,
            seq_lens,
            prev_rows_in,
            slots,
            query_start,
            sample_token_idx,
            inverse.reshape(-1),
            updates.T.reshape(-1),  # slot row | block index row | block id row
            copies.T.reshape(-1),  # src row | dst row
        ]
        flat, parts = self._staging.to_device_packed(segments)
        (input_ids, positions_d, token_slots_d, seq_lens_d, prev_rows_d, slots_d, query_start_d, sample_idx_d,
         inverse_d, updates_d, copies_d) = parts  # fmt: skip
        if prev_rows is not None and not graph_step:  # (a graph reads the previous tokens itself)
            assert prev_sampled is not None
            # decode rows come first, one token each: packed token i is decode row i
            d = prev_rows.size
            read = prev_sampled.index_select(0, prev_rows_d.clamp(min=0))  # [D] int64
            input_ids[:d] = torch.where(prev_rows_d >= 0, read, input_ids[:d])

        copy_src, copy_dst = self._apply_block_changes(updates_d, copies_d)
        graph_rows = attn = None
        if graph_step:  # the graph builds the block tables and KV slots itself
            graph_rows = flat[: 5 * num_seqs].view(5, num_seqs)
        else:
            block_tables = self.block_table.index_select(0, slots_d)  # [S, max_blocks] int32
            tpb = self.tokens_per_block
            token_blocks = self.block_table[token_slots_d, positions_d // tpb]  # [T] int32
            slot_mapping = token_blocks.to(torch.int64) * tpb + positions_d % tpb  # [T] int64
            attn = AttentionMetadata(
                slot_mapping=slot_mapping,
                block_tables=block_tables,
                seq_lens=seq_lens_d.to(torch.int32),
                query_start_loc=query_start_d.to(torch.int32),
                max_query_len=int(num_new.max()) if num_seqs else 0,
                max_seq_len=int(seq_lens.max()) if num_seqs else 0,
                num_decode_seqs=int(batch.num_decode),
                num_decode_tokens=int(batch.num_decode),
                fresh_prompts=FreshPrompts.of_step(
                    num_computed, num_new, int(batch.num_decode), slots, updates, tpb
                ),
            )
        return StepInputs(
            input_ids=input_ids,
            positions=positions_d,
            attn=attn,
            graph_rows=graph_rows,
            sample_token_idx=sample_idx_d,
            sample_inverse=None if in_order else inverse_d,
            sample_all_in_order=in_order and uniq.size == num_tokens,
            copy_src=copy_src,
            copy_dst=copy_dst,
        )

    def _graph_step(self, batch: ScheduledBatch) -> StepInputs | None:
        """The common decode graph step (every row one token and one sample, in order) with only the
        arrays the graph reads: at batch 1 the general preparation is mostly numpy calls whose results a
        graph step does not use, and a small model's step is as much host work as GPU work. None:
        another kind of step (e.g. forked rows sampling one sequence twice)."""
        s = batch.num_seqs
        sample_rows = np.asarray(batch.sample_rows)
        if batch.num_tokens != s or sample_rows.shape != (s,) or (sample_rows != np.arange(s)).any():
            return None
        num_computed = np.asarray(batch.num_computed, dtype=np.int64)
        if batch.reads_prev_samples:
            prev_rows = np.asarray(batch.prev_sample_rows, dtype=np.int64)
        else:
            prev_rows = np.full(s, -1, np.int64)  # a graph always reads this row: none here
        updates = np.asarray(batch.block_updates, dtype=np.int64).reshape(-1, 3)
        copies = np.asarray(batch.copy_blocks, dtype=np.int64).reshape(-1, 2)
        # the graph's [5, S] rows first (input ids, positions, slots, KV lengths, previous-sample rows):
        # one token a row, so a row's position is its computed length and its token slot its slot
        segments = [batch.input_ids, num_computed, batch.slots, num_computed + 1, prev_rows, np.arange(s),
                    updates.T.reshape(-1), copies.T.reshape(-1)]  # fmt: skip
        flat, parts = self._staging.to_device_packed(segments)
        input_ids, positions, _slots, _lens, _prev, sample_idx, updates_d, copies_d = parts
        copy_src, copy_dst = self._apply_block_changes(updates_d, copies_d)
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            attn=None,
            graph_rows=flat[: 5 * s].view(5, s),
            sample_token_idx=sample_idx,
            sample_inverse=None,
            sample_all_in_order=True,
            copy_src=copy_src,
            copy_dst=copy_dst,
        )

    def _apply_block_changes(
        self, updates: torch.Tensor, copies: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Write the step's block-table updates (slot | block index | block id rows, flattened) into the
        device table; returns the block copies' (source, destination) ids, or (None, None)."""
        if updates.numel():
            upd = updates.view(3, -1)
            self.block_table[upd[0], upd[1]] = upd[2].to(torch.int32)  # vectorised index_put
        if not copies.numel():
            return None, None
        cp = copies.view(2, -1)
        return cp[0], cp[1]
