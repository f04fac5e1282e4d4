"""The default token budget of a step on a GPU: whole GEMM waves of the card.

An engine built or started with no ``max_num_tokens`` gets it: ``kiln build`` asks the GPU beside it and
records it in the plan; ``LLM`` on a checkpoint (and ``kiln serve``) asks in the engine's own process,
so the front end never opens a CUDA context, and learns it from the engine's start-up info.

A prefill or mixed step's projections are cuBLAS GEMMs over the step's rows, tiled 128 rows by up to 256
columns, one tile an SM at a time. 64 x SMs rows make half as many row tiles as the card has SMs, so a
projection whose width is an even number of 256-column tiles (all of Llama-3's) runs in whole
waves, with no part-empty last wave. On an H100 (132 SMs) the budget near 8,192 of that form is 8,448:
an 8B layer's four projections took 5,254 us at 8,448 rows against 5,307 at 8,192, and 2048/128 ran
1.5-2.4% faster end to end (benchmarks/RESULTS.md, 2026-11-28). Without a GPU to ask, 8,192.
"""

from __future__ import annotations

import torch

BASE_TOKENS = 8192  # the budget the rounding starts from (TensorRT-LLM's default max_num_tokens too)
ROWS_PER_SM = 64  # half a 128-row tile an SM: row tiles = SMs / 2


def whole_wave_budget(sm_count: int, base: int = BASE_TOKENS) -> int:
    """The multiple of ``ROWS_PER_SM`` x ``sm_count`` nearest ``base`` (at least one)."""
    if sm_count < 1:
        raise ValueError(f"sm_count must be >= 1, got {sm_count}")
    unit = ROWS_PER_SM * sm_count
    return unit * max(1, round(base / unit))


def default_max_num_tokens(target: torch.device, max_batch_size: int = 1) -> int:
    """The default budget of an engine for ``target``: whole waves when that GPU is here, else 8,192;
    never below ``max_batch_size`` (every running sequence decodes in one step)."""
    if target.type != "cuda" or not torch.cuda.is_available():
        return max(BASE_TOKENS, max_batch_size)
    index = target.index if target.index is not None else torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    unit = ROWS_PER_SM * sms
    return max(whole_wave_budget(sms), -(-max_batch_size // unit) * unit)
