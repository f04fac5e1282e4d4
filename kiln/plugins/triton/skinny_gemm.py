"""y = x @ w.T for a few rows of x (decode at small batch): the weight streamed once through the MMAs.

At batch 1-8 a linear layer is a pass over its weight matrix. The first version multiplied every
row in registers ([rows, BLOCK_N, BLOCK_K] products and a reduction per K tile) and lost to cuBLAS
end to end on an H100 (docs/kernels.md). This one is a GEMM tile whose rows
are x's few rows padded to ``BLOCK_M`` = 16 (masked loads, so the padding reads nothing): each program
owns ``BLOCK_N`` output columns, streams ``[BLOCK_K, BLOCK_N]`` tiles of w^T (contiguous along K,
16-byte loads) through ``tl.dot``, and Triton's software pipeline keeps ``num_stages`` tiles in flight
per program. Column tiles are as wide as still gives ~2 waves of programs; only when even 16-column
tiles do not fill one wave is K split, with fp32 partials summed by a second launch.

The ``skinny_linear`` plugin (opt-in: ``LLM(..., plugins={"linear": "skinny_linear"})``) uses it;
``scripts/bench_skinny_gemm.py`` times it against cuBLAS on a model's shapes. On an H100 it loses on
every one at one row (0.23-0.85x, docs/kernels.md): it stays opt-in.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.plugins.triton._common import dot_precision, num_sms

MAX_ROWS = 8  # rows of x the kernel serves; larger batches belong to cuBLAS
_BLOCK_M = 16  # the MMA's smallest row count; rows past M are masked to zero
_TARGET_WAVES = 2
_MIN_K_PER_SPLIT = 512  # a split shorter than this spends more on its partials than it saves


# What the kernel applies to x's rows on the way in (each value computed where it is loaded, so the
# separate norm or activation launch and its round trip through memory disappear):
_PLAIN, _ADD_RMS_NORM, _SILU_MUL = 0, 1, 2


@triton.jit(do_not_specialize=["k_per_split"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, part_ptr, res_ptr, norm_w_ptr, res_out_ptr,
    M, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_rm, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, PROLOGUE: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if PROLOGUE == 1:
        # rms of each row of x + residual (rounded to x's dtype, as the unfused op keeps it), over all of K
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = m_ok[:, None] & (k0 + rk < K)[None, :]
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=ok, other=0.0)
            rs = tl.load(res_ptr + rm[:, None] * stride_rm + (k0 + rk)[None, :], mask=ok, other=0.0)
            hf = (xs + rs).to(tl.float32)
            sq += tl.sum(hf * hf, axis=1)
        inv_rms = 1.0 / tl.sqrt(sq / K + eps)
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + (k_lo + rk)[:, None]  # w^T: [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + rk < k_hi
        ok = m_ok[:, None] & k_ok[None, :]
        if PROLOGUE == 2:  # x is gate | up, each K wide: silu in fp32 rounded, the product in x's dtype
            g = tl.load(x_rows + (k0 + rk)[None, :], mask=ok, other=0.0)
            u = tl.load(x_rows + (K + k0 + rk)[None, :], mask=ok, other=0.0)
            gf = g.to(tl.float32)
            x = (gf / (1.0 + tl.exp(-gf))).to(g.dtype) * u
        else:
            x = tl.load(x_rows + (k0 + rk)[None, :], mask=ok, other=0.0)
            if PROLOGUE == 1:
                h = x + tl.load(res_ptr + rm[:, None] * stride_rm + (k0 + rk)[None, :], mask=ok, other=0.0)
                if pid_n == 0:  # one column of programs writes the new residual
                    tl.store(res_out_ptr + rm[:, None] * stride_rm + (k0 + rk)[None, :], h, mask=ok)
                nw = tl.load(norm_w_ptr + k0 + rk, mask=k_ok, other=0.0)
                x = (h.to(tl.float32) * inv_rms[:, None]).to(h.dtype) * nw[None, :]
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        w_ptrs += BLOCK_K
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


def plan(n: int, k: int, sms: int) -> tuple[int, int]:
    """(BLOCK_N, K splits) for an [N, K] weight: the widest column tile that still gives ~2 waves of
    programs; K split only when 16-column tiles do not fill one wave."""
    target = _TARGET_WAVES * sms
    for block_n in (64, 32):
        if triton.cdiv(n, block_n) >= target:
            return block_n, 1
    tiles = triton.cdiv(n, 16)
    if tiles >= sms:  # a wave or more: a split's partials and their sum cost more than they add
        return 16, 1
    return 16, max(1, min(triton.cdiv(target, tiles), k // _MIN_K_PER_SPLIT))


def skinny_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS), w [N, K], both contiguous along K -> x @ w.T, [M, N] in x's dtype.
    The keyword arguments override the plan, for tests and tuning (scripts/bench_skinny_gemm.py)."""
    _check(x, w, w.shape[-1], "x [M, K]")
    return _launch(x, w, _PLAIN, x.shape[1], num_splits=num_splits, block_n=block_n, block_k=block_k,
                   num_warps=num_warps, num_stages=num_stages)[0]  # fmt: skip


def add_rms_norm_skinny_gemm(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    w: torch.Tensor,
    **tuning: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) @ w.T, x + residual): ``fused_add_rms_norm`` then the product in one launch,
    with the unfused ops' roundings. x, residual [M, K]; norm_weight [K]; w [N, K]."""
    _check(x, w, w.shape[-1], "x [M, K]")
    if residual.shape != x.shape or residual.stride() != x.stride() or norm_weight.shape != (x.shape[1],):
        raise ValueError(
            f"need residual shaped and strided like x {tuple(x.shape)} and norm_weight [{x.shape[1]}], got "
            f"{tuple(residual.shape)} (strides {residual.stride()}) and {tuple(norm_weight.shape)}"
        )
    out, res_out = _launch(x, w, _ADD_RMS_NORM, x.shape[1], residual=residual, norm_weight=norm_weight,
                           eps=eps, **tuning)  # fmt: skip
    assert res_out is not None
    return out, res_out


def silu_mul_skinny_gemm(gate_up: torch.Tensor, w: torch.Tensor, **tuning: Any) -> torch.Tensor:
    """(silu(gate) * up) @ w.T for gate_up [M, 2K] (gate | up) and w [N, K]: ``silu_and_mul`` then the
    product in one launch, with the unfused ops' roundings."""
    _check(gate_up, w, 2 * w.shape[-1], "gate_up [M, 2K]")
    return _launch(gate_up, w, _SILU_MUL, w.shape[1], **tuning)[0]


def _check(x: torch.Tensor, w: torch.Tensor, x_width: int, x_name: str) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != x_width:
        raise ValueError(
            f"skinny_gemm needs {x_name} and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"skinny_gemm serves 1 to {MAX_ROWS} rows, got {x.shape[0]}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("skinny_gemm needs x and w contiguous along K")


def _launch(
    x: torch.Tensor,
    w: torch.Tensor,
    prologue: int,
    k: int,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    m, n = x.shape[0], w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(residual) if residual is not None else None
    planned_n, planned_splits = plan(n, k, num_sms(x.device))
    block_n = block_n or planned_n
    num_splits = num_splits or planned_splits
    k_per_split = triton.cdiv(triton.cdiv(k, num_splits), block_k) * block_k
    num_splits = triton.cdiv(k, k_per_split)
    part = torch.empty(num_splits if num_splits > 1 else 0, m, n, dtype=torch.float32, device=x.device)
    res = residual if residual is not None else x  # unread without the norm prologue
    _skinny_gemm_kernel[(triton.cdiv(n, block_n), num_splits)](
        x, w, out, part, res, norm_weight if norm_weight is not None else x,
        res_out if res_out is not None else x,
        m, n, k, k_per_split, x.stride(0), w.stride(0), out.stride(0), res.stride(0), eps,
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=num_splits > 1,
        PRECISION=dot_precision(x.dtype), PROLOGUE=prologue, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            part, out, m, n, num_splits, out.stride(0), BLOCK=block
        )
    return out, res_out
