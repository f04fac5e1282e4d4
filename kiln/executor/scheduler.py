"""Scheduler: in-flight batching over the paged KV cache.

Each step (``schedule``):
1. every running sequence in generation phase gets one token (they always fit: max_num_tokens >=
   max_batch_size), so a long prompt never starves generation;
2. the rest of the token budget goes to running sequences still computing their context, oldest first,
   in chunks (chunked prefill);
3. then waiting sequences are admitted first come first served (a new one may get only a first chunk).

A sequence holds a slot 0..max_batch_size-1 from admission until it finishes or is preempted.
``guaranteed_no_evict`` admits a request only when the blocks of its whole budget are free beyond what
admitted requests may still take, and never preempts. ``max_utilization`` admits while the next chunk
fits; when a sequence cannot grow it preempts the newest sequence not yet scheduled in the step
(itself, for a decode, if it is the newest), which later recomputes its prompt and outputs.

Scheduling a step advances its sequences' computed tokens and marks its samples pending (see
step_plan.py), so the next step can be scheduled while this one runs (overlap scheduling): a decode
whose input token is still in flight reads it on the device, and a sequence sure to end by length
with its pending token is not scheduled again. ``update`` applies a step's output: it appends the
sampled tokens, registers newly full blocks in the prefix cache and finishes sequences; what a
finished or preempted sequence was scheduled for meanwhile is dropped. With a step in flight use
``free_delay_steps=1``: a block freed once step C is scheduled (steps up to C may still write it for
its old holder) is handed out from step C+1 on, which the device runs after them.
Nothing here imports torch.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from kiln.config import EngineLimits, SchedulerConfig
from kiln.executor.kv_cache_manager import KVCacheManager
from kiln.executor.messages import Request, ScheduledBatch, SequenceUpdate, StepOutput
from kiln.executor.sequence import (
    RequestState,
    SeqStatus,
    Sequence,
    check_request,
    stop_ids_of,
    worst_case_blocks,
)
from kiln.executor.step_plan import StepPlan, add_sampled_token, build_step, update_of

RUNNING, WAITING, FINISHED = SeqStatus.RUNNING, SeqStatus.WAITING, SeqStatus.FINISHED


@dataclass
class SchedulerStats:
    num_running: int  # sequences holding a slot
    num_waiting: int  # sequences waiting for admission (new or preempted)
    kv_usage: float  # used blocks / usable blocks, 0..1
    num_free_blocks: int  # blocks allocatable now
    prefix_queries: int  # tokens looked up in the prefix cache
    prefix_hits: int  # tokens served from it
    num_preemptions: int
    num_scheduled_tokens: int  # total over all steps


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        limits: EngineLimits,
        num_blocks: int,
        tokens_per_block: int,
        enable_block_reuse: bool = True,
        seed: int = 0,
        free_delay_steps: int = 0,
    ) -> None:
        self.config = config
        self.limits = limits
        self.block_size = tokens_per_block
        self.no_evict = config.policy == "guaranteed_no_evict"
        self.kv = KVCacheManager(
            num_blocks,
            tokens_per_block,
            max_batch_size=limits.max_batch_size,
            max_blocks_per_seq=-(-limits.max_seq_len // tokens_per_block),
            enable_block_reuse=enable_block_reuse,
            free_delay_steps=free_delay_steps,
        )
        # the blocks one sequence can ever hold: all usable ones when others can be preempted
        self._max_blocks = self.kv.max_blocks_per_seq
        if not self.no_evict:
            self._max_blocks = min(self._max_blocks, self.kv.num_usable_blocks)
        self._rng = np.random.default_rng(seed)
        self._requests: dict[str, RequestState] = {}
        self._seqs: dict[int, Sequence] = {}  # unfinished sequences by id
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # in admission order: the last one is the newest
        self._free_slots = list(range(limits.max_batch_size))  # a heap: the lowest free slot goes first
        self._reserved_slots = 0  # kept for the pending children of running pre-fork leaders
        self._reserved_blocks = 0  # guaranteed_no_evict: sum of future_blocks of admitted requests
        self._next_seq_id = 0
        self._step = 0
        self._inflight: dict[int, StepPlan] = {}  # scheduled steps whose output is not applied yet
        self._num_preemptions = 0
        self._num_scheduled_tokens = 0
        # state of the schedule() call in progress
        self._scheduled: set[int] = set()
        self._promised = 0  # blocks freed by this step's preemptions that come back after the free delay
        self._preempted_now = False

    # ------------------------------------------------------------------ requests in
    def add_request(self, req: Request) -> None:
        """Queue a request; ValueError (saying what is allowed) if it can never run on this engine."""
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already used by an unfinished request")
        p = req.params
        max_total = check_request(req, self.limits, self.kv.num_usable_blocks, self.block_size, self.no_evict)
        seed = p.seed if p.seed is not None else int(self._rng.integers(0, 2**63, dtype=np.uint64))
        state = RequestState(req, seed, stop_ids_of(req), max_total, pending_children=list(range(1, p.n)))
        state.leader = self._new_seq(state, 0, list(req.prompt_token_ids))
        self._requests[req.request_id] = state
        self._waiting.append(state.leader)

    def _new_seq(self, req: RequestState, seq_index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(self._next_seq_id, req, seq_index, token_ids)
        self._next_seq_id += 1
        self._seqs[seq.seq_id] = seq
        req.live[seq_index] = seq
        return seq

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch | None:
        """The next step's work, or None if nothing can run now (the step clock still advances).

        At most one scheduled step may still wait for ``update`` (overlap scheduling).
        """
        if len(self._inflight) > 1:
            raise RuntimeError(
                f"steps {sorted(self._inflight)} wait for update(): at most one step may be in flight"
            )
        self._step += 1
        self.kv.begin_step(self._step)
        self._scheduled, self._promised, self._preempted_now = set(), 0, False
        entries: list[tuple[Sequence, int]] = []  # (sequence, tokens computed), decode first
        forks: dict[int, list[Sequence]] = {}  # entry index -> children forked off it this step
        for seq in list(self._running):
            if seq.status is RUNNING and seq.is_decode and not self._ends_in_flight(seq):
                if self._fit(seq, 1, chunk=False):
                    self._add_entry(seq, 1, entries, forks)
        num_decode = len(entries)
        budget = self.limits.max_num_tokens - num_decode
        for seq in list(self._running):
            if budget == 0:
                break
            if seq.status is not RUNNING or seq.seq_id in self._scheduled or seq.is_decode:
                continue
            if seq.remaining > 0 and (n := self._fit(seq, min(budget, seq.remaining), chunk=True)):
                budget -= n
                self._add_entry(seq, n, entries, forks)
        # no admission in a step that had to preempt: the space is needed by those already running
        while budget > 0 and self._waiting and not self._preempted_now:
            seq = self._waiting[0]
            if not (n := self._admit(seq, budget)):
                break
            budget -= n
            self._add_entry(seq, n, entries, forks)
        if not entries:
            return None
        return self._build_batch(entries, num_decode, forks)

    def _ends_in_flight(self, seq: Sequence) -> bool:
        """Its pending token ends it by length: nothing more to compute, its blocks free soon."""
        return seq.num_pending > 0 and seq.at_length_limit(self._max_blocks, self.block_size)

    def _fit(self, seq: Sequence, want: int, chunk: bool) -> int:
        """Allocate blocks for up to ``want`` new tokens of a running sequence (a chunk may shrink).

        Returns the tokens it may compute this step; 0 if none (it may have been preempted).
        """
        if self.kv.blocks_needed(seq.slot, seq.num_computed, seq.num_computed + want) == 0:
            return want  # room in blocks it holds alone (most decode steps): nothing to allocate
        while True:
            n = self.kv.max_new_tokens(seq.slot, seq.num_computed, want)
            if n == want or (chunk and n > 0):
                self._allocate(seq, n)
                return n
            if self.no_evict:
                raise RuntimeError(
                    f"sequence {seq.seq_id} ran out of its reserved KV blocks under guaranteed_no_evict"
                )
            need = self.kv.blocks_needed(
                seq.slot, seq.num_computed, seq.num_computed + (1 if chunk else want)
            )
            if self._promised >= need:  # blocks freed this step come back after the free delay
                self._promised -= need
                return 0
            victim = self._victim(seq, chunk)
            if victim is None:
                return 0
            self._preempt(victim)
            if victim is seq:
                return 0

    def _victim(self, seq: Sequence, chunk: bool) -> Sequence | None:
        """The newest running sequence not scheduled this step (nor ending with its pending token);
        a chunk never preempts older ones."""
        for s in reversed(self._running):
            if s is seq:
                return None if chunk else seq
            if s.seq_id not in self._scheduled and not self._ends_in_flight(s):
                return s
        raise AssertionError(f"sequence {seq.seq_id} is not running")

    def _preempt(self, seq: Sequence) -> None:
        freed = self.kv.free(seq.slot)
        if self.kv.pool.free_delay_steps:
            self._promised += freed
        self._release_slot(seq)
        self._running.remove(seq)
        seq.status, seq.num_computed, seq.needs_slot_init = WAITING, 0, True
        seq.num_pending, seq.pending_from = 0, (-1, -1)  # tokens in flight are dropped: recomputed later
        seq.epoch += 1
        self._waiting.appendleft(seq)  # first in line again; older ones preempted later go before it
        self._num_preemptions += 1
        self._preempted_now = True

    def _release_slot(self, seq: Sequence) -> None:
        heapq.heappush(self._free_slots, seq.slot)
        if seq.is_prefork_leader:
            self._reserved_slots -= len(seq.request.pending_children)
        seq.slot = -1

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give the first waiting sequence a slot and its first chunk; returns its tokens (0: not now)."""
        req, bs = seq.request, self.block_size
        num_slots = 1 + (len(req.pending_children) if seq.is_prefork_leader else 0)
        if len(self._free_slots) - self._reserved_slots < num_slots:
            return 0
        match = self.kv.match_prefix(seq.token_ids, req.params.cache_salt) if req.uses_prefix_cache else None
        num_matched = match.num_blocks if match else 0
        avail = self.kv.num_free_blocks - (match.num_evictable if match else 0)
        want = min(budget, seq.num_tokens - num_matched * bs)
        cost = 0
        if self.no_evict:
            cost = worst_case_blocks(req.num_prompt, req.max_total, req.params.n, bs) - num_matched
            if avail - self._reserved_blocks < cost:
                return 0
        else:
            want = min(want, avail * bs)  # matched blocks end on a block boundary: fresh blocks only
            if want <= 0:
                return 0
        self._waiting.popleft()
        seq.slot = heapq.heappop(self._free_slots)
        self._reserved_slots += num_slots - 1
        seq.num_computed = self.kv.open_slot(seq.slot, req.params.cache_salt, match)
        seq.status = RUNNING
        if not seq.admitted:
            seq.admitted, seq.num_cached_tokens = True, seq.num_computed
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.time()
        if self.no_evict:
            req.future_blocks = cost
            self._reserved_blocks += cost
        self._running.append(seq)
        self._allocate(seq, want)
        return want

    def _allocate(self, seq: Sequence, n: int) -> None:
        taken = self.kv.allocate(seq.slot, seq.num_computed, seq.num_computed + n)
        if self.no_evict:
            req = seq.request
            req.future_blocks -= taken
            self._reserved_blocks -= taken
            assert req.future_blocks >= 0, f"request {req.request_id!r} took more blocks than reserved"

    def _add_entry(
        self, seq: Sequence, n: int, entries: list[tuple[Sequence, int]], forks: dict[int, list[Sequence]]
    ) -> None:
        self._scheduled.add(seq.seq_id)
        entries.append((seq, n))
        if seq.is_prefork_leader and seq.num_computed + n == seq.request.num_prompt:
            forks[len(entries) - 1] = self._fork(seq)

    def _fork(self, leader: Sequence) -> list[Sequence]:
        """The leader's chunk ends the prompt this step: its pending siblings take their reserved slots
        and share its blocks; each samples from the leader's last prompt token."""
        req = leader.request
        children = []
        for idx in req.pending_children:
            child = self._new_seq(req, idx, list(leader.token_ids))
            child.slot = heapq.heappop(self._free_slots)
            self.kv.fork(leader.slot, child.slot)
            child.num_computed = req.num_prompt  # computed by the leader in this very step
            child.prompt_logprobs_next = req.num_prompt  # the leader sends the prompt logprobs
            child.num_cached_tokens, child.admitted, child.status = leader.num_cached_tokens, True, RUNNING
            self._running.append(child)
            self._scheduled.add(child.seq_id)  # not a preemption victim in the step that creates it
            children.append(child)
        self._reserved_slots -= len(req.pending_children)
        req.pending_children = []
        return children

    def _build_batch(
        self, entries: list[tuple[Sequence, int]], num_decode: int, forks: dict[int, list[Sequence]]
    ) -> ScheduledBatch:
        inits = [seq.slot_init() for seq in self._running if seq.needs_slot_init]
        for seq in self._running:
            seq.needs_slot_init = False
        block_updates, copy_blocks = self.kv.take_updates()
        batch, plan = build_step(self._step, entries, num_decode, forks, inits, block_updates, copy_blocks)
        self._inflight[self._step] = plan
        self._num_scheduled_tokens += batch.num_tokens
        return batch

    # ------------------------------------------------------------------ results in
    def update(self, batch: ScheduledBatch, out: StepOutput) -> list[SequenceUpdate]:
        """Apply one step's output; one SequenceUpdate per sequence that got tokens or prompt logprobs.

        Steps are applied in the order they were scheduled; the next one may already be scheduled.
        """
        plan = self._inflight.get(batch.step_id)
        if plan is None:
            raise ValueError(f"step {batch.step_id} was never scheduled or was already updated")
        if min(self._inflight) < batch.step_id:
            raise ValueError(f"step {batch.step_id} applied before step {min(self._inflight)}")
        plan.check_output(out)
        del self._inflight[batch.step_id]
        updates: dict[int, SequenceUpdate] = {}
        for seq, end in plan.computed():
            self.kv.cache_full_blocks(seq.slot, seq.token_ids, end)
        for pl in out.prompt_logprobs:
            owner = self._seqs.get(int(pl.seq_id))
            if owner is not None and (kept := owner.new_prompt_logprobs(pl)) is not None:
                update_of(updates, owner).prompt_logprobs.append(kept)
        tokens, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
        for r, seq in plan.sampled(out):
            up = update_of(updates, seq)
            seq.token_ids.append(add_sampled_token(up, out, r, seq.request.params.logprobs, tokens, logprobs))
            seq.num_pending -= 1
            reason, stop_reason = seq.finish_reason(self._max_blocks, self.block_size)
            if reason is not None:  # a step already scheduled for it computes a token that is dropped
                self._finish(seq)
                up.finished, up.finish_reason, up.stop_reason = True, reason, stop_reason
        return list(updates.values())

    def _finish(self, seq: Sequence) -> None:
        req = seq.request
        if seq.status is RUNNING:
            self.kv.free(seq.slot)
            self._release_slot(seq)
            self._running.remove(seq)
        elif seq.status is WAITING:
            self._waiting.remove(seq)
        seq.status = FINISHED
        del self._seqs[seq.seq_id]
        del req.live[seq.seq_index]
        if req.done:
            self._reserved_blocks -= req.future_blocks
            req.future_blocks = 0
            del self._requests[req.request_id]

    def abort(
        self,
        request_id: str,
        seq_index: int | None = None,
        reason: str = "abort",
        stop_reason: str | None = None,
    ) -> list[SequenceUpdate]:
        """Finish a request's sequences (or one of them) wherever they are; [] for an unknown id."""
        req = self._requests.get(request_id)
        if req is None:
            return []
        if seq_index is None:
            targets = list(req.pending_children) + list(req.live)  # pending first: the leader goes last
        elif seq_index in req.pending_children or seq_index in req.live:
            targets = [seq_index]
        else:
            return []
        ups = []
        for idx in targets:
            leader = req.leader
            assert leader is not None
            if idx in req.pending_children:
                req.pending_children.remove(idx)
                if leader.status is RUNNING:
                    self._reserved_slots -= 1
            elif (seq := req.live[idx]).is_prefork_leader:
                # its prompt is still computed for the others: the next pending sequence takes it over
                new_idx = req.pending_children.pop(0)
                if seq.status is RUNNING:
                    self._reserved_slots -= 1
                del req.live[idx]
                seq.seq_index, seq.needs_slot_init = new_idx, True
                req.live[new_idx] = seq
            else:
                self._finish(seq)
            ups.append(
                SequenceUpdate(
                    request_id, idx, [], [], finished=True, finish_reason=reason, stop_reason=stop_reason
                )
            )
        return ups

    # ------------------------------------------------------------------ queries
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            prefix_queries=self.kv.prefix_queries,
            prefix_hits=self.kv.prefix_hits,
            num_preemptions=self._num_preemptions,
            num_scheduled_tokens=self._num_scheduled_tokens,
        )

    def check_integrity(self) -> None:
        """Assert the scheduler's and the KV cache's invariants (tests call it after every operation)."""
        self.kv.check_integrity()
        slots = [s.slot for s in self._running]
        assert all(s >= 0 for s in slots) and len(set(slots)) == len(slots), "running slots must be distinct"
        assert not set(slots) & set(self._free_slots), "a slot is both free and held"
        assert len(slots) + len(self._free_slots) == self.limits.max_batch_size, "a slot was lost"
        assert set(np.nonzero(self.kv._live)[0].tolist()) == set(slots), "KV slots differ from running slots"
        assert all(s.slot == -1 and s.status is WAITING for s in self._waiting)
        assert all(s.status is RUNNING for s in self._running)
        reserved = sum(len(s.request.pending_children) for s in self._running if s.is_prefork_leader)
        assert reserved == self._reserved_slots <= len(self._free_slots), "slot reservations are off"
        live = {s.seq_id for s in self._running} | {s.seq_id for s in self._waiting}
        assert live == set(self._seqs), "a live sequence is neither running nor waiting"
        for s in self._running:
            assert s.num_computed <= int(self.kv.num_blocks_of[s.slot]) * self.block_size
            assert s.num_computed <= s.num_tokens and 0 <= s.num_pending <= len(self._inflight)
        assert all(s.num_pending == 0 for s in self._waiting), "a waiting sequence has tokens in flight"
        assert set(self._requests) == {s.request.request_id for s in self._seqs.values()}
        if self.no_evict:
            assert self._reserved_blocks == sum(r.future_blocks for r in self._requests.values())
            assert self._reserved_blocks <= self.kv.num_free_blocks, "reserved blocks exceed the free pool"
