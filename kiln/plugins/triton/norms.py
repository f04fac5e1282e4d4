"""RMSNorm and residual-add + RMSNorm as one-pass Triton kernels (one program per row).

Rounding follows the reference (HF LlamaRMSNorm): the sum of squares accumulates in fp32, the
normalised row is cast to x's dtype, then multiplied by the weight (product in fp32, rounded once).
The fused variant first rounds ``x + residual`` to x's dtype, exactly as ``torch.add`` does.
Those roundings are done by operating in x's dtype (the add, the weight product), and the kernel
is compiled with fp fusion off so that no rounding is contracted or folded away (see
docs/kernels.md, "Rounding in Triton").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from kiln.plugins.triton._common import (
    MAX_ROW_BLOCK,
    check_last_dim_contiguous,
    next_pow2,
    pdl_args,
    pdl_trigger,
    pdl_wait,
    row_warps,
)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_cols, stride_x, stride_res, stride_out, stride_res_out, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    res_row = res_ptr + row * stride_res
    res_out_row = res_out_ptr + row * stride_res_out
    cols = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        # The whole row lives in registers: read once, write once.
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_row + cols, mask=mask, other=0.0)
            x = x + r  # one rounding to the dtype, like torch.add
            tl.store(res_out_row + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (xf * inv_rms).to(x.dtype) * w  # normalised value rounded, then the weight product rounded
        tl.store(out_row + cols, y, mask=mask)
    else:
        # Rows wider than one tile: a sum-of-squares sweep, then a normalising sweep (from L2).
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_row + c, mask=mask, other=0.0)
                x = x + r
                tl.store(res_out_row + c, x, mask=mask)
            xf = x.to(tl.float32)
            acc += xf * xf
        inv_rms = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            if HAS_RESIDUAL:
                x = tl.load(res_out_row + c, mask=mask, other=0.0)
            else:
                x = tl.load(x_row + c, mask=mask, other=0.0)
            w = tl.load(w_ptr + c, mask=mask, other=0.0)
            y = (x.to(tl.float32) * inv_rms).to(x.dtype) * w
            tl.store(out_row + c, y, mask=mask)


def _as_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [N, H] view (a copy only when the leading dims cannot be merged)."""
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _launch(x, residual, weight, eps):
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(
            f"weight must have shape ({hidden},) to match x [..., {hidden}], got {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        # the reference would promote the output to the weight's dtype; the op returns x's dtype
        raise ValueError(f"weight dtype ({weight.dtype}) must match x's dtype ({x.dtype})")
    check_last_dim_contiguous("weight", weight)
    x2 = _as_rows("x", x)  # [N, H]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x in shape and dtype: x {tuple(x.shape)} {x.dtype}, "
                f"residual {tuple(residual.shape)} {residual.dtype}"
            )
        r2 = _as_rows("residual", residual)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out2 = res_out.view(-1, hidden)
    else:
        r2, res_out, res_out2 = x2, None, out2  # unused by the kernel (HAS_RESIDUAL=False)
    rows = x2.shape[0]
    if rows > 0 and hidden > 0:
        block = min(next_pow2(hidden), MAX_ROW_BLOCK)
        wrap_triton(_rms_norm_kernel)[(rows,)](
            x2, r2, weight, out2, res_out2,
            hidden, x2.stride(0), r2.stride(0), out2.stride(0), res_out2.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, SINGLE_TILE=block >= hidden,
            num_warps=row_warps(block), enable_fp_fusion=False, **pdl_args(x.device),
        )  # fmt: skip
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in x's dtype."""
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_out = x + residual (rounded to x's dtype); returns (rms_norm(residual_out), residual_out)."""
    out, res_out = _launch(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out
