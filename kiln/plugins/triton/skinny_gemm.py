"""y = x @ w.T for a few rows of x (decode at small batch): a split-K kernel that streams the weight once.

At batch 1-8 a linear layer is a pass over its weight matrix; the profile of a decode step showed
cuBLAS's small-M kernels reading the 1B model's QKV and O weights at 1.8 TB/s and the 8B's at
3.0-3.2 TB/s on an H200 (4.2-4.4 TB/s for the large gate/up and LM-head matrices). Here every
program owns ``BLOCK_N`` output columns and a ``1 / split`` share of K, loads the matching weight
tile once (contiguous along K) and applies it to all rows of x; with several K splits, fp32
partials are summed by a second launch. Splits are chosen so that the grid covers the GPU about
twice even when N is small.

The ``skinny_linear`` plugin (opt-in: ``LLM(..., plugins={"linear": "skinny_linear"})``) uses it;
``scripts/bench_skinny_gemm.py`` times it against cuBLAS on a model's shapes, and it becomes the
default only where it measurably wins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.plugins.triton._common import next_pow2, num_sms

MAX_ROWS = 8  # rows of x the kernel serves; larger batches belong to cuBLAS
_TARGET_WAVES = 2
_ELEMS_PER_TILE = 8192  # M_P2 * BLOCK_N * BLOCK_K products per program and iteration (64 per thread)


@triton.jit(do_not_specialize=["k_per_split"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, part_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
    M_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, M_P2)
    m_ok = rm < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([M_P2, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BK]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [M_P2, BK]  # fmt: skip
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        part = part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(part, acc, mask=mask)
    else:
        out = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, M, N, num_splits, stride_om, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(part_ptr + s * M * N + offs, mask=ok, other=0.0)
    m = offs // N
    n = offs % N
    tl.store(out_ptr + m * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=ok)


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, *, num_splits: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS), w [N, K], both contiguous along K -> x @ w.T, [M, N] in x's dtype."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"skinny_gemm needs x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"skinny_gemm serves 1 to {MAX_ROWS} rows, got {x.shape[0]}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("skinny_gemm needs x and w contiguous along K")
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    m_p2 = next_pow2(m)
    # the [M_P2, BLOCK_N, BLOCK_K] products of one iteration stay in registers: fewer K per row as M grows
    block_n = 32 if m_p2 == 1 else 16
    block_k = min(next_pow2(k), max(32, _ELEMS_PER_TILE // (m_p2 * block_n)))
    tiles_n = triton.cdiv(n, block_n)
    if num_splits is None:
        num_splits = max(
            1, min(triton.cdiv(_TARGET_WAVES * num_sms(x.device), tiles_n), triton.cdiv(k, block_k))
        )
    k_per_split = triton.cdiv(triton.cdiv(k, num_splits), block_k) * block_k
    num_splits = triton.cdiv(k, k_per_split)
    part = torch.empty(num_splits if num_splits > 1 else 0, m, n, dtype=torch.float32, device=x.device)
    _skinny_gemm_kernel[(tiles_n, num_splits)](
        x, w, out, part, m, n, k, k_per_split, x.stride(0), w.stride(0), out.stride(0),
        M_P2=m_p2, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=num_splits > 1, num_warps=4,
    )  # fmt: skip
    if num_splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            part, out, m, n, num_splits, out.stride(0), BLOCK=block
        )
    return out
