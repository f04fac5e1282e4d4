"""Rotary position embedding tables.

The rope_kv_write plugin reads one table, ``cos_sin_cache [max_positions, head_dim]`` float32:
cos in the first head_dim/2 columns, sin in the rest, both already multiplied by the attention
scaling factor of the RoPE variant (1 except for yarn). Frequencies are computed in float32 the
same way transformers computes them, so fp32 results match it.

Supported variants: ``default``, ``linear`` (positions divided by ``factor``), ``llama3`` (Llama 3.1
band-wise frequency scaling), ``yarn``, and ``dynamic`` (NTK-aware). transformers recomputes the
dynamic base on every forward from the longest position it sees; kiln keeps one fixed table instead,
computed as transformers would for a sequence of ``max_positions`` tokens:

- if ``max_positions <= max_position_embeddings`` the table is the unscaled one, exactly what
  transformers uses for every sequence within the pre-trained context;
- otherwise the base is stretched once for ``max_positions`` (the engine's ``max_seq_len``), which
  equals transformers for a sequence that reaches that length and is the same (slightly stronger)
  stretch for shorter ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.builder.model_config import RopeConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _base_exponents(dim: int, device: torch.device | None) -> torch.Tensor:
    # [dim/2] = 0, 2, 4, ... / dim in float32 (int64 arange first, as transformers does)
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim


def inverse_frequencies(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, max_positions: int, device=None
) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] float32, attention scaling factor)."""
    if rope.rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope.rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if rope.partial_rotary_factor != 1.0:
        raise ValueError(f"partial_rotary_factor {rope.partial_rotary_factor} is not supported; only 1.0 is")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    dim = head_dim
    theta = rope.theta
    if rope.rope_type == "dynamic":
        # NTK-aware: stretch the base for the longest sequence the table serves (see module docstring).
        seq_len = max(max_positions, max_position_embeddings)
        factor = rope.factor
        theta = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (theta ** _base_exponents(dim, device))  # [dim/2]
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    elif rope.rope_type == "yarn":
        return _yarn(rope, dim, max_position_embeddings, device)
    return inv_freq, 1.0


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths (beyond the pre-trained context / low_freq_factor) are slowed by `factor`,
    # short ones (below context / high_freq_factor) kept, the band between blended linearly in 1/wavelen.
    if rope.original_max_position_embeddings is None:
        raise ValueError("rope type 'llama3' needs original_max_position_embeddings in its rope parameters")
    old_ctx = rope.original_max_position_embeddings
    low_wavelen = old_ctx / rope.low_freq_factor
    high_wavelen = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(in_band, blended, scaled)


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int, device) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale_of(factor, rope.mscale) / mscale_of(factor, rope.mscale_all_dim)
        else:
            attention = mscale_of(factor)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength makes `rotations` turns over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)


def build_cos_sin_cache(
    rope: RopeConfig,
    head_dim: int,
    max_position_embeddings: int,
    max_positions: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos | sin of position * inv_freq, times the attention factor."""
    inv_freq, scaling = inverse_frequencies(rope, head_dim, max_position_embeddings, max_positions, device)
    positions = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1).contiguous()


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table. Built empty (the model is created on the meta device); ``materialize``
    computes it on the target device after the weights are loaded."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.cos_sin_cache = torch.empty(0, head_dim, dtype=torch.float32)

    def materialize(self, max_positions: int, device: torch.device | str) -> None:
        self.cos_sin_cache = build_cos_sin_cache(
            self.rope, self.head_dim, self.max_position_embeddings, max_positions, device
        )
