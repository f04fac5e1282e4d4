"""Benchmark workloads: lists of (prompt token ids, output length), deterministic from a seed.

Every request ignores EOS, so each produces exactly its output length and the work done is a
property of the workload alone, never of the (random) weights.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]  # token ids per request
    output_lens: list[int]  # tokens each request must generate (EOS ignored)
    temperature: float = 0.0
    max_model_len: int | None = None  # the context limit the workload was designed for, if any
    params: dict[str, object] = field(default_factory=dict)  # how it was made, for the report

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.output_lens):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.output_lens)} output lengths")
        if not self.prompts:
            raise ValueError("a workload needs at least one request")

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def num_input_tokens(self) -> int:
        return sum(self.input_lens)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_seq_len(self) -> int:
        """Longest prompt + output of any request: the context the engine must hold."""
        return max(len(p) + o for p, o in zip(self.prompts, self.output_lens, strict=True))

    def subsample(self, n: int) -> Workload:
        """The first ``n`` requests (the whole workload when ``n`` >= its size)."""
        if n >= self.num_requests:
            return self
        return Workload(
            self.name,
            self.prompts[:n],
            self.output_lens[:n],
            self.temperature,
            self.max_model_len,
            {**self.params, "subsample_of": self.num_requests},
        )

    def summary(self) -> dict[str, object]:
        il, ol = self.input_lens, self.output_lens
        return {
            "name": self.name,
            "num_requests": self.num_requests,
            "input_tokens": self.num_input_tokens,
            "output_tokens": self.num_output_tokens,
            "input_len_min_mean_max": [min(il), round(sum(il) / len(il), 1), max(il)],
            "output_len_min_mean_max": [min(ol), round(sum(ol) / len(ol), 1), max(ol)],
            "temperature": self.temperature,
            "max_model_len": self.max_model_len,
            **self.params,
        }


def _lengths(rng: np.random.Generator, n: int, mean: int, stdev: float, name: str) -> np.ndarray:
    if mean < 1:
        raise ValueError(f"{name} must be >= 1, got {mean}")
    if stdev < 0:
        raise ValueError(f"{name} stdev must be >= 0, got {stdev}")
    if stdev == 0:
        return np.full(n, mean, dtype=np.int64)
    # Normal around the mean, rounded, at least 1 token and at most twice the mean (no huge outliers).
    return np.clip(np.rint(rng.normal(mean, stdev, size=n)), 1, 2 * mean).astype(np.int64)


def synthetic(
    num_requests: int,
    isl: int,
    osl: int,
    vocab_size: int,
    isl_stdev: float = 0.0,
    osl_stdev: float = 0.0,
    seed: int = 0,
    temperature: float = 0.0,
) -> Workload:
    """Random-token prompts (seeded numpy): input lengths ~ N(isl, isl_stdev), output ~ N(osl, osl_stdev).

    Token ids are uniform in [0, vocab_size); the engine takes ids directly, so they need not decode
    to anything.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, num_requests, isl, isl_stdev, "isl")
    out_lens = _lengths(rng, num_requests, osl, osl_stdev, "osl")
    prompts = [rng.integers(0, vocab_size, size=int(n)).tolist() for n in in_lens]
    return Workload(
        "synthetic",
        prompts,
        [int(x) for x in out_lens],
        temperature=temperature,
        params={"isl": isl, "osl": osl, "isl_stdev": isl_stdev, "osl_stdev": osl_stdev, "seed": seed},
    )


NANO_VLLM_NUM_SEQS = 256
NANO_VLLM_MAX_LEN = 1024


def nano_vllm() -> Workload:
    """The workload of nano-vllm's ``bench.py``: 256 requests, lengths uniform in [100, 1024].

    Python's ``random`` seeded with 0, drawn in nano-vllm's order: each prompt's length then its
    token ids (uniform in [0, 10000]), prompt after prompt; then the 256 output lengths. This order
    reproduces its published total of 133,966 output tokens. Temperature 0.6, EOS ignored, a
    context limit (max_model_len) of 4096.
    """
    rnd = random.Random(0)
    prompts = [
        [rnd.randint(0, 10000) for _ in range(rnd.randint(100, NANO_VLLM_MAX_LEN))]
        for _ in range(NANO_VLLM_NUM_SEQS)
    ]
    output_lens = [rnd.randint(100, NANO_VLLM_MAX_LEN) for _ in range(NANO_VLLM_NUM_SEQS)]
    return Workload("nano-vllm", prompts, output_lens, temperature=0.6, max_model_len=4096)


WORKLOADS = ("synthetic", "nano-vllm")
