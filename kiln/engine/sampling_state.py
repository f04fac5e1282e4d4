"""Per-slot sampling state: written once per admission, gathered by slot at every step.

Scalar parameters live in two device tables, ``floats [B, NF]`` and ``ints [B, NI]`` (one gather per
step), mirrored on the host so that the decoder can decide which work a step needs without a device
sync. Large per-slot state is allocated lazily, the first time a request needs it:

- ``counts [B, V] int32`` output-token counts and ``prompt_mask [B, V] bool`` (penalties);
- ``bias [B, V] float32`` dense logit bias;
- ``stop_ids [B, K] int64`` ids masked until min_tokens, padded by repeating the row's first id so
  that scattering to the padded columns writes the same value twice (never a conflicting one).

Invariant: for every slot whose parameters use penalties, ``counts[slot]`` holds the counts of its
output tokens and ``prompt_mask[slot]`` its prompt tokens. Both are rebuilt from the SlotInit's token
lists, so a preempted sequence resumes with the same penalty state.
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.engine.rng import split_seed
from kiln.executor.messages import SlotInit

# columns of SamplingState.floats
F_TEMPERATURE, F_TOP_P, F_MIN_P, F_REPETITION, F_PRESENCE, F_FREQUENCY = range(6)
NUM_F = 6
# columns of SamplingState.ints
I_TOP_K, I_SEED_LO, I_SEED_HI, I_SEQ_INDEX, I_MIN_TOKENS, I_NUM_STOP = range(6)
NUM_I = 6


class SamplingState:
    """Sampling parameters and penalty state of every slot, on the device, with host mirrors."""

    def __init__(self, max_batch_size: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.max_batch_size = max_batch_size
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        b = max_batch_size
        self.floats = torch.zeros(b, NUM_F, dtype=torch.float32, device=self.device)
        self.ints = torch.zeros(b, NUM_I, dtype=torch.int64, device=self.device)
        # Host mirrors, indexed by slot. top_k is normalised: V means "off" (also for greedy slots).
        self.temperature = np.zeros(b, np.float32)
        self.top_k = np.full(b, vocab_size, np.int64)
        self.top_p = np.ones(b, np.float32)
        self.min_p = np.zeros(b, np.float32)
        self.min_tokens = np.zeros(b, np.int64)
        self.num_stop = np.zeros(b, np.int64)
        self.num_logprobs = np.zeros(b, np.int64)
        self.uses_penalties = np.zeros(b, bool)
        self.uses_bias = np.zeros(b, bool)
        # argmax of the raw logits and its own logprob only, whatever the step (min_tokens masks nothing
        # without stop ids): a step of such slots needs no other look at the mirrors
        self.plain_greedy = np.zeros(b, bool)
        # Lazily allocated (None until a request needs them).
        self.counts: torch.Tensor | None = None  # [B, V] int32
        self.prompt_mask: torch.Tensor | None = None  # [B, V] bool
        self.bias: torch.Tensor | None = None  # [B, V] float32
        self.stop_ids: torch.Tensor | None = None  # [B, K] int64

    # ------------------------------------------------------------------ admission
    def apply(self, inits: list[SlotInit]) -> None:
        """Overwrite the slots of ``inits`` (admission or resume). A few H2D copies for the whole list."""
        if not inits:
            return
        for init in inits:
            self._validate(init)
        slots_np = np.array([i.slot for i in inits], np.int64)
        if np.unique(slots_np).size != slots_np.size:
            raise ValueError(f"slot_inits name a slot more than once: {slots_np.tolist()}")
        n = len(inits)
        floats = np.zeros((n, NUM_F), np.float32)
        ints = np.zeros((n, NUM_I), np.int64)
        for j, init in enumerate(inits):
            self._fill_row(init, floats[j], ints[j])
        slots = self._to_device(slots_np)
        self.floats[slots] = self._to_device(floats)
        self.ints[slots] = self._to_device(ints)
        self._apply_penalties(inits, slots)
        self._apply_bias(inits, slots)
        self._apply_stops(inits, slots)

    def _validate(self, init: SlotInit) -> None:
        v = self.vocab_size
        if not 0 <= init.slot < self.max_batch_size:
            raise ValueError(f"SlotInit.slot must be in [0, {self.max_batch_size}), got {init.slot}")
        if not 0 <= init.seed < 2**63:
            raise ValueError(f"SlotInit.seed must be in [0, 2**63), got {init.seed}")
        for name, ids in (
            ("prompt_token_ids", init.prompt_token_ids),
            ("output_token_ids", init.output_token_ids),
            ("stop_ids", init.stop_ids),
            ("params.logit_bias", list(init.params.logit_bias or {})),
        ):
            if ids and not (0 <= min(ids) and max(ids) < v):
                raise ValueError(
                    f"SlotInit for slot {init.slot}: {name} must be token ids in [0, {v}), "
                    f"got min {min(ids)} max {max(ids)}"
                )

    def _fill_row(self, init: SlotInit, f: np.ndarray, i: np.ndarray) -> None:
        p, s, v = init.params, init.slot, self.vocab_size
        greedy = p.greedy
        # Filters do not change an argmax: greedy slots keep them off so they never trigger filter work.
        top_k = v if greedy or p.top_k <= 0 else min(p.top_k, v)
        top_p = 1.0 if greedy else p.top_p
        min_p = 0.0 if greedy else p.min_p
        # Valid float64 values outside float32's normal range (a temperature of 1e-300 or 1e300) would
        # round to 0 or inf on the device and turn the sampler's math into NaN: clamp them into it.
        temperature = 0.0 if greedy else _f32_range(p.temperature)
        f[F_TEMPERATURE], f[F_TOP_P], f[F_MIN_P] = temperature, top_p, min_p
        f[F_REPETITION], f[F_PRESENCE], f[F_FREQUENCY] = (
            _f32_range(p.repetition_penalty),
            p.presence_penalty,
            p.frequency_penalty,
        )
        seed_lo, seed_hi = split_seed(init.seed)
        i[I_TOP_K], i[I_SEED_LO], i[I_SEED_HI] = top_k, seed_lo, seed_hi
        i[I_SEQ_INDEX], i[I_MIN_TOKENS], i[I_NUM_STOP] = init.seq_index, p.min_tokens, len(init.stop_ids)
        self.temperature[s], self.top_k[s], self.top_p[s], self.min_p[s] = temperature, top_k, top_p, min_p
        self.min_tokens[s], self.num_stop[s] = p.min_tokens, len(init.stop_ids)
        self.num_logprobs[s] = p.logprobs or 0
        self.uses_penalties[s] = p.uses_penalties
        self.uses_bias[s] = bool(p.logit_bias)
        self.plain_greedy[s] = (
            greedy
            and not p.logprobs
            and not p.uses_penalties
            and not p.logit_bias
            and (p.min_tokens == 0 or not init.stop_ids)
        )

    def _apply_penalties(self, inits: list[SlotInit], slots: torch.Tensor) -> None:
        users = [i for i in inits if i.params.uses_penalties]
        if self.counts is None:
            if not users:
                return
            b, v = self.max_batch_size, self.vocab_size
            self.counts = torch.zeros(b, v, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(b, v, dtype=torch.bool, device=self.device)
        assert self.prompt_mask is not None
        # index_fill_ takes the value as a kernel argument: `t[slots] = 0` would first copy a CPU
        # scalar to the device from pageable memory, which waits for all queued work.
        self.counts.index_fill_(0, slots, 0)
        self.prompt_mask.index_fill_(0, slots, False)
        if not users:
            return
        out_rows, out_ids = _flatten([(i.slot, i.output_token_ids) for i in users])
        if out_ids.size:
            ones = torch.ones(out_ids.size, dtype=torch.int32, device=self.device)
            index = (self._to_device(out_rows), self._to_device(out_ids))
            self.counts.index_put_(index, ones, accumulate=True)
        p_rows, p_ids = _flatten([(i.slot, i.prompt_token_ids) for i in users])
        if p_ids.size:
            index = (self._to_device(p_rows), self._to_device(p_ids))
            self.prompt_mask.index_put_(index, torch.ones(p_ids.size, dtype=torch.bool, device=self.device))

    def _apply_bias(self, inits: list[SlotInit], slots: torch.Tensor) -> None:
        users = [i for i in inits if i.params.logit_bias]
        if self.bias is None:
            if not users:
                return
            b, v = self.max_batch_size, self.vocab_size
            self.bias = torch.zeros(b, v, dtype=torch.float32, device=self.device)
        self.bias.index_fill_(0, slots, 0.0)
        if not users:
            return
        rows, ids = _flatten([(i.slot, list(i.params.logit_bias or {})) for i in users])
        vals = np.array([b for i in users for b in (i.params.logit_bias or {}).values()], np.float32)
        # dict keys are unique per slot, so no index is written twice
        self.bias[self._to_device(rows), self._to_device(ids)] = self._to_device(vals)

    def _apply_stops(self, inits: list[SlotInit], slots: torch.Tensor) -> None:
        need = max(len(i.stop_ids) for i in inits)
        if self.stop_ids is None or self.stop_ids.shape[1] < need:
            if need == 0:
                return
            old = self.stop_ids
            self.stop_ids = torch.zeros(self.max_batch_size, need, dtype=torch.int64, device=self.device)
            if old is not None:
                # widen by repeating each row's first id (keeps the padding invariant)
                self.stop_ids[:, : old.shape[1]] = old
                self.stop_ids[:, old.shape[1] :] = old[:, :1]
        k = self.stop_ids.shape[1]
        rows = np.zeros((len(inits), k), np.int64)
        for j, init in enumerate(inits):
            ids = list(init.stop_ids)
            if ids:
                rows[j] = ids + [ids[0]] * (k - len(ids))
        self.stop_ids[slots] = self._to_device(rows)

    # ------------------------------------------------------------------ per step
    def record_sampled(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the sampled tokens (slots, tokens: [R] int64) once penalty state exists."""
        if self.counts is not None:
            ones = torch.ones_like(tokens, dtype=torch.int32)
            self.counts.index_put_((slots, tokens), ones, accumulate=True)

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            # From pinned memory the copy is asynchronous. A copy from pageable memory would wait for
            # the device to finish all queued work, stalling the launch of every step that admits a
            # request (and with it overlap scheduling). The caching host allocator keeps the pinned
            # block alive until its copy is done.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


def _flatten(pairs: list[tuple[int, list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """[(slot, ids)] -> (row index per id, ids), both int64 [sum of lengths]."""
    rows = np.concatenate([np.full(len(ids), s, np.int64) for s, ids in pairs] or [np.zeros(0, np.int64)])
    ids = np.concatenate([np.asarray(ids, np.int64) for _, ids in pairs] or [np.zeros(0, np.int64)])
    return rows, ids


_F32 = np.finfo(np.float32)


def _f32_range(x: float) -> float:
    """A positive value clamped into float32's normal range."""
    return min(max(x, float(_F32.tiny)), float(_F32.max))
