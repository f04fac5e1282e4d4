"""Small helpers shared by the Triton kernels: launch heuristics, precision choices, and programmatic
dependent launch."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

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


def env_ints(name: str, count: int) -> tuple[int, ...] | None:
    """A tuning override from the environment: ``count`` colon-separated non-negative ints (0: the
    planner's choice), or None when ``name`` is unset. Read at launch, so a CUDA graph captured after
    setting it carries it (``scripts/decode_variants.py`` times settings in turn that way)."""
    raw = os.environ.get(name)
    if not raw:
        return None
    parts = raw.split(":")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or min(values) < 0:
        raise ValueError(f"{name} must be {count} colon-separated non-negative integers, got {raw!r}")
    return values


# ------------------------------------------------------------------ programmatic dependent launch
# On a Hopper or newer card (unless KILN_PDL=0), the decode path's kernels launch with programmatic
# dependent launch: a kernel may start while the one before it in the stream is still running, and
# waits on the device (``pdl_wait``) before it touches anything that kernel may write or read. Each
# kernel lets its successor launch at its own start (``pdl_trigger``): the successor's programs then
# sit ready and the launch latency between two kernels (about 1-3 us inside a CUDA graph) overlaps
# the first's work. A kernel must call ``pdl_wait`` before any load of data another kernel writes and
# before any store (a buffer it writes may still be read by the kernel before it); loads of weights,
# which no kernel writes, may come before it.
PDL_ENV = "KILN_PDL"


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch: NVIDIA sm90+, unless
    ``KILN_PDL=0`` (on an H100: 1B bs 1 +4.3%, 8B 128/128 +1.2%, benchmarks/RESULTS.md)."""
    if device.type != "cuda" or torch.version.hip is not None or os.environ.get(PDL_ENV, "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index) >= (9, 0)


def pdl_args(device: torch.device) -> dict[str, Any]:
    """A kernel's ``PDL`` constexpr and, when on, its launch option (none when off: the interpreter
    takes none)."""
    return {"PDL": True, "launch_pdl": True} if pdl(device) else {"PDL": False}


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
