"""SamplingParams: how one request is decoded. Validated at construction, and again when submitted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class SamplingParams:
    """Decoding parameters of one request (names and defaults follow the OpenAI / vLLM convention).

    Greedy decoding is ``temperature=0``. ``top_k`` of 0 or -1 and ``top_p`` of 1.0 disable those filters.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Extra salt mixed into prefix-cache hashes: requests with different salts never share KV blocks.
    cache_salt: str | None = None
    stop_list: list[str] = field(init=False, repr=False)

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field and recompute the derived ones (``stop_list``). The engine calls it again
        when a request is submitted, so a field changed after construction is checked too."""
        self.stop_list = _stop_list(self.stop)
        _check(
            self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)),
            f"stop_token_ids must be None or a list of token ids, got {type(self.stop_token_ids).__name__}",
        )
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(
            _finite(self.temperature) and self.temperature >= 0,
            f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}",
        )
        _check(
            _int(self.top_k) and (self.top_k == -1 or self.top_k >= 0),
            f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}",
        )
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(
            self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**63),
            f"seed must be None or an integer in [0, 2**63), got {self.seed!r}",
        )
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_finite(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v!r}")
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias must be a dict of token id -> bias")
            for tok, bias in self.logit_bias.items():
                _check(_int(tok) and tok >= 0, f"logit_bias keys must be token ids >= 0, got {tok!r}")
                _check(
                    _finite(bias) and -100 <= bias <= 100,
                    f"logit_bias values must be in [-100, 100], got {bias!r} for token {tok}",
                )
        _check(
            _int(self.min_tokens) and self.min_tokens >= 0,
            f"min_tokens must be an integer >= 0, got {self.min_tokens!r}",
        )
        if self.max_tokens is not None:
            _check(
                _int(self.max_tokens) and self.max_tokens >= 1,
                f"max_tokens must be an integer >= 1 (or None for the rest of the context), "
                f"got {self.max_tokens!r}",
            )
            _check(
                self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
            )
        for t in self.stop_token_ids:
            _check(_int(t) and t >= 0, f"stop_token_ids must be token ids >= 0, got {t!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(
                v is None or (_int(v) and 0 <= v <= self.MAX_LOGPROBS),
                f"{name} must be None or an integer in [0, {self.MAX_LOGPROBS}], got {v!r}",
            )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):  # fmt: skip
            v = getattr(self, name)
            _check(isinstance(v, bool), f"{name} must be True or False, got {v!r}")
        _check(
            self.cache_salt is None or isinstance(self.cache_salt, str),
            f"cache_salt must be None or a string, got {self.cache_salt!r}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: object) -> bool:
    """An integer, and not a bool (True would otherwise pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _stop_list(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be None, a string or a list of strings, got {type(stop).__name__}")
    for s in stop:
        _check(isinstance(s, str) and s != "", f"stop strings must be non-empty strings, got {s!r}")
    return list(stop)
