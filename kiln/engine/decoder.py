"""Decoder: turns one step's logits into sampled tokens and logprobs for the whole batch at once.

Per step: apply the batch's SlotInits, upload one small packed int array (slots, positions, output
counts, random-row indices), gather per-row parameters by slot, process the logits (bias, min_tokens,
penalties, temperature, top-k / top-p / min-p), pick tokens (argmax for greedy rows; an exponential
race with counter-based noise for random rows), and bring everything back in ONE device-to-host copy.
``sample_async`` only launches that copy: the sampled tokens stay on the device (``SampledStep.tokens``)
for a next step built before this one's results reach the host (overlap scheduling).
There is no Python loop over requests; the host decides only which stages any row needs, from the
host mirrors of the per-slot parameters, so work that no row asked for is skipped. The tensor math
itself lives in ``sampling_math.py``.

Reported logprobs are those of the raw model distribution (log_softmax of the unprocessed logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kiln.engine import rng
from kiln.engine.sampling_math import (
    Compiled,
    greedy_sample_reference,
    penalize,
    race_scores,
    top_k_threshold,
    top_p_threshold,
)
from kiln.engine.sampling_state import (
    F_FREQUENCY,
    F_MIN_P,
    F_PRESENCE,
    F_REPETITION,
    F_TEMPERATURE,
    F_TOP_P,
    I_MIN_TOKENS,
    I_NUM_STOP,
    I_SEED_HI,
    I_SEED_LO,
    I_SEQ_INDEX,
    I_TOP_K,
    SamplingState,
)
from kiln.engine.staging import HostStaging
from kiln.executor.messages import ScheduledBatch, SlotInit, StepOutput
from kiln.sampling_params import SamplingParams

# (a plain greedy plan draws no row)
_NO_ROWS = np.zeros(0, np.int64)


@dataclass
class _Plan:
    """Which stages this step needs, decided on the host from the per-slot mirrors (no device sync)."""

    num_rows: int
    random_rows: np.ndarray  # [Rr] int64 indices into the rows whose temperature > 0
    num_logprobs: int  # K: max top-N logprobs asked by any row (0: none)
    bias: bool
    min_tokens: bool
    penalties: bool
    top_k: int  # largest top_k among random rows using it (0: no row filters by top_k)
    top_p: bool
    min_p: bool

    @property
    def any_random(self) -> bool:
        return self.random_rows.size > 0

    @property
    def all_random(self) -> bool:
        return self.random_rows.size == self.num_rows

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the argmax of the raw logits and reports only its own logprob."""
        return not (self.any_random or self.num_logprobs or self.bias or self.min_tokens or self.penalties)


class SampledStep:
    """One step's sampling, launched on the device; ``result()`` waits for it and reads it back."""

    def __init__(
        self,
        step_id: int,
        seq_ids: np.ndarray,
        tokens: torch.Tensor,
        packed: torch.Tensor,
        num_logprobs: int,
        ready: torch.cuda.Event | None = None,
    ) -> None:
        self.step_id = step_id
        self.seq_ids = seq_ids  # [R] int32
        # [R] int64 on the device, not written again before the next step has read its input tokens
        # here (a decode graph's static output is rewritten only by that graph's next replay)
        self.tokens = tokens
        self._packed = packed  # host int32 words [R | R | R*K | R*K], complete once ``ready`` fired
        self._k = num_logprobs
        self._ready = ready
        self._out: StepOutput | None = None

    def result(self) -> StepOutput:
        """The step's output on the host (blocks until the device is done with the step)."""
        if self._out is None:
            if self._ready is not None:
                self._ready.synchronize()
            host, r, k = self._packed.numpy(), int(self.seq_ids.size), self._k
            out = StepOutput(
                step_id=self.step_id,
                seq_ids=self.seq_ids,
                token_ids=host[:r].copy(),
                logprobs=host[r : 2 * r].view(np.float32).copy(),
            )
            if k:
                out.top_ids = host[2 * r : 2 * r + r * k].reshape(r, k).copy()
                out.top_logprobs = host[2 * r + r * k :].view(np.float32).reshape(r, k).copy()
            self._out, self._packed = out, torch.empty(0, dtype=torch.int32)
        return self._out


@dataclass
class _Rows:
    """Per-row device inputs of one step (all [R] or [R, N])."""

    slots: torch.Tensor  # [R] int64
    positions: torch.Tensor  # [R] int64
    num_output: torch.Tensor  # [R] int64
    random_rows: torch.Tensor  # [Rr] int64
    floats: torch.Tensor  # [R, NUM_F] float32, gathered from SamplingState.floats
    ints: torch.Tensor  # [R, NUM_I] int64


class Decoder:
    """Batched sampler over persistent per-slot state. One instance per executor, on the model's device."""

    def __init__(self, max_batch_size: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # tensors report "cuda:0", not "cuda": compare against the concrete device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.vocab_size = vocab_size
        self.state = SamplingState(max_batch_size, vocab_size, self.device)
        self._vterm = rng.vocab_term(vocab_size, self.device)  # [V] int64
        # per-step H2D uploads: alternating pinned buffers, so building step N+1 never overwrites
        # the inputs of step N while its copy may still be queued behind step N's forward
        self._staging = HostStaging(self.device)
        # On CUDA these are compiled: the eager hash alone makes ~20 passes over [R, V].
        # (top_p_threshold stays eager: its compiled scan is slower than torch's cumsum)
        self._race_scores = Compiled(race_scores, self.device)
        self._penalize = Compiled(penalize, self.device)
        # Device copy of the last sampled tokens [R] int64 (= the last SampledStep's tokens).
        self.last_sampled: torch.Tensor | None = None

    # ------------------------------------------------------------------ public
    def sample(self, logits: torch.Tensor, batch: ScheduledBatch) -> StepOutput:
        """Sample one token per row of ``logits [R, V]`` (rows follow ``batch.sample_*``)."""
        return self.sample_async(logits, batch).result()

    def sample_async(
        self,
        logits: torch.Tensor,
        batch: ScheduledBatch,
        greedy: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SampledStep:
        """Launch the sampling of ``logits [R, V]`` and the copy of its results to the host; no wait.
        ``greedy``: the logits' greedy sample already computed on the device (a small decode graph's
        ``greedy_sample`` output), used when the step samples greedily with nothing else to do."""
        self.state.apply(batch.slot_inits)
        r = batch.num_samples
        self._check_logits(logits, r)
        seq_ids = np.asarray(batch.sample_seq_ids, np.int32)
        if r == 0:
            empty = self.last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)
            return SampledStep(batch.step_id, seq_ids, empty, torch.zeros(0, dtype=torch.int32), 0)
        plan = self._plan(batch)
        if plan.plain_greedy:
            return self._sample_greedy(logits, batch, seq_ids, greedy)
        rows = self._upload(batch, plan)
        raw = logits.float()  # [R, V]
        lse = torch.logsumexp(raw, dim=-1)  # [R]
        processed = self._process(raw, rows, plan)
        tokens = self._choose(processed, rows, plan)  # [R] int64
        self.state.record_sampled(rows.slots, tokens)
        self.last_sampled = tokens
        token_lp = raw.gather(1, tokens[:, None]).squeeze(1) - lse  # [R]
        parts = [tokens.to(torch.int32), token_lp.view(torch.int32)]
        k = plan.num_logprobs
        if k:
            top_vals, top_ids = raw.topk(k, dim=-1)  # [R, K]
            top_lp = top_vals - lse[:, None]
            parts += [top_ids.to(torch.int32).flatten(), top_lp.contiguous().view(torch.int32).flatten()]
        # the step's only device-to-host copy: every result packed as int32 words
        return self._to_host(batch.step_id, seq_ids, tokens, torch.cat(parts), k)

    def _sample_greedy(
        self,
        logits: torch.Tensor,
        batch: ScheduledBatch,
        seq_ids: np.ndarray,
        greedy: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> SampledStep:
        """Argmax rows with nothing to process and no top logprobs: two launches on CUDA, none where
        a decode graph sampled already."""
        if greedy is not None:
            tokens, packed = greedy
            if tokens.shape != (logits.shape[0],) or packed.shape != (2 * logits.shape[0],):
                raise ValueError(
                    f"a precomputed greedy sample needs tokens [{logits.shape[0]}] and packed "
                    f"[{2 * logits.shape[0]}], got {tuple(tokens.shape)} and {tuple(packed.shape)}"
                )
        elif self.device.type == "cuda":
            from kiln.plugins.triton.greedy_sample import greedy_sample

            tokens, packed = greedy_sample(logits)
        else:
            tokens, packed = greedy_sample_reference(logits)
        # no row uses penalties, so no output counts need recording: a slot's counts are rebuilt
        # from its SlotInit whenever a request that uses them takes the slot
        self.last_sampled = tokens
        return self._to_host(batch.step_id, seq_ids, tokens, packed, 0)

    def _to_host(
        self, step_id: int, seq_ids: np.ndarray, tokens: torch.Tensor, packed: torch.Tensor, k: int
    ) -> SampledStep:
        """Start the step's one device-to-host copy of ``packed`` (int32 words); no wait."""
        if self.device.type != "cuda":
            return SampledStep(step_id, seq_ids, tokens, packed.cpu(), k)
        host = torch.empty(packed.shape, dtype=torch.int32, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return SampledStep(step_id, seq_ids, tokens, host, k, ready)

    def warm_up(self, num_rows: int | None = None) -> None:
        """Run the heaviest steps once, at ``num_rows`` (default max_batch_size) and at 1 row.

        Every stage is on, so every lazily allocated table exists and the peak workspace (the top-p
        sort) is reached before the KV pool is sized, and compiled kernels are built (dynamic shapes
        specialise a size of 1, hence the second run). The slot state written here is left behind
        harmlessly: every admission overwrites its slot.
        """
        r = self.state.max_batch_size if num_rows is None else num_rows
        if not 1 <= r <= self.state.max_batch_size:
            raise ValueError(f"num_rows must be in [1, {self.state.max_batch_size}], got {r}")
        params = SamplingParams(
            temperature=0.8,
            top_k=50,
            top_p=0.9,
            min_p=0.05,
            repetition_penalty=1.1,
            presence_penalty=0.1,
            frequency_penalty=0.1,
            logit_bias={0: 1.0},
            min_tokens=1,
            logprobs=SamplingParams.MAX_LOGPROBS,
        )
        for n in sorted({1, r}):
            inits = [SlotInit(j, params, [0], [0], seed=j, seq_index=0, stop_ids=(0,)) for j in range(n)]
            if n > 1:  # one greedy row: the mixed greedy / random path
                inits[0] = SlotInit(
                    0, SamplingParams(temperature=0, logprobs=1), [0], [], seed=0, seq_index=0
                )
            self.sample(torch.randn(n, self.vocab_size, device=self.device), _warm_up_batch(inits))
            # every row plain greedy: the two-launch greedy kernels, compiled here rather than mid-run
            plain = [
                SlotInit(j, SamplingParams(temperature=0), [0], [], seed=0, seq_index=0) for j in range(n)
            ]
            self.sample(torch.randn(n, self.vocab_size, device=self.device), _warm_up_batch(plain))

    def processed_logits(self, logits: torch.Tensor, batch: ScheduledBatch) -> torch.Tensor:
        """The logits after logit_bias, min_tokens and penalties (before temperature and filters), [R, V].

        Applies ``batch.slot_inits`` (idempotent) but records nothing: for inspection and tests.
        """
        self.state.apply(batch.slot_inits)
        self._check_logits(logits, batch.num_samples)
        if batch.num_samples == 0:
            return logits.float()
        plan = self._plan(batch)
        return self._process(logits.float(), self._upload(batch, plan), plan)

    # ------------------------------------------------------------------ host side
    def _check_logits(self, logits: torch.Tensor, r: int) -> None:
        if logits.dim() != 2 or logits.shape[0] != r or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits must be [num_samples={r}, vocab_size={self.vocab_size}], got {tuple(logits.shape)}"
            )
        if logits.device != self.device:
            raise ValueError(f"logits are on {logits.device}, the decoder on {self.device}")

    def _plan(self, batch: ScheduledBatch) -> _Plan:
        s = self.state
        slots = np.asarray(batch.sample_slots, np.int64)
        if slots.size and not (slots.min() >= 0 and slots.max() < s.max_batch_size):
            raise ValueError(f"sample_slots must be in [0, {s.max_batch_size}), got {slots.tolist()}")
        if s.plain_greedy[slots].all():  # the common greedy step: one look instead of a dozen
            return _Plan(
                num_rows=int(slots.size), random_rows=_NO_ROWS, num_logprobs=0, bias=False, min_tokens=False,
                penalties=False, top_k=0, top_p=False, min_p=False,
            )  # fmt: skip
        random_rows = np.flatnonzero(s.temperature[slots] > 0).astype(np.int64)
        rs = slots[random_rows]
        top_k = s.top_k[rs]
        top_k = top_k[top_k < self.vocab_size]
        num_out = np.asarray(batch.sample_num_output, np.int64)
        return _Plan(
            num_rows=int(slots.size),
            random_rows=random_rows,
            num_logprobs=min(int(s.num_logprobs[slots].max()), self.vocab_size),
            bias=bool(s.uses_bias[slots].any()),
            min_tokens=bool(((num_out < s.min_tokens[slots]) & (s.num_stop[slots] > 0)).any()),
            penalties=bool(s.uses_penalties[slots].any()),
            top_k=int(top_k.max()) if top_k.size else 0,
            top_p=bool((s.top_p[rs] < 1.0).any()),
            min_p=bool((s.min_p[rs] > 0.0).any()),
        )

    def _upload(self, batch: ScheduledBatch, plan: _Plan) -> _Rows:
        """One H2D copy of [slots | positions | num_output | random_rows] as int64."""
        slots, positions, num_output, random_rows = self._staging.to_device(
            [batch.sample_slots, batch.sample_positions, batch.sample_num_output, plan.random_rows]
        )
        return _Rows(
            slots=slots,
            positions=positions,
            num_output=num_output,
            random_rows=random_rows,
            floats=self.state.floats[slots],
            ints=self.state.ints[slots],
        )

    # ------------------------------------------------------------------ device side
    def _process(self, raw: Tensor, rows: _Rows, plan: _Plan) -> Tensor:
        """Bias, min_tokens, repetition / presence / frequency penalties. Never modifies ``raw``."""
        s = self.state
        x = raw
        if plan.bias:
            assert s.bias is not None
            x = x + s.bias[rows.slots]  # [R, V]
        if plan.min_tokens:
            assert s.stop_ids is not None
            x = x.clone() if x is raw else x
            ids = s.stop_ids[rows.slots]  # [R, K]; padding repeats the row's first id
            active = (rows.num_output < rows.ints[:, I_MIN_TOKENS]) & (rows.ints[:, I_NUM_STOP] > 0)  # [R]
            vals = torch.where(active[:, None], float("-inf"), x.gather(1, ids))  # [R, K]
            x.scatter_(1, ids, vals)
        if plan.penalties:
            assert s.counts is not None and s.prompt_mask is not None
            f = rows.floats
            x = self._penalize(
                x,
                s.counts,
                s.prompt_mask,
                rows.slots,
                f[:, F_REPETITION],
                f[:, F_FREQUENCY],
                f[:, F_PRESENCE],
            )
        return x

    def _choose(self, x: Tensor, rows: _Rows, plan: _Plan) -> Tensor:
        """Greedy rows: argmax of the processed logits. Random rows: exponential race. [R] int64."""
        greedy = None if plan.all_random else x.argmax(dim=-1)
        if not plan.any_random:
            assert greedy is not None
            return greedy
        if plan.all_random:
            sub, f, i, pos = x, rows.floats, rows.ints, rows.positions
        else:
            idx = rows.random_rows
            sub, f, i, pos = x[idx], rows.floats[idx], rows.ints[idx], rows.positions[idx]
        temp = f[:, F_TEMPERATURE]  # [Rr], > 0 on these rows
        thresh = None  # [Rr, 1] logit threshold of top-k / top-p / min-p, on the unscaled logits
        if plan.top_p:
            # one sort of the batch serves top-k and top-p together
            srt = sub.sort(dim=-1, descending=True).values  # [Rr, V]
            thresh = top_p_threshold(srt, temp, i[:, I_TOP_K], f[:, F_TOP_P])
        elif plan.top_k:
            thresh = top_k_threshold(sub, i[:, I_TOP_K], plan.top_k)
        top = sub.amax(dim=-1, keepdim=True)  # [Rr, 1]
        # min-p (p >= min_p * p_max) is the logit bound max + temp * log(min_p) (min_p 0: -inf); a ratio
        # to the max, it survives renormalisation and so composes with the top-k / top-p threshold
        bound = top + temp[:, None] * torch.log(f[:, F_MIN_P, None])
        if thresh is not None:
            bound = torch.maximum(bound, thresh)
        seed_lo, seed_hi, seq_index = i[:, I_SEED_LO], i[:, I_SEED_HI], i[:, I_SEQ_INDEX]
        scores = self._race_scores(sub, top, bound, temp, seed_lo, seed_hi, seq_index, pos, self._vterm)
        drawn = scores.argmax(dim=-1)  # [Rr]
        if greedy is None:
            return drawn
        return greedy.index_copy(0, rows.random_rows, drawn)


def _warm_up_batch(inits: list[SlotInit]) -> ScheduledBatch:
    """A decode step of one row per SlotInit (slots 0..n-1), for the sampler alone."""
    n = len(inits)
    slots = np.arange(n, dtype=np.int32)
    empty = np.zeros(0, np.int32)
    return ScheduledBatch(
        step_id=-1,
        seq_ids=slots,
        slots=slots,
        num_computed=empty,
        num_new_tokens=empty,
        num_decode=n,
        input_ids=empty,
        block_updates=np.zeros((0, 3), np.int32),
        copy_blocks=np.zeros((0, 2), np.int32),
        sample_rows=slots,
        sample_slots=slots,
        sample_seq_ids=slots,
        sample_positions=np.ones(n, np.int32),
        sample_num_output=np.zeros(n, np.int32),
        slot_inits=inits,
    )
