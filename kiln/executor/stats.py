"""Engine statistics, published by the executor after every step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # used blocks / usable blocks
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which served from it
    num_preemptions: int = 0
    prompt_tokens_total: int = 0  # prompt tokens computed (excluding prefix hits)
    generation_tokens_total: int = 0
    steps: int = 0
    last_step_time: float = 0.0  # seconds, whole step (host + device)
    last_host_time: float = 0.0  # seconds spent outside forward + sampling
    step_time_total: float = 0.0  # seconds over all steps; / steps = mean step period
    host_time_total: float = 0.0  # of which scheduling and updating on the host
    device_wait_total: float = 0.0  # of which waiting for the device's results (~0: the host is the limit)
    decode_steps: int = 0  # steps with generation rows only (the CUDA-graph steps)
    decode_step_time_total: float = 0.0  # their share of step_time_total
    # the other steps (with prompt tokens), each from its scheduling to its results applied: with
    # overlap a step's launch and its results fall in two loop steps, so this is not their step time
    mixed_step_span_total: float = 0.0
    loop_io_time_total: float = 0.0  # engine loop, outside steps: receiving requests, sending updates
    gc_time_total: float = 0.0  # Python's cyclic garbage collector, inside steps and out
    late_kernel_compiles: int = 0  # Triton kernels compiled after start-up (each stalls a step)
    last_batch_size: int = 0
    last_num_tokens: int = 0
