"""Scheduler tests, driven by a fake engine that keeps a real paged KV store of token ids.

The fake engine mirrors the block tables from ``block_updates``, applies ``copy_blocks``, writes each
step's input tokens into their KV slots and samples ``token = f(seed, seq_index, context)`` where the
context is *read back through the block table*. A wrong block table, a missed copy on write or a bad
prefix hit therefore changes the tokens, which are compared with a plain unpaged reference loop.

With ``overlap=True`` the harness schedules step N+1 before applying step N's output, as the engine
does with overlap scheduling; the fake engine then takes the input tokens of ``prev_sample_rows`` from
step N's sampled tokens, as the device does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.config import EngineLimits, SchedulerConfig
from kiln.executor.messages import PromptLogprobs, Request, ScheduledBatch, SlotInit, StepOutput
from kiln.executor.scheduler import Scheduler
from kiln.executor.sequence import worst_case_blocks
from kiln.sampling_params import SamplingParams

V = 48  # vocabulary of the fake model
EOS = 3


def hash_token(seed: int, seq_index: int, context: list[int] | np.ndarray) -> int:
    data = np.asarray([seed, seq_index, *list(context)], dtype=np.uint64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % V


def unmask(tok: int, stop_ids: tuple[int, ...]) -> int:
    """What a sampler does with a stop id before min_tokens: pick another token."""
    while tok in stop_ids:
        tok = (tok + 1) % V
    return tok


def reference(req: Request, seed: int, seq_index: int, max_seq_len: int, next_fn=hash_token):
    """Unpaged decoding loop: (output tokens, finish reason, stop reason)."""
    p = req.params
    eos = () if p.ignore_eos else tuple(req.eos_token_ids)
    stop_token_ids = tuple(p.stop_token_ids or ())
    stop_ids = tuple(dict.fromkeys(eos + stop_token_ids))
    toks, out = list(req.prompt_token_ids), list[int]()
    while True:
        t = next_fn(seed, seq_index, toks)
        if len(out) < p.min_tokens:
            t = unmask(t, stop_ids)
        toks.append(t)
        out.append(t)
        if t in stop_ids and len(out) >= p.min_tokens:
            return out, "stop", (t if t in stop_token_ids else None)
        if (p.max_tokens is not None and len(out) >= p.max_tokens) or len(toks) >= max_seq_len:
            return out, "length", None


class FakeEngine:
    def __init__(self, sched: Scheduler, next_fn: Callable = hash_token, mask_stops: bool = True) -> None:
        kv = sched.kv
        self.bs = kv.block_size
        self.store = np.full((kv.pool.num_blocks, self.bs), -1, dtype=np.int64)  # token id in each KV slot
        self.table = np.zeros_like(kv.block_table, dtype=np.int64)
        self.inits: dict[int, SlotInit] = {}
        self.next_fn, self.mask_stops = next_fn, mask_stops

    def read(self, slot: int, length: int) -> np.ndarray:
        pos = np.arange(length)
        vals = self.store[self.table[slot, pos // self.bs], pos % self.bs]
        assert np.all(vals >= 0), f"slot {slot} reads KV that was never written"
        return vals

    def step(self, b: ScheduledBatch, prev: StepOutput | None = None) -> StepOutput:
        """Run a step; ``prev``: the output of the step before it (its tokens are still 'on the device')."""
        input_ids = b.input_ids.astype(np.int64)
        rows = b.prev_sample_rows
        assert rows.size in (0, b.num_decode)
        if b.reads_prev_samples:
            assert prev is not None and prev.step_id == b.step_id - 1, "reads a step that is not the last one"
            reads = np.nonzero(rows >= 0)[0]
            assert np.all(input_ids[reads] == -1), "a token read on the device has a host value too"
            input_ids[reads] = prev.token_ids[rows[reads]]
        assert np.all(input_ids >= 0), "an input token is neither known nor read from the previous step"
        for init in b.slot_inits:
            self.inits[init.slot] = init
        for slot, j, blk in b.block_updates.tolist():
            self.table[slot, j] = blk
        for src, dst in b.copy_blocks.tolist():
            self.store[dst] = self.store[src]
        starts = np.concatenate(([0], np.cumsum(b.num_new_tokens)))
        for i in range(b.num_seqs):
            slot, nc, n = int(b.slots[i]), int(b.num_computed[i]), int(b.num_new_tokens[i])
            pos = np.arange(nc, nc + n)
            blocks = self.table[slot, pos // self.bs]
            assert np.all(blocks != 0), "a KV write landed in the null block"
            self.store[blocks, pos % self.bs] = input_ids[starts[i] : starts[i + 1]]
        k = max([init.params.logprobs or 0 for init in self.inits.values()] + [0])
        toks, top_ids = [], []
        for r in range(b.num_samples):
            row, slot, length = int(b.sample_rows[r]), int(b.sample_slots[r]), int(b.sample_positions[r])
            assert length == b.num_computed[row] + b.num_new_tokens[row]
            init = self.inits[slot]
            tok = self.next_fn(init.seed, init.seq_index, self.read(slot, length))
            if self.mask_stops and b.sample_num_output[r] < init.params.min_tokens:
                tok = unmask(tok, init.stop_ids)
            toks.append(tok)
            top_ids.append([(tok + j) % V for j in range(k)])
        out = StepOutput(
            step_id=b.step_id,
            seq_ids=b.sample_seq_ids.copy(),
            token_ids=np.asarray(toks, dtype=np.int32),
            logprobs=-np.asarray(toks, dtype=np.float32) / V,
            top_ids=np.asarray(top_ids, dtype=np.int32).reshape(len(toks), k),
            top_logprobs=-np.tile(np.arange(1, k + 1, dtype=np.float32), (len(toks), 1)),
        )
        for row, kk in zip(b.prompt_logprob_rows.tolist(), b.prompt_logprob_k.tolist(), strict=True):
            init = self.inits[int(b.slots[row])]
            known = list(init.prompt_token_ids) + list(init.output_token_ids)
            nc, n = int(b.num_computed[row]), int(b.num_new_tokens[row])
            # the next token of each position of the chunk (none after the last known token)
            targets = np.asarray(known[nc + 1 : nc + n + 1], dtype=np.int32)
            out.prompt_logprobs.append(
                PromptLogprobs(
                    seq_id=int(b.seq_ids[row]),
                    start=nc,
                    token_logprobs=-targets.astype(np.float32) / V,
                    top_ids=np.repeat(targets[:, None], kk, axis=1),
                    top_logprobs=np.zeros((len(targets), kk), dtype=np.float32),
                )
            )
        return out


@dataclass
class Harness:
    sched: Scheduler
    engine: FakeEngine
    requests: dict[str, Request] = field(default_factory=dict)
    tokens: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    logprobs: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    finished: dict[tuple[str, int], tuple[str, object]] = field(default_factory=dict)
    prompt_lp: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    batches: list[ScheduledBatch] = field(default_factory=list)
    idle: int = 0
    overlap: bool = False
    inflight: tuple[ScheduledBatch, StepOutput] | None = None  # overlap: scheduled, output not applied
    # block -> (scheduler step counter when it became unused, step whose update freed it or None)
    freed: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    updating: int | None = None  # the step whose output is being applied

    @classmethod
    def make(
        cls,
        policy="max_utilization",
        num_blocks=64,
        bs=4,
        batch=4,
        tokens=16,
        seq_len=64,
        overlap=False,
        **kw,
    ):
        if overlap:
            kw.setdefault("free_delay_steps", 1)
        sched = Scheduler(
            SchedulerConfig(policy=policy),
            EngineLimits(max_batch_size=batch, max_num_tokens=tokens, max_seq_len=seq_len),
            num_blocks=num_blocks,
            tokens_per_block=bs,
            **kw,
        )
        h = cls(sched, FakeEngine(sched), overlap=overlap)
        h._watch_frees()
        return h

    def _watch_frees(self) -> None:
        pool, release = self.sched.kv.pool, self.sched.kv.pool.release

        def watched(b: int) -> bool:
            unused = release(b)
            if unused:
                self.freed[b] = (self.sched._step, self.updating)
            return unused

        pool.release = watched  # type: ignore[method-assign]

    def _check_reuse(self, batch: ScheduledBatch) -> None:
        """A block freed while step C was the newest scheduled is handed out again at C + free delay at
        the earliest; with a step in flight, one freed by the output of step N (step N + 1 was already
        scheduled and may write it) at N + 2."""
        for blk in set(batch.block_updates[:, 2].tolist()):
            if blk in self.freed:
                counter, by_update = self.freed.pop(blk)
                delay = self.sched.kv.pool.free_delay_steps
                assert batch.step_id >= counter + delay, f"block {blk} reused {delay} step(s) too early"
                if self.overlap and by_update is not None:
                    assert batch.step_id >= by_update + 2, (
                        f"block {blk} freed by step {by_update}'s output reused in step {batch.step_id}"
                    )

    def add(self, rid: str, prompt: list[int], **params) -> Request:
        params.setdefault("seed", int(hashlib.sha256(rid.encode()).hexdigest()[:8], 16))
        req = Request(rid, list(prompt), SamplingParams(**params), eos_token_ids=(EOS,))
        self.sched.add_request(req)
        self.requests[rid] = req
        self.sched.check_integrity()
        return req

    def _apply(self, ups) -> None:
        for up in ups:
            key = (up.request_id, up.seq_index)
            assert key not in self.finished, f"{key} got an update after it finished"
            self.tokens.setdefault(key, []).extend(up.new_token_ids)
            self.logprobs.setdefault(key, []).extend(up.new_logprobs)
            self.cached[up.request_id] = max(self.cached.get(up.request_id, 0), up.num_cached_tokens)
            for pl in up.prompt_logprobs:
                pos = pl.start + 1 + np.arange(len(pl.token_logprobs))
                # the fake engine scores token t as -t / V: keep (position, t) to compare exactly
                toks = np.rint(-pl.token_logprobs.astype(np.float64) * V).astype(int)
                self.prompt_lp.setdefault(up.request_id, []).extend(
                    zip(pos.tolist(), toks.tolist(), strict=True)
                )
            if up.finished:
                self.finished[key] = (up.finish_reason, up.stop_reason)

    def step(self) -> ScheduledBatch | None:
        """Schedule and run a step; apply its output (overlap: the previous step's output instead)."""
        s = self.sched
        # a sequence whose pending token ends it by length is not scheduled again
        ending = {
            q.seq_id for q in s.running if q.num_pending and q.at_length_limit(s._max_blocks, s.block_size)
        }
        decoding = {q.seq_id for q in s.running if q.is_decode} - ending
        batch = s.schedule()
        s.check_integrity()
        launched = None
        if batch is not None:
            self._check_batch(batch, decoding)
            launched = (batch, self.engine.step(batch, self.inflight[1] if self.inflight else None))
        elif self.inflight is None:
            self.idle += 1
            assert self.idle <= s.kv.pool.free_delay_steps + 1, "nothing scheduled although work is left"
        if self.inflight is not None:
            self._update(*self.inflight)
            self.inflight = None
        if launched is not None:
            self.idle = 0
            if self.overlap:
                self.inflight = launched
            else:
                self._update(*launched)
        return batch

    def _update(self, batch: ScheduledBatch, out: StepOutput) -> None:
        self.updating = batch.step_id
        try:
            self._apply(self.sched.update(batch, out))
        finally:
            self.updating = None
        self.sched.check_integrity()

    def _check_batch(self, batch: ScheduledBatch, decoding: set[int]) -> None:
        s, lim = self.sched, self.sched.limits
        self._check_reuse(batch)
        self.batches.append(batch)
        assert 0 < batch.num_tokens <= lim.max_num_tokens and batch.num_seqs <= lim.max_batch_size
        assert batch.num_tokens == int(batch.num_new_tokens.sum())
        assert len(set(batch.slots.tolist())) == batch.num_seqs
        # generation first: the decode part is exactly the sequences that were decoding (1 token each),
        # except those preempted (or, with a free delay, deferred a step while freed blocks come back)
        decode_part = set(batch.seq_ids[: batch.num_decode].tolist())
        assert np.all(batch.num_new_tokens[: batch.num_decode] == 1) and decode_part <= decoding
        waiting = {q.seq_id for q in s.waiting}
        missed = decoding - decode_part - waiting
        assert not missed or (s.kv.pool.free_delay_steps and not s.no_evict), f"decode starved: {missed}"
        assert np.all(batch.prompt_logprob_rows >= batch.num_decode)

    def abort(self, rid: str, seq_index: int | None = None) -> None:
        self._apply(self.sched.abort(rid, seq_index))
        self.sched.check_integrity()

    def run(self, max_steps: int = 3000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished() and self.inflight is None:
                break
            self.step()
        assert not self.sched.has_unfinished() and self.inflight is None, "requests did not finish"
        self.assert_no_leaks()

    def assert_no_leaks(self) -> None:
        s = self.sched
        assert s.kv.usage == 0.0 and s.stats().num_running == 0 and s.stats().num_waiting == 0
        for _ in range(s.kv.pool.free_delay_steps):
            assert s.schedule() is None  # lets delayed frees come back
        assert s.kv.num_free_blocks == s.kv.num_usable_blocks
        s.check_integrity()

    def expected(self, rid: str, seq_index: int = 0):
        req, s = self.requests[rid], self.sched
        max_len = s.limits.max_seq_len
        if not s.no_evict:  # a sequence ends when its next step needs more blocks than the whole pool
            max_len = min(max_len, s.kv.num_usable_blocks * s.block_size + 1)
        assert req.params.seed is not None
        return reference(req, req.params.seed, seq_index, max_len, self.engine.next_fn)

    def check_against_reference(self) -> None:
        """Finished sequences equal the unpaged reference; aborted ones are a prefix of it."""
        for (rid, idx), (reason, stop) in self.finished.items():
            out, ref_reason, ref_stop = self.expected(rid, idx)
            got = self.tokens.get((rid, idx), [])
            if reason == "abort":
                assert got == out[: len(got)], (rid, idx)
            else:
                assert (got, reason, stop) == (out, ref_reason, ref_stop), (rid, idx)
                assert self.logprobs[(rid, idx)] == pytest.approx([-t / V for t in got])


def prompt_of(n: int, start: int = 10) -> list[int]:
    return [(start + 7 * i) % V for i in range(n)]


# ---------------------------------------------------------------------------------------------- basics
def test_chunked_prefill_splits_and_samples_only_at_the_end():
    h = Harness.make(tokens=8)
    h.add("a", prompt_of(20), max_tokens=3, ignore_eos=True)
    chunks = [h.step() for _ in range(3)]
    assert [b.num_new_tokens.tolist() for b in chunks] == [[8], [8], [4]]
    assert [b.num_computed.tolist() for b in chunks] == [[0], [8], [16]]
    assert [b.num_samples for b in chunks] == [0, 0, 1] and chunks[2].sample_positions.tolist() == [20]
    assert chunks[0].input_ids.tolist() == prompt_of(20)[:8]
    assert len(chunks[0].slot_inits) == 1 and not chunks[1].slot_inits
    d = h.step()
    assert d.num_decode == 1 and d.num_computed.tolist() == [20] and d.sample_num_output.tolist() == [1]
    h.run()
    h.check_against_reference()
    assert h.finished[("a", 0)] == ("length", None) and len(h.tokens[("a", 0)]) == 3


def test_generation_is_never_starved_by_a_long_prompt():
    h = Harness.make(tokens=8, seq_len=128, num_blocks=80)
    h.add("short", prompt_of(3), max_tokens=12, ignore_eos=True)
    h.step()
    h.add("long", prompt_of(60, 5), max_tokens=2, ignore_eos=True)
    for _ in range(8):
        b = h.step()
        assert b.num_decode == 1 and b.num_new_tokens.tolist() == [1, 7]
    h.run()
    h.check_against_reference()


def test_admission_is_first_come_first_served_and_bounded_by_slots():
    h = Harness.make(batch=2, tokens=16)
    for i in range(4):
        h.add(f"r{i}", prompt_of(5, i), max_tokens=4, ignore_eos=True)
    b = h.step()
    assert b.num_seqs == 2 and [i.slot for i in b.slot_inits] == [0, 1]
    assert [s.request.request_id for s in h.sched.waiting] == ["r2", "r3"]
    h.run()
    h.check_against_reference()


@pytest.mark.parametrize("overlap", [False, True])
def test_finish_reasons(overlap):
    always = {"eos": lambda *a: EOS, "nine": lambda *a: 9}
    h = Harness.make(overlap=overlap)
    h.engine.next_fn = always["eos"]
    h.add("min", prompt_of(4), min_tokens=3, max_tokens=10)
    h.add("ign", prompt_of(4), ignore_eos=True, max_tokens=5)
    h.run()
    h.check_against_reference()
    assert h.finished[("min", 0)] == ("stop", None) and len(h.tokens[("min", 0)]) == 4
    assert h.finished[("ign", 0)] == ("length", None) and h.tokens[("ign", 0)] == [EOS] * 5

    h = Harness.make(seq_len=16, overlap=overlap)
    h.engine.next_fn = always["nine"]
    h.add("stop_id", prompt_of(4), stop_token_ids=[9])
    h.add("ctx", prompt_of(10), max_tokens=None, stop_token_ids=[8])
    h.run()
    assert h.finished[("stop_id", 0)] == ("stop", 9)
    assert h.finished[("ctx", 0)] == ("length", None) and len(h.tokens[("ctx", 0)]) == 6  # 10 + 6 = 16


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_ids_are_ignored_before_min_tokens_even_if_sampled(overlap):
    h = Harness.make(overlap=overlap)
    h.engine = FakeEngine(h.sched, next_fn=lambda *a: EOS, mask_stops=False)
    h.add("a", prompt_of(4), min_tokens=3, max_tokens=10)
    h.run()
    assert h.tokens[("a", 0)] == [EOS] * 3 and h.finished[("a", 0)] == ("stop", None)


def test_logprobs_are_trimmed_per_request():
    h = Harness.make()
    h.add("none", prompt_of(4), max_tokens=2, ignore_eos=True)
    h.add("one", prompt_of(4, 1), max_tokens=2, ignore_eos=True, logprobs=1)
    h.add("three", prompt_of(4, 2), max_tokens=2, ignore_eos=True, logprobs=3)
    h.step()  # prefill: each samples its first token
    b = h.sched.schedule()  # the fake engine returns the top 3 for every row
    ups = {u.request_id: u for u in h.sched.update(b, h.engine.step(b))}
    assert ups["none"].new_top is None
    assert [len(t) for t in ups["one"].new_top] == [1] and [len(t) for t in ups["three"].new_top] == [3]
    tok = ups["three"].new_token_ids[0]
    assert ups["three"].new_top[0] == [(tok, -1.0), ((tok + 1) % V, -2.0), ((tok + 2) % V, -3.0)]


def test_validation_errors():
    h = Harness.make(num_blocks=5, seq_len=64)  # 4 usable blocks of 4 tokens
    h.add("a", prompt_of(3))
    with pytest.raises(ValueError, match="already used"):
        h.add("a", prompt_of(3))
    with pytest.raises(ValueError, match="empty"):
        h.add("e", [])
    with pytest.raises(ValueError, match="at most 63"):
        h.add("long", prompt_of(64))
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        h.add("big", prompt_of(17))
    with pytest.raises(ValueError, match="max_batch_size"):
        h.add("n", prompt_of(3), n=5)
    g = Harness.make(policy="guaranteed_no_evict", num_blocks=5)
    with pytest.raises(ValueError, match="guaranteed_no_evict"):
        g.add("budget", prompt_of(8), max_tokens=20)
    g.add("fits", prompt_of(8), max_tokens=9)  # positions 0..15: 4 blocks
    g.run()


def test_unseeded_requests_draw_reproducible_seeds():
    def seeds(engine_seed: int) -> list[int]:
        s = Scheduler(SchedulerConfig(), EngineLimits(4, 16, 64), 32, 4, seed=engine_seed)
        for i in range(3):
            s.add_request(Request(f"r{i}", [1, 2, 3], SamplingParams(seed=None if i != 1 else 7)))
        b = s.schedule()
        assert b is not None
        return [init.seed for init in b.slot_inits]

    a = seeds(5)
    assert a == seeds(5) and a != seeds(6) and a[1] == 7
    assert all(0 <= x < 2**63 for x in a) and len(set(a)) == 3


# ---------------------------------------------------------------------------------------------- prefix
def test_prefix_reuse_serves_cached_blocks_but_not_to_prompt_logprobs_requests():
    h = Harness.make()
    prompt = prompt_of(14)
    h.add("first", prompt, max_tokens=2, ignore_eos=True)
    h.run()
    h.add("second", prompt, max_tokens=2, ignore_eos=True)
    b = h.step()
    assert b.num_computed.tolist() == [12] and b.num_new_tokens.tolist() == [2]
    h.add("plp", prompt, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    h.add("salted", prompt, max_tokens=2, ignore_eos=True, cache_salt="x")
    h.run()
    h.check_against_reference()
    assert h.cached == {"first": 0, "second": 12, "plp": 0, "salted": 0}
    st_ = h.sched.stats()
    assert st_.prefix_hits == 12 and st_.prefix_queries == 3 * 14  # the plp request is not looked up


def test_an_update_leaves_its_full_blocks_to_be_hashed_by_the_next_schedule():
    """A step's results go out before its prompt blocks are hashed (they are on the first token's path);
    the next schedule hashes them, so a request admitted then still finds them."""
    h = Harness.make()
    h.add("first", prompt_of(14), max_tokens=4, ignore_eos=True)
    b = h.sched.schedule()
    h._apply(h.sched.update(b, h.engine.step(b)))  # the whole prompt: three full blocks of 4
    assert h.sched.kv.pool.cached == {}
    h.step()
    assert len(h.sched.kv.pool.cached) == 3
    h.add("second", prompt_of(14), max_tokens=2, ignore_eos=True)
    h.run()
    h.check_against_reference()
    assert h.cached["second"] == 12


def test_prompt_logprobs_cover_each_position_once():
    h = Harness.make(tokens=8)
    prompt = prompt_of(30)
    h.add("p", prompt, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    h.run()
    assert h.prompt_lp["p"] == [(i, prompt[i]) for i in range(1, 30)]


# ---------------------------------------------------------------------------------------------- n > 1
def test_fork_shares_prompt_blocks_then_copies_on_write():
    h = Harness.make(tokens=8)
    h.add("n3", prompt_of(10), n=3, max_tokens=4, ignore_eos=True)
    b1 = h.step()
    assert b1.num_samples == 0 and len(b1.slot_inits) == 1
    b2 = h.sched.schedule()  # the chunk that ends the prompt forks the two others
    assert b2.num_new_tokens.tolist() == [2] and b2.sample_rows.tolist() == [0, 0, 0]
    assert b2.sample_seq_ids[0] == b2.seq_ids[0] and len(set(b2.sample_slots.tolist())) == 3
    assert b2.sample_positions.tolist() == [10] * 3 and sorted(i.seq_index for i in b2.slot_inits) == [1, 2]
    kv = h.sched.kv
    rows = [kv.blocks_of(int(s)).tolist() for s in b2.sample_slots]
    assert rows[0] == rows[1] == rows[2] and all(kv.pool.ref_count[blk] == 3 for blk in rows[0])
    h._apply(h.sched.update(b2, h.engine.step(b2)))
    h.sched.check_integrity()
    b3 = h.step()  # all three write position 10 into the shared partial block: two copies
    assert b3.num_decode == 3 and b3.copy_blocks.shape == (2, 2)
    assert len({tuple(r) for r in b3.copy_blocks.tolist()}) == 2 and b3.copy_blocks[0, 0] == rows[0][2]
    assert kv.pool.ref_count[rows[0][0]] == 3  # full prompt blocks stay shared
    h.run()
    h.check_against_reference()
    outs = [tuple(h.tokens[("n3", i)]) for i in range(3)]
    assert len(set(outs)) == 3  # seq_index keys the randomness


def test_fork_waits_for_slots_for_every_sequence():
    h = Harness.make(batch=3)
    h.add("busy", prompt_of(3), max_tokens=6, ignore_eos=True)
    h.add("n3", prompt_of(5), n=3, max_tokens=2, ignore_eos=True)
    b = h.step()
    assert b.num_seqs == 1  # only 2 slots free: n=3 waits
    while ("busy", 0) not in h.finished:
        h.step()
    b = h.step()
    assert b.num_samples == 3
    h.run()
    h.check_against_reference()


# ---------------------------------------------------------------------------------------------- policies
def _workload(h: Harness, count: int = 8, n: int = 1) -> None:
    for i in range(count):
        h.add(f"r{i}", prompt_of(6 + 3 * i, i), max_tokens=10 + i, n=n if i % 3 == 0 else 1)


@pytest.mark.parametrize("delay, overlap", [(0, False), (1, False), (1, True)])
def test_preemption_with_a_tiny_pool_gives_the_same_tokens(delay, overlap):
    big = Harness.make(num_blocks=200, free_delay_steps=delay, overlap=overlap)
    _workload(big, n=2)
    big.run()
    big.check_against_reference()
    # 16 usable blocks: one max_seq_len sequence
    tiny = Harness.make(num_blocks=17, free_delay_steps=delay, overlap=overlap)
    _workload(tiny, n=2)
    tiny.run()
    assert tiny.sched.stats().num_preemptions > 0
    assert tiny.tokens == big.tokens and tiny.finished == big.finished


@pytest.mark.parametrize("delay, overlap", [(0, False), (1, False), (1, True)])
def test_guaranteed_no_evict_never_preempts(delay, overlap):
    h = Harness.make(policy="guaranteed_no_evict", num_blocks=25, free_delay_steps=delay, overlap=overlap)
    _workload(h, n=2)
    held_back = 0  # steps where requests waited although slots were free: the block budget said no
    while h.sched.has_unfinished() or h.inflight:
        h.step()
        st_ = h.sched.stats()
        held_back += st_.num_waiting > 0 and st_.num_running <= 2
    h.assert_no_leaks()
    h.check_against_reference()
    assert h.sched.stats().num_preemptions == 0 and held_back > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_preempted_prompt_logprobs_are_not_sent_twice(overlap):
    h = Harness.make(num_blocks=17, tokens=8, overlap=overlap)
    prompts = {f"p{i}": prompt_of(20 + i, i) for i in range(4)}
    for rid, p in prompts.items():
        h.add(rid, p, max_tokens=30, ignore_eos=True, prompt_logprobs=1)
    h.run()
    assert h.sched.stats().num_preemptions > 0
    for rid, p in prompts.items():
        assert h.prompt_lp[rid] == [(i, p[i]) for i in range(1, len(p))]
    h.check_against_reference()


def test_a_sequence_larger_than_the_pool_ends_with_length():
    h = Harness.make(num_blocks=5, seq_len=64)  # 4 blocks = 16 tokens
    h.add("a", prompt_of(6), max_tokens=40, ignore_eos=True)
    h.run()
    # 16 KV slots hold positions 0..15; the 17th token is sampled but never needs to be written
    assert h.finished[("a", 0)] == ("length", None) and len(h.tokens[("a", 0)]) == 17 - 6


# ---------------------------------------------------------------------------------------------- abort
def test_abort_at_every_stage_frees_everything():
    h = Harness.make(tokens=16, batch=6)
    h.add("waiting", prompt_of(5), max_tokens=5)
    h.abort("waiting")
    assert h.finished[("waiting", 0)] == ("abort", None) and not h.sched.has_unfinished()
    h.add("prefill", prompt_of(30), max_tokens=5)
    h.step()
    assert [(q.num_computed, q.request.request_id) for q in h.sched.running] == [(16, "prefill")]
    h.abort("prefill")
    assert h.sched.kv.usage == 0.0
    h.add("decode", prompt_of(4), max_tokens=20, ignore_eos=True)
    h.add("fork", prompt_of(20, 3), n=3, max_tokens=4, ignore_eos=True)
    h.add("lead", prompt_of(20, 4), n=2, max_tokens=4, ignore_eos=True)
    h.step()  # decode: 4 tokens, fork: 12 of 20, lead: waiting
    assert h.abort("nope") is None and h.sched.abort("nope") == []
    fork_leader = next(q for q in h.sched.running if q.request.request_id == "fork")
    assert fork_leader.is_prefork_leader and fork_leader.num_computed == 12
    h.abort("fork", 2)  # a sequence not forked yet
    b = h.step()  # fork: the last 8 prompt tokens, forks sequence 1 only; lead: 7 of 20
    assert b.num_samples == 3 and sorted(i.seq_index for i in b.slot_inits) == [0, 1]
    lead = next(q for q in h.sched.running if q.request.request_id == "lead")
    assert lead.is_prefork_leader and lead.num_computed == 7
    h.abort("lead", 0)  # the leader mid-prefill: sequence 1 takes the prompt over
    assert lead.seq_index == 1
    h.step()
    h.abort("fork", 1)  # after the fork
    h.abort("decode")
    h.run()
    h.check_against_reference()
    assert h.finished[("fork", 2)] == ("abort", None) and h.tokens[("fork", 2)] == []
    assert h.finished[("lead", 0)] == ("abort", None) and h.finished[("lead", 1)] == ("length", None)
    assert h.finished[("fork", 0)][0] == "length" and h.finished[("decode", 0)][0] == "abort"
    assert len(h.tokens[("fork", 1)]) == 2


# ---------------------------------------------------------------------------------------------- property
@st.composite
def scenarios(draw):
    bs = draw(st.sampled_from([2, 4]))
    batch = draw(st.integers(1, 4))
    seq_len = draw(st.integers(8, 40))
    policy = draw(st.sampled_from(["guaranteed_no_evict", "max_utilization"]))
    # tight pools preempt; under max_utilization the pool may even be smaller than one max_seq_len sequence
    num_blocks = draw(st.sampled_from([3, 5, 8, 12])) + draw(st.sampled_from([0, 0, 1, 4, 24]))
    cfg = dict(
        policy=policy,
        num_blocks=num_blocks,
        bs=bs,
        batch=batch,
        tokens=draw(st.integers(batch, 12)),
        seq_len=seq_len,
        free_delay_steps=draw(st.integers(0, 1)),
        enable_block_reuse=draw(st.booleans()),
        overlap=draw(st.booleans()),
    )
    bases = [prompt_of(40, 1), prompt_of(40, 2)]
    ops: list[tuple] = []
    for i in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["add", "add", "add", "step", "abort"]))
        if kind == "add":
            base = draw(st.sampled_from(bases))
            prompt = base[: draw(st.integers(0, 12))] + draw(st.lists(st.integers(0, V - 1), max_size=6))
            params = dict(
                n=draw(st.integers(1, min(3, batch))),
                max_tokens=draw(st.integers(1, 12)),
                min_tokens=draw(st.integers(0, 2)),
                ignore_eos=draw(st.booleans()),
                prompt_logprobs=draw(st.sampled_from([None, None, 1])),
                cache_salt=draw(st.sampled_from([None, None, "s"])),
                stop_token_ids=draw(st.sampled_from([[], [5]])),
            )
            params["max_tokens"] = max(params["max_tokens"], params["min_tokens"])
            ops.append(("add", f"r{i}", prompt, params))
        elif kind == "step":
            ops.append(("step", draw(st.integers(1, 6))))
        else:
            ops.append(("abort", draw(st.integers(0, 9)), draw(st.sampled_from([None, 0, 1, 2]))))
    return cfg, ops


def _valid(cfg: dict, prompt: list[int], params: dict) -> bool:
    usable, bs, seq_len = cfg["num_blocks"] - 1, cfg["bs"], cfg["seq_len"]
    if not prompt or len(prompt) >= seq_len:
        return False
    if cfg["policy"] == "guaranteed_no_evict":
        total = min(len(prompt) + params["max_tokens"], seq_len)
        return worst_case_blocks(len(prompt), total, params["n"], bs) <= usable
    return -(-len(prompt) // bs) <= usable


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads_keep_every_invariant(scenario):
    cfg, ops = scenario
    h = Harness.make(**cfg)
    for op in ops:
        if op[0] == "add":
            _, rid, prompt, params = op
            if _valid(cfg, prompt, params):
                h.add(rid, prompt, **params)
            else:
                with pytest.raises(ValueError):
                    h.add(rid, prompt, **params)
        elif op[0] == "step":
            for _ in range(op[1]):
                if h.sched.has_unfinished():
                    h.step()
        else:
            _, i, idx = op
            h.abort(f"r{i}", idx)
    h.run()
    h.check_against_reference()
    for rid, req in h.requests.items():
        for idx in range(req.params.n):
            assert (rid, idx) in h.finished
        if req.params.prompt_logprobs is not None and h.finished[(rid, 0)][0] != "abort":
            # the leader's prompt logprobs: each position once, in order (a relabelled leader keeps them)
            got = h.prompt_lp.get(rid, [])
            assert got == [(i, req.prompt_token_ids[i]) for i in range(1, len(got) + 1)]
    if cfg["policy"] == "guaranteed_no_evict":
        assert h.sched.stats().num_preemptions == 0


# ---------------------------------------------------------------------------------------------- overlap
def test_a_decode_reads_its_input_token_from_the_step_in_flight():
    h = Harness.make(overlap=True)
    h.add("a", prompt_of(6), max_tokens=4, ignore_eos=True)
    b1 = h.step()  # prefill, samples the first token; its output is not applied yet
    seq = h.sched.running[0]
    assert b1.num_samples == 1 and not b1.reads_prev_samples and not h.tokens
    assert (seq.num_computed, seq.num_known, seq.num_pending, seq.pending_from) == (6, 6, 1, (1, 0))
    b2 = h.step()  # decodes the token sampled by step 1, then step 1's output is applied
    assert b2.num_decode == 1 and b2.input_ids.tolist() == [-1] and b2.prev_sample_rows.tolist() == [0]
    assert b2.num_computed.tolist() == [6] and b2.sample_positions.tolist() == [7]
    assert b2.sample_num_output.tolist() == [1]  # the pending output counts (min_tokens)
    assert len(h.tokens[("a", 0)]) == 1 and (seq.num_known, seq.num_pending) == (7, 1)
    h.run()
    h.check_against_reference()


def test_with_a_step_in_flight_only_decodes_of_the_previous_step_read_the_device():
    h = Harness.make(overlap=True, tokens=8, batch=4)
    h.add("long", prompt_of(20), max_tokens=3, ignore_eos=True)  # chunks of 8: samples at step 3
    h.add("short", prompt_of(3, 1), max_tokens=6, ignore_eos=True)
    for b in iter(h.step, None):
        known = b.input_ids >= 0
        assert np.all(known[b.num_decode :]), "a context chunk reads a token in flight"
        if b.reads_prev_samples:
            prev = h.batches[-2]
            assert prev.step_id == b.step_id - 1
            reads = np.nonzero(b.prev_sample_rows >= 0)[0]
            # each read row is the sampling row of that very sequence in the previous step
            assert prev.sample_seq_ids[b.prev_sample_rows[reads]].tolist() == b.seq_ids[reads].tolist()
        if not h.sched.has_unfinished() and h.inflight is None:
            break
    h.run()
    h.check_against_reference()
    assert sum(b.reads_prev_samples for b in h.batches) >= 5


@pytest.mark.parametrize("max_tokens", [1, 2, 3])
def test_a_sequence_ending_by_length_is_not_scheduled_past_its_last_token(max_tokens):
    h = Harness.make(overlap=True)
    h.add("a", prompt_of(5), max_tokens=max_tokens, ignore_eos=True)
    h.run()
    h.check_against_reference()
    # prefill samples token 1, each decode one more: no step computes a token past max_tokens
    assert [b.num_samples for b in h.batches] == [1] * max_tokens
    assert len(h.tokens[("a", 0)]) == max_tokens


def test_a_token_computed_after_a_stop_is_dropped():
    h = Harness.make(overlap=True)
    h.engine.next_fn = lambda seed, idx, ctx: EOS if len(ctx) >= 6 else 11
    h.add("a", prompt_of(5), max_tokens=10, stop_token_ids=[EOS])
    h.add("b", prompt_of(4, 1), max_tokens=3, ignore_eos=True)
    h.step()  # both prefill
    h.step()  # decodes both; a's EOS is sampled here (from a context of 6 tokens)
    b3 = h.step()  # a is scheduled again (its token is unknown yet); then step 2's output finishes it
    assert set(b3.seq_ids.tolist()) == {0, 1} and h.finished[("a", 0)] == ("stop", EOS)
    assert h.sched.kv.blocks_of(int(b3.slots[list(b3.seq_ids).index(0)])).size == 0  # freed
    h.run()  # step 3's token for a is never reported (the harness rejects updates after a finish)
    assert h.tokens[("a", 0)] == [11, EOS]
    h.check_against_reference()


def test_abort_while_a_step_is_in_flight():
    h = Harness.make(overlap=True)
    h.add("a", prompt_of(5), max_tokens=20, ignore_eos=True)
    h.add("b", prompt_of(9, 2), n=2, max_tokens=6, ignore_eos=True)
    for _ in range(3):
        h.step()
    assert h.inflight is not None
    h.abort("a")  # scheduled in the step in flight
    h.abort("b", 1)
    assert h.sched.kv.num_pending_blocks > 0  # come back only after the step in flight
    got = len(h.tokens[("a", 0)])
    h.run()
    assert len(h.tokens[("a", 0)]) == got and h.finished[("a", 0)] == ("abort", None)
    h.check_against_reference()


def test_preempting_a_sequence_with_a_token_in_flight_drops_and_recomputes_it():
    h = Harness.make(overlap=True, num_blocks=9, batch=2, tokens=16, seq_len=32)  # 8 blocks of 4
    h.add("old", prompt_of(10), max_tokens=16, ignore_eos=True)
    h.add("new", prompt_of(10, 3), max_tokens=16, ignore_eos=True)
    preempted_in_flight = 0
    while h.sched.has_unfinished() or h.inflight:
        pending = {q.seq_id: q.num_pending for q in h.sched.running}
        before = h.sched.stats().num_preemptions
        h.step()
        if h.sched.stats().num_preemptions > before:
            victims = [q for q in h.sched.waiting if pending.get(q.seq_id)]
            preempted_in_flight += len(victims)
            assert all(q.num_pending == 0 and q.num_computed == 0 for q in victims)
    h.assert_no_leaks()
    h.check_against_reference()
    assert preempted_in_flight > 0


def test_forked_sequences_decode_from_their_own_rows():
    h = Harness.make(overlap=True, tokens=8)
    h.add("n3", prompt_of(10), n=3, max_tokens=4, ignore_eos=True)
    h.step()
    b2 = h.step()  # ends the prompt: forks and samples 3 rows
    b3 = h.step()
    assert b2.sample_rows.tolist() == [0, 0, 0]
    order = {sid: r for r, sid in enumerate(b2.sample_seq_ids.tolist())}
    assert b3.prev_sample_rows.tolist() == [order[sid] for sid in b3.seq_ids.tolist()]
    assert b3.copy_blocks.shape == (2, 2)  # the shared partial prompt block is copied on write
    h.run()
    h.check_against_reference()


def test_outputs_are_applied_in_order_with_at_most_one_step_in_flight():
    h = Harness.make(overlap=True)
    h.add("a", prompt_of(5), max_tokens=5, ignore_eos=True)
    b1 = h.sched.schedule()
    o1 = h.engine.step(b1)
    b2 = h.sched.schedule()
    o2 = h.engine.step(b2, o1)
    with pytest.raises(ValueError, match="step 2 applied before step 1"):
        h.sched.update(b2, o2)
    with pytest.raises(RuntimeError, match=r"steps \[1, 2\] wait for update\(\)"):
        h.sched.schedule()
    h._update(b1, o1)  # in order, both apply: nothing was changed by the refused calls
    h._update(b2, o2)
    h.run()
    h.check_against_reference()
