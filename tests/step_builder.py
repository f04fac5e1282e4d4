"""Hand-made ScheduledBatch objects for engine tests, with a trivial block allocator.

Independent of the real scheduler: each sequence gets a fixed slot, blocks are handed out from a
counter (block 0 is the null block), and each batch carries the block-table rows it appends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.executor.messages import ScheduledBatch, SlotInit


@dataclass
class Chunk:
    """``tokens`` of sequence ``seq_id`` (slot ``slot``) computed this step, starting at ``start``."""

    seq_id: int
    slot: int
    start: int
    tokens: list[int]
    decode: bool = False
    prompt_logprobs_k: int | None = None  # ask for prompt logprobs of this chunk with top-k


class StepBuilder:
    def __init__(self, tokens_per_block: int, first_block: int = 1) -> None:
        self.tokens_per_block = tokens_per_block
        self.next_block = first_block
        self.blocks: dict[int, list[int]] = {}  # slot -> block ids in order
        self.step_id = 0

    def allocate(self, slot: int, num_tokens: int) -> list[tuple[int, int, int]]:
        """Grow ``slot``'s row to hold ``num_tokens`` tokens; returns the (slot, index, block) updates."""
        row = self.blocks.setdefault(slot, [])
        updates = []
        while len(row) * self.tokens_per_block < num_tokens:
            updates.append((slot, len(row), self.next_block))
            row.append(self.next_block)
            self.next_block += 1
        return updates

    def batch(
        self,
        chunks: list[Chunk],
        *,
        sample: list[int] | None = None,
        copy_blocks: list[tuple[int, int]] | None = None,
        slot_inits: list[SlotInit] | None = None,
    ) -> ScheduledBatch:
        """``chunks`` must list decode chunks first. ``sample`` indexes chunks (default: every chunk)."""
        num_decode = sum(c.decode for c in chunks)
        assert all(c.decode for c in chunks[:num_decode]), "decode chunks must come first"
        assert all(len(c.tokens) == 1 for c in chunks[:num_decode])
        updates: list[tuple[int, int, int]] = []
        for c in chunks:
            updates += self.allocate(c.slot, c.start + len(c.tokens))
        rows = list(range(len(chunks))) if sample is None else list(sample)
        i32 = np.int32
        lp_rows = [i for i, c in enumerate(chunks) if c.prompt_logprobs_k is not None]
        self.step_id += 1
        return ScheduledBatch(
            step_id=self.step_id,
            seq_ids=np.array([c.seq_id for c in chunks], i32),
            slots=np.array([c.slot for c in chunks], i32),
            num_computed=np.array([c.start for c in chunks], i32),
            num_new_tokens=np.array([len(c.tokens) for c in chunks], i32),
            num_decode=num_decode,
            input_ids=np.array([t for c in chunks for t in c.tokens], i32),
            block_updates=np.array(updates, i32).reshape(-1, 3),
            copy_blocks=np.array(copy_blocks or [], i32).reshape(-1, 2),
            sample_rows=np.array(rows, i32),
            sample_slots=np.array([chunks[r].slot for r in rows], i32),
            sample_seq_ids=np.array([chunks[r].seq_id for r in rows], i32),
            sample_positions=np.array([chunks[r].start + len(chunks[r].tokens) for r in rows], i32),
            sample_num_output=np.zeros(len(rows), i32),
            slot_inits=list(slot_inits or []),
            prompt_logprob_rows=np.array(lp_rows, i32),
            prompt_logprob_k=np.array([chunks[i].prompt_logprobs_k for i in lp_rows], i32),
        )
