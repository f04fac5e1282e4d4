"""The paged KV cache: one pool of fixed-size blocks per layer, for keys and for values.

All layers live in one allocation ``[num_layers, 2, num_blocks, tokens_per_block, Hkv, D]``; each
layer sees contiguous ``k_cache`` / ``v_cache`` views ``[num_blocks, tokens_per_block, Hkv, D]``.
One allocation means copying blocks (copy-on-write of a shared prefix block) is one indexing op
for all layers. Block 0 is the null block: it is never handed out, padded rows point at it and
slot -1 never writes anywhere, so its content is irrelevant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kiln.config import EngineLimits

NULL_BLOCK = 0
# The CPU pool default: room for two full batches of (up to 2048-token) sequences, capped in bytes.
CPU_DEFAULT_CAP_BYTES = 1 << 30


@dataclass(frozen=True)
class KvCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block in every layer."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.tokens_per_block * self.num_kv_heads * self.head_dim * itemsize


def blocks_for_tokens(max_tokens: int, tokens_per_block: int) -> int:
    """Blocks to hold ``max_tokens`` tokens, plus the null block."""
    return math.ceil(max_tokens / tokens_per_block) + 1


def cpu_default_num_blocks(spec: KvCacheSpec, limits: EngineLimits) -> int:
    tokens = 2 * limits.max_batch_size * min(limits.max_seq_len, 2048)
    # never more than every slot filled to max_seq_len needs
    full = limits.max_batch_size * math.ceil(limits.max_seq_len / spec.tokens_per_block) + 1
    wanted = min(blocks_for_tokens(tokens, spec.tokens_per_block), full)
    return max(2, min(wanted, CPU_DEFAULT_CAP_BYTES // spec.bytes_per_block))


def num_blocks_for_bytes(spec: KvCacheSpec, budget_bytes: int) -> int:
    return int(budget_bytes // spec.bytes_per_block)


class KvCache:
    """The allocated pool. ``layers[i]`` is layer i's ``(k_cache, v_cache)``."""

    def __init__(self, spec: KvCacheSpec, num_blocks: int, device: torch.device) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"the KV cache needs at least 2 blocks (one is the reserved null block), got {num_blocks}; "
                "raise KvCacheConfig.max_tokens or free_gpu_memory_fraction"
            )
        self.spec, self.num_blocks, self.device = spec, num_blocks, device
        shape = (spec.num_layers, 2, num_blocks, spec.tokens_per_block, spec.num_kv_heads, spec.head_dim)
        # zeros, not empty: a bug that reads an unwritten slot then shows up as wrong numbers, not NaNs
        self.pool = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (self.pool[i, 0], self.pool[i, 1]) for i in range(spec.num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` (int64 device tensors [C]) in every layer, K and V."""
        # reads all sources before writing: a block that is both a source and a destination is safe
        self.pool[:, :, dst] = self.pool[:, :, src]

    def close(self) -> None:
        self.layers = []
        self.pool = torch.empty(0)
