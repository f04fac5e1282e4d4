"""Counter-based randomness for sampling: every draw is a pure function of its key.

A random number is ``hash(seed, seq_index, position, vocab index)``, so a seeded sequence draws the
same tokens alone or in any batch, in any row order, after preemption and on any device, with no
``torch.Generator`` and no per-request loop. The hash is the murmur3 32-bit finaliser evaluated with
int64 tensor ops: every intermediate value is kept in [0, 2**32), and the multipliers are stored as
signed 32-bit constants, so a product stays below 2**63 in magnitude and never overflows int64.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _signed32(c: int) -> int:
    """The same residue mod 2**32 in [-2**31, 2**31): keeps x * c inside int64 for x < 2**32."""
    return c - (1 << 32) if c >= (1 << 31) else c


_FMIX_M1 = _signed32(0x85EBCA6B)
_FMIX_M2 = _signed32(0xC2B2AE35)
_GOLDEN = 0x9E3779B9  # odd, so v -> v * _GOLDEN mod 2**32 is a bijection
_KEY2_SALT = 0x68E31DA4
_INV_2_24 = 1.0 / (1 << 24)


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """Murmur3 finaliser on int64 values in [0, 2**32); a bijection of 32-bit words. Returns a new tensor."""
    x = x ^ (x >> 16)
    x.mul_(_FMIX_M1).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 13)
    x.mul_(_FMIX_M2).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 16)
    return x


def split_seed(seed: int) -> tuple[int, int]:
    """A seed in [0, 2**63) as its (low, high) 32-bit words."""
    return seed & MASK32, (seed >> 32) & MASK32


def row_keys(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, seq_index: torch.Tensor, position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from (seed, seq_index, position); all inputs int64 [R]."""
    k = fmix32((seed_lo + _GOLDEN) & MASK32)
    k = fmix32(k ^ (seed_hi & MASK32))
    k = fmix32(k ^ (seq_index & MASK32))
    k = fmix32(k ^ (position & MASK32))
    return k, fmix32(k ^ _KEY2_SALT)


def vocab_term(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """Spread vocab indices over 32-bit words: [V] int64, cached by the caller."""
    return (torch.arange(vocab_size, dtype=torch.int64, device=device) * _GOLDEN) & MASK32


def uniform(k1: torch.Tensor, k2: torch.Tensor, vterm: torch.Tensor) -> torch.Tensor:
    """Uniforms strictly inside (0, 1), one per (row, vocab index): [R, V] float32.

    k1, k2: [R] int64 from ``row_keys``; vterm: [V] int64 from ``vocab_term``. The top 24 bits of
    the hash are used so that every value (m + 0.5) / 2**24 is exact in float32 and never 0 or 1.
    """
    h = fmix32(k1[:, None] ^ vterm[None, :])  # [R, V]
    h.bitwise_xor_(k2[:, None])
    h = fmix32(h)
    return ((h >> 8).to(torch.float32) + 0.5) * _INV_2_24


def exponential_noise(k1: torch.Tensor, k2: torch.Tensor, vterm: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws, [R, V] float32: argmax(probs / noise) is a sample from probs (exponential race)."""
    return uniform(k1, k2, vterm).log_().neg_()
