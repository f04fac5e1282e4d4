"""SiLU-and-mul (the gated activation of Llama-style MLPs) as a Triton kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from kiln.plugins.triton._common import next_pow2, pdl_args, pdl_trigger, pdl_wait

# Columns of the output one program writes; a row of I columns takes cdiv(I, BLOCK) programs.
_MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Like torch: silu in fp32 rounded to the input dtype, then the product in the input dtype
    # (launched with fp fusion off, so neither rounding is contracted away)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + cols, act * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (gate | up) -> silu(gate) * up, [..., I] in x's dtype."""
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"silu_and_mul needs x [..., 2I] with an even last dimension, got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])  # [N, 2I]
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)  # [N, I]
    rows = x2.shape[0]
    if rows > 0 and inter > 0:
        block = min(next_pow2(inter), _MAX_BLOCK)
        grid = (rows, triton.cdiv(inter, block))
        wrap_triton(_silu_and_mul_kernel)[grid](
            x2,
            out2,
            inter,
            x2.stride(0),
            out2.stride(0),
            BLOCK=block,
            num_warps=4 if block >= 512 else 2,
            enable_fp_fusion=False,
            **pdl_args(x.device),
        )
    return out
