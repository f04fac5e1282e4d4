"""y = x @ w.T for one row of x (decode at batch 1): a matrix-vector product streaming w once.

At batch 1 a linear layer is a pass over its weight: the bound is its bytes over the memory bandwidth.
No MMA: each program owns ``BLOCK_N`` rows of w (output columns), walks K in ``BLOCK_K`` tiles with
16-byte loads, multiplies by x in fp32 and keeps a [BLOCK_N, BLOCK_K] partial that is reduced once,
after the loop. Weight tiles are loaded "evict first": they are read once, while x (and the residual
and norm weight) stay in L2 for every program.

Two prologues fold the op before a projection into its GEMV, removing that launch and its round trip
through memory:
- ``add_rms_norm``: h = x + residual (program 0 writes it out as the new residual), and the product
  with rms_norm(h) * norm_weight. rms(h) is a scalar of the whole row, so it is accumulated in the same
  pass and applied to the finished dot products: y = (sum_k w[n, k] * h[k] * nw[k]) / rms(h).
- ``silu_mul``: x is gate | up ([2K]); silu(gate) * up is made tile by tile, with the unfused op's
  roundings.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.plugins.triton._common import env_ints, num_sms, pdl_args, pdl_trigger, pdl_wait

_PLAIN, _ADD_RMS_NORM, _SILU_MUL = 0, 1, 2
_MIN_PROGRAMS_PER_SM = 4  # column tiles narrow until this many programs: enough loads in flight per SM
# Under programmatic dependent launch each program fetches the first part of its weight rows before it
# waits on the kernel before it: that kernel (a norm, attention, SiLU-and-mul: 1-10 us on a few SMs) is
# latency-bound and leaves the memory bus idle, and the GEMV's resident programs stream meanwhile.
# By default half of K, at most _PREFETCH_MAX elements: on an H100 the 8B at batch 1 went 178.3 ->
# 182.4 tok/s with 2,048 (benchmarks/RESULTS.md); more costs registers and was slower.
# KILN_GEMV_PREFETCH_K=N (a power of two; 0: one K tile) overrides it, read at each launch as KILN_PDL
# is: launches inside CUDA graphs happen at capture only.
_PREFETCH_MAX = 2048
PREFETCH_ENV = "KILN_GEMV_PREFETCH_K"
# KILN_GEMV_PLAN="BLOCK_N:BLOCK_K:WARPS" (0: the plan's) overrides the plain GEMV's tiles, for end-to-end
# tuning; the isolated sweep times a GEMV without the kernels around it
PLAN_ENV = "KILN_GEMV_PLAN"


@triton.jit
def _x_tile(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, ks, K, pid,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr):  # fmt: skip
    """x's K tile ``ks`` in fp32 after the prologue, and its squares for the norm (zeros without)."""
    k_ok = ks < K
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    if PROLOGUE == 2:  # x is gate | up, each K wide: silu in fp32 rounded, the product in x's dtype
        if EVEN_K:
            g = tl.load(x_ptr + ks)
            u = tl.load(x_ptr + K + ks)
        else:
            g = tl.load(x_ptr + ks, mask=k_ok, other=0.0)
            u = tl.load(x_ptr + K + ks, mask=k_ok, other=0.0)
        gf = g.to(tl.float32)
        x = ((gf / (1.0 + tl.exp(-gf))).to(g.dtype) * u).to(tl.float32)
    else:
        if EVEN_K:
            x = tl.load(x_ptr + ks)
        else:
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0)
        if PROLOGUE == 1:
            if EVEN_K:
                h = x + tl.load(res_ptr + ks)
                nw = tl.load(norm_w_ptr + ks)
            else:
                h = x + tl.load(res_ptr + ks, mask=k_ok, other=0.0)
                nw = tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0)
            if pid == 0:  # one program writes the new residual
                tl.store(res_out_ptr + ks, h, mask=k_ok)
            hf = h.to(tl.float32)
            sq = hf * hf
            x = hf * nw.to(tl.float32)
        else:
            x = x.to(tl.float32)
    return x, sq


@triton.jit
def _w_tile(w_ptrs, ks, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptrs, eviction_policy="evict_first")
    return tl.load(w_ptrs, mask=(ks < K)[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, norm_w_ptr, res_out_ptr, N, K, stride_wn, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    PROLOGUE: tl.constexpr, PDL: tl.constexpr, PRE_K: tl.constexpr, EVEN_PRE: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    if not EVEN_N:  # the last tile re-reads valid rows instead of masking every load
        rn = tl.minimum(rn, N - 1)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    w_ptrs = w_rows + rk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    sq_sum = tl.sum(sq, axis=0)
    k_start = 0
    if PDL:  # the first PRE_K of the weight rows are fetched while the kernel before is still running
        if PRE_K == BLOCK_K:  # one tile: into the loop's partials, summed in the loop's order
            w = _w_tile(w_ptrs, rk, K, EVEN_K)
            pdl_wait(PDL)
            x, sq = _x_tile(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, rk, K, pid, BLOCK_K, EVEN_K, PROLOGUE)
            acc += w.to(tl.float32) * x[None, :]
        else:  # several tiles: one [BLOCK_N, PRE_K] block in registers, reduced on its own
            rp = tl.arange(0, PRE_K)
            w_pre = _w_tile(w_rows + rp[None, :], rp, K, EVEN_PRE)
            pdl_wait(PDL)
            x_pre, psq = _x_tile(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, rp, K, pid, PRE_K, EVEN_PRE,
                                 PROLOGUE)  # fmt: skip
            y = tl.sum(w_pre.to(tl.float32) * x_pre[None, :], axis=1)
            sq_sum = tl.sum(psq, axis=0)
        w_ptrs += PRE_K
        k_start = PRE_K
    for k0 in range(k_start, K, BLOCK_K):
        ks = k0 + rk
        x, x_sq = _x_tile(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, ks, K, pid, BLOCK_K, EVEN_K, PROLOGUE)
        sq += x_sq
        w = _w_tile(w_ptrs, ks, K, EVEN_K)
        acc += w.to(tl.float32) * x[None, :]
        w_ptrs += BLOCK_K
    y += tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y / tl.sqrt((sq_sum + tl.sum(sq, axis=0)) / K + eps)
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def plan(n: int, k: int, sms: int, prologue: int = _PLAIN) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [N, K] weight, K tiles of up to 512 and four warps.

    Plain: one output column a program, the fastest or within 2% of it on every Llama-1B/8B shape
    in a sweep on an H100 (benchmarks/RESULTS.md). With a prologue every program also reads x's
    whole row (and the residual and norm weight) from L2, so columns are grouped, 8 a program with
    K tiles of 1,024 (the sweep's best on four of six shapes, within 4% on the others), fewer where
    that leaves under ``_MIN_PROGRAMS_PER_SM`` programs an SM."""
    if prologue == _PLAIN:
        return 1, min(512, triton.next_power_of_2(k)), 4
    block_n = 1
    for candidate in (8, 4, 2):
        if triton.cdiv(n, candidate) >= _MIN_PROGRAMS_PER_SM * sms:
            block_n = candidate
            break
    return block_n, min(1024, triton.next_power_of_2(k)), 4


def gemv(x: torch.Tensor, w: torch.Tensor, **tuning: Any) -> torch.Tensor:
    """x [1, K], w [N, K], both contiguous along K -> x @ w.T, [1, N] in x's dtype.
    ``tuning`` (block_n, block_k, num_warps, num_stages, prefetch_k) overrides the plan, for tests and
    sweeps."""
    _check(x, w, w.shape[1], "x [1, K]")
    return _launch(x, w, _PLAIN, **tuning)[0]


def add_rms_norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    w: torch.Tensor,
    **tuning: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * norm_weight @ w.T, x + residual) in one launch. x, residual [1, K];
    norm_weight [K]; w [N, K]."""
    _check(x, w, w.shape[1], "x [1, K]")
    if residual.shape != x.shape or residual.stride(1) != 1 or norm_weight.shape != (x.shape[1],):
        raise ValueError(
            f"need residual shaped like x {tuple(x.shape)} (contiguous) and norm_weight [{x.shape[1]}], got "
            f"{tuple(residual.shape)} and {tuple(norm_weight.shape)}"
        )
    out, res_out = _launch(x, w, _ADD_RMS_NORM, residual=residual, norm_weight=norm_weight, eps=eps, **tuning)
    assert res_out is not None
    return out, res_out


def silu_mul_gemv(gate_up: torch.Tensor, w: torch.Tensor, **tuning: Any) -> torch.Tensor:
    """(silu(gate) * up) @ w.T for gate_up [1, 2K] (gate | up) and w [N, K], in one launch."""
    _check(gate_up, w, 2 * w.shape[1], "gate_up [1, 2K]")
    return _launch(gate_up, w, _SILU_MUL, **tuning)[0]


def _check(x: torch.Tensor, w: torch.Tensor, x_width: int, x_name: str) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape != (1, x_width):
        raise ValueError(f"gemv needs {x_name} and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemv needs x and w contiguous along K")
    if x.dtype != w.dtype:
        raise ValueError(f"gemv needs x and w of one dtype, got {x.dtype} and {w.dtype}")


def _launch(
    x: torch.Tensor,
    w: torch.Tensor,
    prologue: int,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
    prefetch_k: int | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, k = w.shape
    planned = plan(n, k, num_sms(x.device), prologue)
    tuned = env_ints(PLAN_ENV, 3) if prologue == _PLAIN else None
    if tuned is not None:  # explicit arguments first, then the environment's, then the plan's
        block_n, block_k, num_warps = block_n or tuned[0], block_k or tuned[1], num_warps or tuned[2]
    block_n, block_k, num_warps = block_n or planned[0], block_k or planned[1], num_warps or planned[2]
    block_k = min(block_k, triton.next_power_of_2(k))
    pre_k = prefetch_block(prefetch_from_env() if prefetch_k is None else prefetch_k, block_k, k)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(residual) if residual is not None else None
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, out, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        res_out if res_out is not None else x, n, k, w.stride(0), eps,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0,
        PROLOGUE=prologue, PRE_K=pre_k, EVEN_PRE=pre_k <= k, num_warps=num_warps, num_stages=num_stages,
        **pdl_args(x.device),
    )  # fmt: skip
    return out, res_out


def prefetch_from_env() -> int | None:
    """KILN_GEMV_PREFETCH_K, or None (unset: the default)."""
    raw = os.environ.get(PREFETCH_ENV, "")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{PREFETCH_ENV} must be 0 (one K tile) or a power of two, got {raw!r}") from None


def prefetch_block(prefetch_k: int | None, block_k: int, k: int) -> int:
    """The K elements a program fetches before its PDL wait: ``prefetch_k`` (0: one tile; None: half of
    K up to ``_PREFETCH_MAX``) as a power of two of at least one tile, at most K rounded up to a power
    of two."""
    if prefetch_k is None:
        prefetch_k = min(_PREFETCH_MAX, triton.next_power_of_2(k) // 2)
    if prefetch_k < 0 or (prefetch_k & (prefetch_k - 1)):
        raise ValueError(f"GEMV prefetch must be 0 (one K tile) or a power of two, got {prefetch_k}")
    return max(block_k, min(prefetch_k, triton.next_power_of_2(k)))
