"""The messages that cross component boundaries: small plain dataclasses of flat arrays.

Front end --Request--> executor. Scheduler --ScheduledBatch--> ModelEngine / Decoder.
Decoder --StepOutput--> Scheduler. Executor --SequenceUpdate--> front end.
Nothing here imports torch: the same messages travel between threads and processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.sampling_params import SamplingParams


@dataclass
class Request:
    """One request as the executor sees it: token ids in, ``params.n`` sequences out."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # EOS ids of the model (config + generation_config); ignored when params.ignore_eos.
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = 0.0


@dataclass
class SlotInit:
    """Per-slot decoding state, written once when a sequence takes a slot (admission or resume).

    ``output_token_ids`` is non-empty when a preempted sequence resumes: penalties count them again.
    """

    slot: int
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Key of the counter-based RNG: (seed, seq_index, position) decides every random draw.
    seed: int
    seq_index: int
    # Ids that end the sequence (EOS unless ignore_eos, plus stop_token_ids): masked until min_tokens.
    stop_ids: tuple[int, ...] = ()


@dataclass
class ScheduledBatch:
    """One step's work. Sequences are ordered decode first (one token each), then context chunks.

    Arrays are int32 unless said. ``S`` scheduled sequences, ``T`` packed tokens, ``R`` sampling rows.
    """

    step_id: int
    # --- per scheduled sequence [S]
    seq_ids: np.ndarray  # scheduler's sequence ids
    slots: np.ndarray  # persistent slot (row of the block table and of the sampling state)
    num_computed: np.ndarray  # tokens already in the KV cache before this step (= first position)
    num_new_tokens: np.ndarray  # tokens computed this step
    num_decode: int  # the first num_decode sequences are in generation phase
    # --- packed tokens [T], T = num_new_tokens.sum()
    input_ids: np.ndarray
    # --- block tables: rows live in the engine (by slot) and are appended to, never rebuilt
    block_updates: np.ndarray  # [U, 3] (slot, block index in the row, block id)
    copy_blocks: np.ndarray  # [C, 2] (src block id, dst block id), done before this step's KV writes
    # --- sampling rows [R]: a sequence whose last computed token is the last known token samples.
    #     Forked sequences (n > 1) share the logits row of their parent's last prompt token.
    sample_rows: np.ndarray  # index into [S] of the sequence whose last token's logits are used
    sample_slots: np.ndarray  # slot that receives the sampled token (differs from slots[row] for forks)
    sample_seq_ids: np.ndarray  # sequence that receives the token
    sample_positions: np.ndarray  # position of the token being generated (RNG counter)
    sample_num_output: np.ndarray  # output tokens the receiving sequence has so far (for min_tokens)
    # --- per-slot state to write before sampling
    slot_inits: list[SlotInit] = field(default_factory=list)
    # --- prompt logprobs: indices into [S] of context chunks that want them, and how many top-N
    prompt_logprob_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    prompt_logprob_k: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    # --- overlap: [num_decode] or empty (= every input token is in input_ids). Where >= 0, the input
    #     token of decode row i is row prev_sample_rows[i] of the previous step's sampled tokens, still
    #     on the device when this step was built (input_ids holds -1 there). Where -1: input_ids has it.
    prev_sample_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def reads_prev_samples(self) -> bool:
        """True if some input token must be read from the previous step's sampled tokens."""
        return bool(self.prev_sample_rows.size) and bool((self.prev_sample_rows >= 0).any())

    @property
    def num_seqs(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.sample_slots.shape[0])


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens computed in one chunk: entry i is for token at position start + i + 1."""

    seq_id: int
    start: int  # position of the first token whose *next* token is scored
    token_logprobs: np.ndarray  # [L] float32 logprob of the actual next prompt token
    top_ids: np.ndarray  # [L, K] int32
    top_logprobs: np.ndarray  # [L, K] float32


@dataclass
class StepOutput:
    """What one step produced, after the single device-to-host copy. Rows follow ScheduledBatch.sample_*."""

    step_id: int
    seq_ids: np.ndarray  # [R] int32
    token_ids: np.ndarray  # [R] int32
    logprobs: np.ndarray  # [R] float32 logprob of the sampled token (raw model distribution)
    top_ids: np.ndarray | None = None  # [R, K] int32, K = max logprobs asked in the batch
    top_logprobs: np.ndarray | None = None  # [R, K] float32
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


FinishReason = str  # "stop" | "length" | "abort"


@dataclass
class SequenceUpdate:
    """New tokens of one sequence of one request, sent from the executor to the front end."""

    request_id: str
    seq_index: int
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_top: list[list[tuple[int, float]]] | None = None  # per new token: (token id, logprob), best first
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id that ended it, or a stop string
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when this request failed alone
    first_scheduled_time: float | None = None  # wall clock when the request first got a slot
    rejected: bool = False  # with error: the executor refused the request itself (an input error)
    queued_time: float | None = None  # wall clock when the engine took the request into its queue
