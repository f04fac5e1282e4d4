"""The sampler's device math: pure tensor functions over a step's [R, V] logits.

``penalize`` and ``race_scores`` are pointwise over [R, V] and compiled on CUDA (``Compiled``), so
each is one fused kernel instead of many passes; the others are small and stay eager.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from kiln.engine import rng


def greedy_sample_reference(logits: Tensor) -> tuple[Tensor, Tensor]:
    """logits [R, V] -> (argmax tokens [R] int64, packed [2R] int32 = [tokens | float32 bits of the
    token's log_softmax]). The Triton kernel ``plugins/triton/greedy_sample.py`` gives the same."""
    raw = logits.float()
    tokens = raw.argmax(dim=-1)
    logprob = raw.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)
    return tokens, torch.cat([tokens.to(torch.int32), logprob.view(torch.int32)])


def penalize(
    x: Tensor, counts: Tensor, prompt_mask: Tensor, slots: Tensor, rep: Tensor, freq: Tensor, pres: Tensor
) -> Tensor:
    """HF repetition penalty over prompt + output tokens, then OpenAI presence / frequency over output.

    x [R, V]; counts [B, V] int32 and prompt_mask [B, V] bool are whole tables, gathered by slots [R].
    Neutral values (rep 1, freq 0, pres 0) leave a row bit-identical.
    """
    cnt = counts[slots]  # [R, V]
    out_seen = cnt > 0
    seen = out_seen | prompt_mask[slots]
    rep = rep[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    # a tiny repetition penalty can push a logit past float32's range: +inf would make the softmax NaN
    return (x - freq[:, None] * cnt - pres[:, None] * out_seen).clamp(max=torch.finfo(torch.float32).max)


def top_p_threshold(srt: Tensor, temp: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Smallest kept logit of top-k, then top-p on the renormalised top-k distribution: [R, 1].

    srt [R, V] logits sorted descending; temp, top_p [R] float; top_k [R] int64 in [1, V] (V: off).
    """
    pos = torch.arange(srt.shape[1], device=srt.device)
    in_k = pos[None, :] < top_k[:, None]  # [R, V]
    # shifted by the row's max first: with a tiny temperature the scaled logits would overflow to inf
    scaled = (srt - srt[:, :1]) / temp[:, None]
    probs = torch.softmax(scaled.masked_fill(~in_k, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    tp = top_p[:, None]
    # a prefix, never empty (the top token always stays, even if top_p rounds to 0 in float32);
    # top_p == 1 keeps all even if the cumsum rounds up
    keep = in_k & ((before < tp) | (tp >= 1.0) | (pos[None, :] == 0))
    return srt.gather(1, keep.sum(dim=-1, keepdim=True) - 1)


def top_k_threshold(x: Tensor, top_k: Tensor, k_max: int) -> Tensor:
    """k-th largest logit per row, -inf where top-k is off (top_k == V): [R, 1]. No full sort."""
    vals = x.topk(k_max, dim=-1).values  # [R, k_max]
    kth = vals.gather(1, (top_k.clamp(max=k_max) - 1)[:, None])  # [R, 1]
    return torch.where(top_k[:, None] < x.shape[1], kth, float("-inf"))


def race_scores(
    x: Tensor,
    top: Tensor,
    bound: Tensor,
    temp: Tensor,
    seed_lo: Tensor,
    seed_hi: Tensor,
    seq_index: Tensor,
    position: Tensor,
    vterm: Tensor,
) -> Tensor:
    """probs / Exp(1) noise, [R, V] float32: its row argmax is a draw from softmax(x / temp) over x >= bound.

    x [R, V]; top, bound [R, 1] (row max, lowest kept logit); temp and the RNG key parts [R]. The
    softmax's normalising sum does not move the argmax and is left out. Pointwise only (the argmax
    stays outside), so on CUDA it compiles into one predictable elementwise kernel.
    """
    k1, k2 = rng.row_keys(seed_lo, seed_hi, seq_index, position)
    probs = torch.exp((x - top) / temp[:, None]).masked_fill(x < bound, 0.0)  # [R, V], unnormalised
    return probs / rng.exponential_noise(k1, k2, vterm)


# torch.compile wrappers shared by every Decoder of the process: one compilation per function.
_COMPILED: dict[Callable[..., Tensor], Callable[..., Tensor]] = {}


class Compiled:
    """``fn`` through torch.compile on CUDA (one fused kernel instead of many passes over [R, V]).

    Falls back to eager, with a warning, if compilation fails: a missing compiler must not stop sampling.
    """

    def __init__(self, fn: Callable[..., Tensor], device: torch.device) -> None:
        self._eager = fn
        self._fn = fn
        if device.type == "cuda":
            if fn not in _COMPILED:
                _COMPILED[fn] = torch.compile(fn, dynamic=True)
            self._fn = _COMPILED[fn]

    def __call__(self, *args: Tensor | None) -> Tensor:
        try:
            return self._fn(*args)
        except Exception as e:
            if self._fn is self._eager:
                raise
            name = self._eager.__name__
            warnings.warn(f"compiling {name} failed ({e!r}); running it eagerly", stacklevel=1)
            self._fn = self._eager
            return self._fn(*args)
