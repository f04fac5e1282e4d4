"""Rotary embedding of q and k fused with writing k and v into the paged KV cache."""

from __future__ import annotations

import torch

from kiln.plugins.registry import Plugin, plugin

ROPE_KV_WRITE_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos_sin_cache, "
    "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> Tensor"
)


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D/2] in x's dtype. Half-split ("neox", HF rotate_half) rotation."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    # Same operation order as HF's q * cos + rotate_half(q) * sin, so bf16 results match bit for bit.
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@plugin("rope_kv_write", kind="rope_kv_write")
class RopeKvWrite(Plugin):
    """q [T, Hq, D], k/v [T, Hkv, D], positions [T] int64, cos_sin_cache [max_pos, D] float32
    (cos in the first D/2 columns, sin in the rest), k_cache/v_cache [num_blocks, block_size, Hkv, D],
    slot_mapping [T] int64 (block * block_size + offset; -1 = do not write).
    Writes rotated k and v into the caches; returns rotated q."""

    schema = ROPE_KV_WRITE_SCHEMA
    mutates_args = ("k_cache", "v_cache")

    def shape_dtype_inference(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
        return torch.empty_like(q)

    def forward(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
        from kiln.plugins.triton.rope_kv_write import rope_kv_write

        return rope_kv_write(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)

    def reference(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
        half = q.shape[-1] // 2
        cs = cos_sin_cache[positions]  # [T, D]
        cos, sin = cs[:, :half].to(q.dtype), cs[:, half:].to(q.dtype)
        q_rot = rotate_neox(q, cos, sin)
        k_rot = rotate_neox(k, cos, sin)
        keep = slot_mapping >= 0
        flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        idx = slot_mapping[keep]
        flat_k[idx] = k_rot[keep].to(k_cache.dtype)
        flat_v[idx] = v[keep].to(v_cache.dtype)
        return q_rot
