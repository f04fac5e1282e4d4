"""The scheduler's view of requests and sequences.

A request with ``params.n = k`` gives k sequences. Before its prompt is computed only the *leader*
exists (it prefills the prompt); the other indices are ``pending_children`` and are forked from the
leader in the step whose chunk ends the prompt. After that every sequence lives on its own.

A sequence's tokens are its prompt then its outputs. ``num_computed`` of them are in the KV cache
(counted from the moment a step computing them is scheduled); the rest (at least one: the last
sampled token) are computed by later steps.

With overlap scheduling a step is built before the previous one's sampled tokens reach the host:
``token_ids`` holds the *known* tokens and ``num_pending`` counts those sampled by steps in flight
(appended when their step's output is applied). Scheduling reasons over all of them (``num_tokens``);
what the host reports and checks (finish reasons, slot inits) uses the known ones only.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from kiln.config import EngineLimits
from kiln.executor.messages import PromptLogprobs, Request, SlotInit
from kiln.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class RequestState:
    request: Request
    seed: int  # params.seed, or one drawn from the engine's generator when the request came in
    stop_ids: tuple[int, ...]  # ids that finish a sequence (after min_tokens)
    max_total: int  # prompt + max_tokens, capped at max_seq_len
    pending_children: list[int]  # seq indices not forked yet (the leader's prompt is not done)
    leader: Sequence | None = None
    live: dict[int, Sequence] = field(default_factory=dict)  # seq index -> unfinished forked/leader seq
    # guaranteed_no_evict: blocks this request may still take from the pool (reserved at admission)
    future_blocks: int = 0
    first_scheduled_time: float | None = None  # wall clock (time.time) of the first admission
    queued_time: float = field(default_factory=time.time)  # wall clock when the engine took it in

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def uses_prefix_cache(self) -> bool:
        # prompt logprobs need the logits of every prompt position, so nothing may be skipped
        return self.params.prompt_logprobs is None

    @property
    def done(self) -> bool:
        return not self.live and not self.pending_children


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: RequestState
    seq_index: int
    token_ids: list[int]  # prompt, then the outputs known on the host
    num_computed: int = 0
    num_pending: int = 0  # tokens sampled by steps in flight, not in token_ids yet
    pending_from: tuple[int, int] = (-1, -1)  # (step id, sampling row) of the newest pending token
    slot: int = -1
    status: SeqStatus = SeqStatus.WAITING
    epoch: int = 0  # bumped on preemption: in-flight results of an older epoch are dropped
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted: bool = False
    prompt_logprobs_next: int = 1  # next prompt position whose logprob the caller has not received
    needs_slot_init: bool = True  # its slot's per-sequence state must be (re)written

    @property
    def num_known(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus those sampled by steps in flight."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_outputs(self) -> int:
        return self.num_tokens - self.request.num_prompt

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt :]

    @property
    def remaining(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_decode(self) -> bool:
        """Generation phase: everything known is computed except the last sampled token."""
        return self.num_outputs > 0 and self.remaining == 1

    def at_length_limit(self, max_blocks: int, block_size: int, num_tokens: int | None = None) -> bool:
        """True once ``num_tokens`` (default: all, pending included) end the sequence by length:
        max_tokens or max_seq_len, or a next step needing more KV blocks than it can ever hold."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return n >= self.request.max_total or -(-n // block_size) > max_blocks

    @property
    def is_prefork_leader(self) -> bool:
        return self is self.request.leader and bool(self.request.pending_children)

    def slot_init(self) -> SlotInit:
        assert self.num_pending == 0, f"sequence {self.seq_id} takes a slot with tokens still in flight"
        req = self.request
        return SlotInit(
            slot=self.slot,
            params=req.params,
            prompt_token_ids=req.request.prompt_token_ids,
            output_token_ids=self.output_token_ids,
            seed=req.seed,
            seq_index=self.seq_index,
            stop_ids=req.stop_ids,
        )

    def finish_reason(self, max_blocks: int, block_size: int) -> tuple[str | None, int | None]:
        """(finish reason, stop reason) after a token was appended; (None, None) while it goes on.

        ``max_blocks``: the most blocks the sequence can ever hold (it must hold its whole next step).
        """
        req, tok, known = self.request, self.token_ids[-1], len(self.token_ids)
        if tok in req.stop_ids and known - req.num_prompt >= req.params.min_tokens:
            return "stop", (tok if tok in (req.params.stop_token_ids or ()) else None)
        if self.at_length_limit(max_blocks, block_size, known):
            return "length", None
        return None, None

    def new_prompt_logprobs(self, pl: PromptLogprobs) -> PromptLogprobs | None:
        """The part of a chunk's prompt logprobs not sent before (a recomputed prompt is scored again)."""
        pos = pl.start + 1 + np.arange(len(pl.token_logprobs))  # [L] positions scored
        keep = np.nonzero((pos >= self.prompt_logprobs_next) & (pos <= self.request.num_prompt - 1))[0]
        if keep.size == 0:
            return None
        lo, hi = int(keep[0]), int(keep[-1]) + 1
        self.prompt_logprobs_next = int(pos[hi - 1]) + 1
        if lo == 0 and hi == len(pos):
            return pl
        return PromptLogprobs(
            pl.seq_id, pl.start + lo, pl.token_logprobs[lo:hi], pl.top_ids[lo:hi], pl.top_logprobs[lo:hi]
        )


def stop_ids_of(req: Request) -> tuple[int, ...]:
    """EOS (unless ignore_eos) then stop_token_ids, without duplicates."""
    eos = () if req.params.ignore_eos else tuple(req.eos_token_ids)
    return tuple(dict.fromkeys(eos + tuple(req.params.stop_token_ids or ())))


def worst_case_blocks(num_prompt: int, max_total: int, n: int, block_size: int) -> int:
    """Blocks a request of n sequences may hold at most: shared full prompt blocks, then each
    sequence's own blocks up to position max_total - 2 (the last sampled token is never written).
    A partial prompt block is counted once per sequence: all but one copy it on their first write.
    """
    shared = num_prompt // block_size
    per_seq = -(-(max_total - 1) // block_size)
    return shared + n * (per_seq - shared)


def check_request(
    req: Request, limits: EngineLimits, usable_blocks: int, block_size: int, no_evict: bool
) -> int:
    """Raise ValueError (saying what is allowed) if ``req`` can never run; returns its max_total
    (prompt + max_tokens, capped at max_seq_len). ``no_evict``: its whole budget must fit the pool."""
    p, num_prompt, bs = req.params, len(req.prompt_token_ids), block_size
    if num_prompt == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    if num_prompt >= limits.max_seq_len:
        raise ValueError(
            f"prompt of {num_prompt} tokens leaves no room to generate: max_seq_len is "
            f"{limits.max_seq_len}, so a prompt may have at most {limits.max_seq_len - 1} tokens"
        )
    if -(-num_prompt // bs) > usable_blocks:
        raise ValueError(
            f"prompt of {num_prompt} tokens needs {-(-num_prompt // bs)} KV blocks of {bs} tokens but "
            f"the pool has {usable_blocks} ({usable_blocks * bs} tokens): shorten the prompt or give the "
            "KV cache more memory"
        )
    if p.n > limits.max_batch_size:
        raise ValueError(f"n={p.n} sequences cannot run together: max_batch_size is {limits.max_batch_size}")
    max_total = limits.max_seq_len
    if p.max_tokens is not None:
        max_total = min(num_prompt + p.max_tokens, max_total)
    if no_evict and (worst := worst_case_blocks(num_prompt, max_total, p.n, bs)) > usable_blocks:
        raise ValueError(
            f"the request may need {worst} KV blocks ({p.n} x {max_total} tokens) but the pool has "
            f"{usable_blocks}; under 'guaranteed_no_evict' its whole budget must fit: lower max_tokens or "
            "n, use the 'max_utilization' policy, or give the KV cache more memory"
        )
    return max_total
