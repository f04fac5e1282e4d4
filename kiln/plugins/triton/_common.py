"""Small helpers shared by the Triton kernels: launch heuristics and precision choices."""

from __future__ import annotations

import functools

import torch
import triton

# Elements one program of an elementwise/row kernel handles per tile: large enough to hide latency,
# small enough to stay in registers.
MAX_ROW_BLOCK = 8192


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must stay exact: Triton's default tl.dot precision for fp32 is TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a fixed stand-in on the CPU (interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


@functools.cache
def _cuda_shared_memory(index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])  # the opt-in maximum


def max_shared_memory(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (bytes); on the CPU (interpreter) an H100's."""
    if device.type == "cuda":
        return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())
    return 227 * 1024


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")


def row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel over ``block`` elements."""
    return 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8
