"""Decoder: turns one step's logits into sampled tokens and logprobs for the whole batch at once.

Per step: apply the batch's SlotInits, upload one small packed int array (slots, positions, output
counts, random-row indices), gather per-row parameters by slot, process the logits (bias, min_tokens,
penalties, temperature, top-k / top-p / min-p), pick tokens (argmax for greedy rows; an exponential
race with counter-based noise for random rows), and bring everything back in ONE device-to-host copy.
There is no Python loop over requests; the host decides only which stages any row needs, from the
host mirrors of the per-slot parameters, so work that no row asked for is skipped.

Reported logprobs are those of the raw model distribution (log_softmax of the unprocessed logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.engine import rng
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
from kiln.executor.messages import ScheduledBatch, StepOutput


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
        self.vocab_size = vocab_size
        self.state = SamplingState(max_batch_size, vocab_size, self.device)
        self._vterm = rng.vocab_term(vocab_size, self.device)  # [V] int64
        self._pinned: torch.Tensor | None = None  # reused H2D staging buffer (CUDA only)
        # Device copy of the last sampled tokens [R] int64, for a next step built before this one returns.
        self.last_sampled: torch.Tensor | None = None

    # ------------------------------------------------------------------ public
    def sample(self, logits: torch.Tensor, batch: ScheduledBatch) -> StepOutput:
        """Sample one token per row of ``logits [R, V]`` (rows follow ``batch.sample_*``)."""
        self.state.apply(batch.slot_inits)
        r = batch.num_samples
        self._check_logits(logits, r)
        seq_ids = np.asarray(batch.sample_seq_ids, np.int32)
        if r == 0:
            return StepOutput(batch.step_id, seq_ids, np.zeros(0, np.int32), np.zeros(0, np.float32))
        plan = self._plan(batch)
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
        host = torch.cat(parts).cpu().numpy()
        out = StepOutput(
            step_id=batch.step_id,
            seq_ids=seq_ids,
            token_ids=host[:r].copy(),
            logprobs=host[r : 2 * r].view(np.float32).copy(),
        )
        if k:
            out.top_ids = host[2 * r : 2 * r + r * k].reshape(r, k).copy()
            out.top_logprobs = host[2 * r + r * k :].view(np.float32).reshape(r, k).copy()
        return out

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
        r = plan.num_rows
        n = 3 * r + plan.random_rows.size
        if self.device.type == "cuda":
            if self._pinned is None or self._pinned.numel() < n:
                self._pinned = torch.empty(max(n, 1024), dtype=torch.int64).pin_memory()
            # safe to overwrite: the previous step's copy finished before its results were read back
            host = self._pinned[:n]
        else:
            host = torch.empty(n, dtype=torch.int64)
        h = host.numpy()
        h[:r] = batch.sample_slots
        h[r : 2 * r] = batch.sample_positions
        h[2 * r : 3 * r] = batch.sample_num_output
        h[3 * r :] = plan.random_rows
        dev = host.to(self.device, non_blocking=True)
        slots = dev[:r]
        return _Rows(
            slots=slots,
            positions=dev[r : 2 * r],
            num_output=dev[2 * r : 3 * r],
            random_rows=dev[3 * r :],
            floats=self.state.floats[slots],
            ints=self.state.ints[slots],
        )

    # ------------------------------------------------------------------ device side
    def _process(self, raw: torch.Tensor, rows: _Rows, plan: _Plan) -> torch.Tensor:
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
            counts = s.counts[rows.slots]  # [R, V] int32
            out_seen = counts > 0
            seen = out_seen | s.prompt_mask[rows.slots]
            rep = rows.floats[:, F_REPETITION, None]  # [R, 1]
            # HF repetition penalty over prompt + output: shrink positive logits, push negative ones down
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
            # OpenAI presence / frequency penalties over output tokens only
            x = x - rows.floats[:, F_FREQUENCY, None] * counts - rows.floats[:, F_PRESENCE, None] * out_seen
        return x

    def _choose(self, x: torch.Tensor, rows: _Rows, plan: _Plan) -> torch.Tensor:
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
        sub = sub / f[:, F_TEMPERATURE, None]  # [Rr, V]; temperature > 0 on these rows
        sub = _filter(sub, f, i, plan)
        probs = torch.softmax(sub, dim=-1)  # [Rr, V]
        k1, k2 = rng.row_keys(i[:, I_SEED_LO], i[:, I_SEED_HI], i[:, I_SEQ_INDEX], pos)
        noise = rng.exponential_noise(k1, k2, self._vterm)  # [Rr, V]
        drawn = (probs / noise).argmax(dim=-1)  # [Rr]
        if greedy is None:
            return drawn
        return greedy.index_copy(0, rows.random_rows, drawn)


def _filter(x: torch.Tensor, f: torch.Tensor, i: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """top-k, then top-p on the renormalised top-k distribution, then min-p; masked logits are -inf.

    Each filter keeps a prefix of the tokens sorted by logit, so all three reduce to one logit threshold
    per row. Rows that do not use a filter carry its neutral value (top_k = V, top_p = 1, min_p = 0).
    """
    v = x.shape[1]
    top_k = i[:, I_TOP_K]  # [Rr] int64 in [1, V]
    thresh = None  # [Rr, 1]
    if plan.top_p:
        # one sort of the batch serves top-k and top-p together
        srt = x.sort(dim=-1, descending=True).values  # [Rr, V]
        pos = torch.arange(v, device=x.device)
        in_k = pos[None, :] < top_k[:, None]  # [Rr, V]
        probs = torch.softmax(srt.masked_fill(~in_k, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        top_p = f[:, F_TOP_P, None]  # [Rr, 1]
        # a prefix, never empty (before[0] == 0 < top_p); top_p == 1 keeps all even if the cumsum rounds up
        keep = in_k & ((before < top_p) | (top_p >= 1.0))
        thresh = srt.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    elif plan.top_k:
        vals = x.topk(plan.top_k, dim=-1).values  # [Rr, k_max]
        kth = vals.gather(1, (top_k.clamp(max=plan.top_k) - 1)[:, None])  # [Rr, 1]
        thresh = torch.where(top_k[:, None] < v, kth, float("-inf"))
    if plan.min_p:
        # p >= min_p * p_max  <=>  logit >= max logit + log(min_p); this ratio survives renormalisation
        mp = x.amax(dim=-1, keepdim=True) + torch.log(f[:, F_MIN_P, None])
        thresh = mp if thresh is None else torch.maximum(thresh, mp)
    if thresh is None:
        return x
    return x.masked_fill(x < thresh, float("-inf"))
