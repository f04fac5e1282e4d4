"""Rotary embedding of q and k fused with the paged KV-cache write, in one pass over q, k and v.

Grid: (tokens, q head blocks + kv head blocks). A program either rotates a block of q heads into the
output, or rotates a block of k heads and copies the matching v heads into the cache slots.
Rounding follows the reference (HF ``q * cos + rotate_half(q) * sin`` in q's dtype): cos/sin are
rounded to q's dtype, every product and the final sum are rounded to q's dtype. The kernel is
compiled with fp fusion off: with it on, the compiler contracts a product into the following add
(an fma) and folds ``.to(dtype).to(float32)`` round trips, dropping roundings the reference does
(seen on an H200: ~22% of fp16 outputs one ulp off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from kiln.plugins.triton._common import (
    check_last_dim_contiguous,
    next_pow2,
    pdl_args,
    pdl_trigger,
    pdl_wait,
)

# Elements of one half-head tile a program holds (BLOCK_H heads x HALF_P2 columns).
_TILE_ELEMS = 2048


@triton.jit
def _rotate(x1, x2, cos, sin):
    """x1/x2 [BLOCK_H, HALF_P2] and cos/sin [HALF_P2], all in the input dtype."""
    c, s = cos[None, :], sin[None, :]
    # products rounded to the dtype (native multiply), difference/sum in fp32 rounded once: as torch
    o1 = (x1 * c).to(tl.float32) - (x2 * s).to(tl.float32)
    o2 = (x2 * c).to(tl.float32) + (x1 * s).to(tl.float32)
    return o1.to(x1.dtype), o2.to(x1.dtype)


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, qo_ptr,
    num_q_heads, num_kv_heads, block_size,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch, stride_qot, stride_qoh,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    d = tl.arange(0, HALF_P2)
    d_ok = d < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d_ok, other=0.0).to(dt)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=d_ok, other=0.0).to(dt)
    if hb < num_q_blocks:
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (h < num_q_heads)[:, None] & d_ok[None, :]
        src = q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :]
        o1, o2 = _rotate(tl.load(src, mask=m, other=0.0), tl.load(src + HALF, mask=m, other=0.0), cos, sin)
        dst = qo_ptr + t * stride_qot + h[:, None] * stride_qoh + d[None, :]
        tl.store(dst, o1, mask=m)
        tl.store(dst + HALF, o2, mask=m)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        keep = slot >= 0  # slot -1: padded or already-cached token; nothing is written
        slot = tl.where(keep, slot, 0)
        blk, off = slot // block_size, slot % block_size
        h = (hb - num_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (h < num_kv_heads)[:, None] & d_ok[None, :] & keep
        src = k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :]
        o1, o2 = _rotate(tl.load(src, mask=m, other=0.0), tl.load(src + HALF, mask=m, other=0.0), cos, sin)
        kdst = kc_ptr + blk * stride_kcb + off * stride_kco + h[:, None] * stride_kch + d[None, :]
        tl.store(kdst, o1.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(kdst + HALF, o2.to(kc_ptr.dtype.element_ty), mask=m)
        vsrc = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
        vdst = vc_ptr + blk * stride_vcb + off * stride_vco + h[:, None] * stride_vch + d[None, :]
        v1 = tl.load(vsrc, mask=m, other=0.0)
        v2 = tl.load(vsrc + HALF, mask=m, other=0.0)
        tl.store(vdst, v1.to(vc_ptr.dtype.element_ty), mask=m)
        tl.store(vdst + HALF, v2.to(vc_ptr.dtype.element_ty), mask=m)


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], positions [T], cos_sin_cache [max_pos, D] (cos | sin),
    k_cache/v_cache [num_blocks, block_size, Hkv, D], slot_mapping [T] (-1 = skip).
    Writes rotated k and v into the caches in place; returns rotated q [T, Hq, D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [T, Hkv, D] = [{num_tokens}, Hkv, {head_dim}] like q, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if head_dim % 2 != 0:
        raise ValueError(f"rotary embedding needs an even head dim, got {head_dim}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be [max_pos, {head_dim}] (cos | sin), got {tuple(cos_sin_cache.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(
            f"positions and slot_mapping must be [{num_tokens}], "
            f"got {tuple(positions.shape)} and {tuple(slot_mapping.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v), ("cos_sin_cache", cos_sin_cache),
                    ("k_cache", k_cache), ("v_cache", v_cache)):  # fmt: skip
        check_last_dim_contiguous(name, t)
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    half_p2 = next_pow2(half)
    block_h = max(1, min(next_pow2(max(num_q_heads, num_kv_heads)), _TILE_ELEMS // half_p2))
    grid = (num_tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_kv_heads, block_h))
    wrap_triton(_rope_kv_write_kernel)[grid](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q_out,
        num_q_heads, num_kv_heads, k_cache.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q_out.stride(0), q_out.stride(1),
        HALF=half, HALF_P2=half_p2, BLOCK_H=block_h,
        num_warps=4 if block_h * half_p2 >= 1024 else 2,
        enable_fp_fusion=False,  # keep every rounding of the reference (no fma contraction)
        **pdl_args(q.device),
    )  # fmt: skip
    return q_out
