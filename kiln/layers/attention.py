"""The paged-attention layer: RoPE + KV-cache write (``write_kv``), then attention over the paged
cache (``attend``).

Projections (and q/k norms) belong to the model; this layer only runs the two plugins on
already-projected q, k, v. They are two calls so that piecewise CUDA graphs can capture the KV write
with the projections before it and launch the attention on its own.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from kiln.engine.attention_metadata import AttentionMetadata
from kiln.plugins import PluginSet


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        plugins: PluginSet,
        sliding_window: int = 0,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window  # 0 = full attention
        self.rope_kv_write_op = plugins.rope_kv_write
        self.attention_op = plugins.attention
        self.attention_into = plugins.writer("attention")
        # a writer that can use the step's host-side facts about its fresh prompts gets them
        self._into_takes_fresh = self.attention_into is not None and (
            "fresh_prompts" in inspect.signature(self.attention_into).parameters
        )

    def write_kv(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [num_blocks, block_size, Hkv, D]
        slot_mapping: torch.Tensor,  # [T] int64; < 0: no write
    ) -> torch.Tensor:
        """Writes this step's rotated k and v into the cache, returns rotated q [T, Hq, D]."""
        k_cache, v_cache = kv_cache
        return self.rope_kv_write_op(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)

    def attend(
        self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata
    ) -> torch.Tensor:
        """Rotated q [T, Hq, D] over the paged cache -> [T, Hq, D]."""
        k_cache, v_cache = kv_cache
        return self.attention_op(
            q,
            k_cache,
            v_cache,
            attn.block_tables,
            attn.seq_lens,
            attn.query_start_loc,
            attn.max_query_len,
            attn.max_seq_len,
            self.scale,
            self.sliding_window,
        )  # [T, Hq, D]

    def attend_into(
        self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata,
        out: torch.Tensor,
    ) -> None:  # fmt: skip
        """``attend`` writing into ``out`` [T, Hq, D] (outside compiled code): the plugin's
        ``forward_into`` where it has one, else a copy of ``attend``'s result."""
        if self.attention_into is None:
            out.copy_(self.attend(q, kv_cache, attn))
            return
        k_cache, v_cache = kv_cache
        args = (out, q, k_cache, v_cache, attn.block_tables, attn.seq_lens, attn.query_start_loc,
                attn.max_query_len, attn.max_seq_len, self.scale, self.sliding_window)  # fmt: skip
        if self._into_takes_fresh:
            self.attention_into(*args, fresh_prompts=attn.fresh_prompts)
        else:
            self.attention_into(*args)
