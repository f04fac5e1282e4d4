"""Engine configuration: frozen dataclasses, validated here and nowhere else."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_device_name(device: object) -> str:
    """``device`` if it names a device kiln runs on ("cpu", "cuda" or "cuda:N"); whether it is present is
    the caller's question (an engine may be built for a GPU on a machine without one)."""
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


@dataclass(frozen=True)
class KvCacheConfig:
    """How the paged KV cache is sized and shared.

    ``max_tokens`` caps the pool (in tokens); otherwise the pool takes ``free_gpu_memory_fraction`` of
    the device memory left after weights and a warm-up step (on the CPU a fixed default).
    """

    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None
    enable_block_reuse: bool = True
    tokens_per_block: int = 32

    def __post_init__(self) -> None:
        _check(
            0 < self.free_gpu_memory_fraction <= 1,
            f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction}",
        )
        _check(
            self.max_tokens is None or self.max_tokens >= self.tokens_per_block,
            f"max_tokens must be None or >= tokens_per_block ({self.tokens_per_block}), "
            f"got {self.max_tokens}",
        )
        _check(
            self.tokens_per_block in (8, 16, 32, 64, 128),
            f"tokens_per_block must be one of 8, 16, 32, 64, 128, got {self.tokens_per_block}",
        )


SchedulerPolicy = Literal["guaranteed_no_evict", "max_utilization"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Admission policy.

    ``guaranteed_no_evict`` admits a request only when the KV blocks for its whole budget
    (prompt + max_tokens) are free, so nothing is ever preempted. ``max_utilization`` admits greedily
    and preempts the newest running request (recomputed later) when blocks run out.
    """

    policy: SchedulerPolicy = "guaranteed_no_evict"

    def __post_init__(self) -> None:
        _check(
            self.policy in ("guaranteed_no_evict", "max_utilization"),
            f"policy must be 'guaranteed_no_evict' or 'max_utilization', got {self.policy!r}",
        )


@dataclass(frozen=True)
class EngineLimits:
    """Static sizes of the engine, fixed when it is built."""

    max_batch_size: int = 256
    max_num_tokens: int = 8192
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        _check(self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}")
        _check(self.max_num_tokens >= 1, f"max_num_tokens must be >= 1, got {self.max_num_tokens}")
        _check(self.max_seq_len >= 2, f"max_seq_len must be >= 2, got {self.max_seq_len}")
        _check(
            self.max_num_tokens >= self.max_batch_size,
            f"max_num_tokens ({self.max_num_tokens}) must be >= max_batch_size ({self.max_batch_size}) "
            "so that every running request can decode in one step",
        )
