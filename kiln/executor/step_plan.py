"""One scheduled step as data: the ScheduledBatch sent to the engine, and the StepPlan kept by the
scheduler to apply that step's output to the right sequences.

``build_step`` turns the scheduler's choices (sequences and their token counts, decode first) into flat
arrays. A sequence whose chunk reaches its last token samples the next one; a decode whose input token
was sampled by the step still in flight reads it on the device (``prev_sample_rows``). Building a step
records it on its sequences: their computed tokens advance and each sampling sequence has one more
pending token, so the next step can be built before this one's output is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.executor.messages import ScheduledBatch, SequenceUpdate, SlotInit, StepOutput
from kiln.executor.sequence import SeqStatus, Sequence

INPUT_IN_FLIGHT = -1  # input_ids placeholder where the engine reads the token from the previous step


@dataclass
class StepPlan:
    """What a scheduled step computes. Entries and samples carry the sequence's epoch when scheduled:
    a sequence finished or preempted since (its epoch moved on) gets nothing from this step."""

    step_id: int
    entries: list[tuple[Sequence, int, int]]  # (sequence, epoch, tokens computed once the step is done)
    samples: list[tuple[Sequence, int]]  # (sequence receiving a token, epoch), in sampling-row order

    def check_output(self, out: StepOutput) -> None:
        if out.step_id != self.step_id or len(out.token_ids) != len(self.samples):
            raise ValueError(
                f"step output (step {out.step_id}, {len(out.token_ids)} tokens) does not match the batch "
                f"(step {self.step_id}, {len(self.samples)} sampling rows)"
            )

    def computed(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens now in its KV cache) for the entries still current."""
        return [(s, end) for s, epoch, end in self.entries if _current(s, epoch)]

    def sampled(self, out: StepOutput) -> list[tuple[int, Sequence]]:
        """(sampling row, sequence) for the samples still current, in row order."""
        rows = []
        seq_ids = out.seq_ids.tolist()
        for r, (seq, epoch) in enumerate(self.samples):
            if not _current(seq, epoch):
                continue
            if seq_ids[r] != seq.seq_id:
                raise ValueError(f"sampling row {r} is for sequence {seq_ids[r]}, expected {seq.seq_id}")
            rows.append((r, seq))
        return rows


def _current(seq: Sequence, epoch: int) -> bool:
    return seq.status is SeqStatus.RUNNING and seq.epoch == epoch


def build_step(
    step_id: int,
    entries: list[tuple[Sequence, int]],
    num_decode: int,
    forks: dict[int, list[Sequence]],
    slot_inits: list[SlotInit],
    block_updates: np.ndarray,
    copy_blocks: np.ndarray,
) -> tuple[ScheduledBatch, StepPlan]:
    """The batch of ``entries`` [(sequence, new tokens)], decode first; ``forks[i]``: children forked
    off entry i this step (they sample from its last token). Records the step on the sequences."""
    input_ids: list[int] = []
    prev_rows = np.full(num_decode, -1, dtype=np.int32)  # [num_decode]
    rows: list[tuple[int, int, int, int, int]] = []  # (row, slot, seq id, position, outputs so far)
    samples: list[tuple[Sequence, int]] = []
    plp_rows: list[int] = []
    plp_k: list[int] = []
    for i, (seq, n) in enumerate(entries):
        nc = seq.num_computed
        if nc + n > seq.num_known:  # its last input token is still in flight: the engine reads it
            step, row = seq.pending_from
            if not (i < num_decode and n == 1 and seq.num_pending == 1 and step == step_id - 1):
                raise AssertionError(
                    f"sequence {seq.seq_id}: only a decode may read a token of the step just before it "
                    f"(entry {i} of {n} tokens, {seq.num_pending} pending from step {step}, step {step_id})"
                )
            input_ids.append(INPUT_IN_FLIGHT)
            prev_rows[i] = row
        else:
            input_ids += seq.token_ids[nc : nc + n]
        if nc + n == seq.num_tokens:  # computes up to its last token: samples the next one
            rows.append((i, seq.slot, seq.seq_id, seq.num_tokens, seq.num_outputs))
            samples.append((seq, seq.epoch))
        for child in forks.get(i, ()):
            rows.append((i, child.slot, child.seq_id, child.num_tokens, 0))
            samples.append((child, child.epoch))
        k = seq.request.params.prompt_logprobs
        # a chunk scores positions nc+1 .. nc+n; list it if one of them is a prompt position not sent yet
        if k is not None and nc + 1 <= seq.request.num_prompt - 1 and nc + n >= seq.prompt_logprobs_next:
            plp_rows.append(i)
            plp_k.append(k)
    i32 = np.int32
    r = np.asarray(rows, dtype=i32).reshape(-1, 5)  # [R, 5]
    batch = ScheduledBatch(
        step_id=step_id,
        seq_ids=np.asarray([s.seq_id for s, _ in entries], dtype=i32),
        slots=np.asarray([s.slot for s, _ in entries], dtype=i32),
        num_computed=np.asarray([s.num_computed for s, _ in entries], dtype=i32),
        num_new_tokens=np.asarray([n for _, n in entries], dtype=i32),
        num_decode=num_decode,
        input_ids=np.asarray(input_ids, dtype=i32),
        block_updates=block_updates,
        copy_blocks=copy_blocks,
        sample_rows=np.ascontiguousarray(r[:, 0]),
        sample_slots=np.ascontiguousarray(r[:, 1]),
        sample_seq_ids=np.ascontiguousarray(r[:, 2]),
        sample_positions=np.ascontiguousarray(r[:, 3]),
        sample_num_output=np.ascontiguousarray(r[:, 4]),
        slot_inits=slot_inits,
        prompt_logprob_rows=np.asarray(plp_rows, dtype=i32),
        prompt_logprob_k=np.asarray(plp_k, dtype=i32),
        prev_sample_rows=prev_rows if (prev_rows >= 0).any() else np.zeros(0, i32),
    )
    plan = StepPlan(step_id, [(s, s.epoch, s.num_computed + n) for s, n in entries], samples)
    # optimistic: the step's tokens count as computed and its samples as pending from now on
    for seq, n in entries:
        seq.num_computed += n
    for row, (seq, _) in enumerate(samples):
        seq.num_pending += 1
        seq.pending_from = (step_id, row)
    return batch, plan


def update_of(updates: dict[int, SequenceUpdate], seq: Sequence) -> SequenceUpdate:
    """The step's update of ``seq`` in ``updates`` (by sequence id), made on first use."""
    up = updates.get(seq.seq_id)
    if up is None:
        up = updates[seq.seq_id] = SequenceUpdate(
            seq.request.request_id,
            seq.seq_index,
            [],
            [],
            num_cached_tokens=seq.num_cached_tokens,
            first_scheduled_time=seq.request.first_scheduled_time,
            queued_time=seq.request.queued_time,
        )
    return up


def add_sampled_token(
    up: SequenceUpdate,
    out: StepOutput,
    r: int,
    num_logprobs: int | None,
    tokens: list[int],
    logprobs: list[float],
) -> int:
    """Append sampling row ``r`` of ``out`` to ``up`` (top logprobs trimmed to the request's count).
    ``tokens`` and ``logprobs`` are ``out``'s as Python lists (converted once per step, not per row)."""
    tok = tokens[r]
    up.new_token_ids.append(tok)
    up.new_logprobs.append(logprobs[r])
    if num_logprobs is not None:
        top = []
        if out.top_ids is not None and out.top_logprobs is not None:
            k = num_logprobs
            top = list(zip(out.top_ids[r, :k].tolist(), out.top_logprobs[r, :k].tolist(), strict=True))
        up.new_top = (up.new_top or []) + [top]
    return tok
