"""Kernel timing for the benchmark scripts: CUDA-graph replays timed with CUDA events, so a
measurement holds the device's time and none of the host's launches."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch


def graph_replay_us(fn: Callable[[], Any], iters: int, calls: int = 1, warmup: int = 3) -> float:
    """Microseconds a call of ``fn``: the median over ``iters`` replays of a CUDA graph of ``calls``
    back-to-back calls, captured after ``warmup`` eager calls (compiles, autotuning, allocations)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)
