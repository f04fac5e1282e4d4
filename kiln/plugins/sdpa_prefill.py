"""``paged_attention_sdpa``: paged attention with a lone fresh prompt handed to torch's SDPA.

A step that prefills one prompt with nothing cached before it (the time-to-first-token case) is
plain causal attention over K/V this step just wrote. torch's scaled_dot_product_attention runs
that on cuDNN's attention, which on an H100 takes 85 us for a 2,048-token Llama-8B layer against
160 us for the Triton kernel (scripts/bench_attention.py, 2026-11-27). Every other step (several
sequences, a cached prefix, a sliding window) goes to the Triton kernel, so the plugin keeps the
``attention`` kind's contract everywhere. The default attention plugin: it cut the 8B's TTFT at ISL
2,048 from 48.4-48.6 to 46.8-47.6 ms on an H100 (benchmarks/RESULTS.md). ``paged_attention`` is the
Triton kernel alone.

Shapes: cuDNN builds an execution plan per shape (and strides), so the prompt is padded to a
multiple of ``PAD_TOKENS`` (a bounded set of plans). Padded keys sit after every real query, which
the causal mask hides from them. The engine's start-up runs every padded length once (``warm_up``),
on inputs laid out as a step's, so the plans exist before the first request.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F

from kiln.plugins.attention import PagedAttention
from kiln.plugins.registry import plugin

PAD_TOKENS = 128


def padded_length(length: int) -> int:
    """The length SDPA sees for a prompt of ``length`` tokens (one cuDNN plan per padded length)."""
    return -(-length // PAD_TOKENS) * PAD_TOKENS


def is_lone_fresh_prompt(q: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, max_seq_len: int,
                         sliding_window: int) -> bool:  # fmt: skip
    """One sequence whose new tokens are all of its KV (nothing cached before them), no window.
    Decided from shapes and host ints only: no device sync."""
    return (
        seq_lens.shape[0] == 1
        and max_query_len == max_seq_len
        and 0 < max_query_len <= q.shape[0]
        and sliding_window == 0
    )


def fresh_prompt_attention(
    q: torch.Tensor,  # [T >= L, Hq, D]; rows past L are padding
    k_cache: torch.Tensor,  # [num_blocks, page, Hkv, D]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int32: the sequence's row
    length: int,  # L: the prompt's tokens, all new
    scale: float,
) -> torch.Tensor:
    """Causal attention of a prompt to itself through SDPA; -> [T, Hq, D] (padding rows unwritten).

    Few copies: SDPA reads q where it lies (copied only when the prompt is not a whole number of
    ``PAD_TOKENS`` and q has no rows to spare) and K/V as the prompt's pages gathered in order (one
    index_select each), both through strided [1, H, L, D] views. Keys past the prompt are zeroed:
    only padding queries see them, but a stale NaN there would still reach real rows through P @ V."""
    page = k_cache.shape[1]
    padded = padded_length(length)
    if q.shape[0] >= padded:
        qp = q[:padded]
    else:
        qp = q.new_empty((padded, *q.shape[1:]))
        qp[:length] = q[:length]
        qp[length:].zero_()
    own_pages = -(-length // page)
    pages = block_table[:own_pages].long()

    def gather(cache: torch.Tensor) -> torch.Tensor:  # [padded, Hkv, D]
        buf = cache.new_empty((-(-padded // page), *cache.shape[1:]))
        torch.index_select(cache, 0, pages, out=buf[:own_pages])
        rows = buf.flatten(0, 1)
        rows[length:].zero_()
        return rows[:padded]

    o = causal_sdpa(qp, gather(k_cache), gather(v_cache), scale)  # [padded, Hq, D]
    if q.shape[0] == length:
        return o[:length]
    out = torch.empty_like(q)
    out[:length] = o[:length]
    return out


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence, packed rows: q [L, Hq, D], k/v [L, Hkv, D] -> [L, Hq, D] contiguous; cuDNN first.
    SDPA sees [1, H, L, D] views of the rows as they lie (cuDNN takes the strides)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]  # fmt: skip

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0).transpose(1, 2)

    with sdpa_kernel(backends, set_priority=True):
        o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                           scale=scale, enable_gqa=True)  # fmt: skip
    return o.transpose(1, 2).reshape(q.shape)  # a view when SDPA wrote rows in q's layout


def warm_up(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype,
            device: torch.device, max_tokens: int, page: int) -> int:  # fmt: skip
    """Run SDPA once at every padded length of a prompt of up to ``max_tokens`` tokens, on inputs laid
    out as a step's (q rows, K/V gathered from pages), so cuDNN builds each plan at start-up rather
    than in a request's step; returns how many lengths ran."""
    lengths = range(PAD_TOKENS, padded_length(max_tokens) + 1, PAD_TOKENS)
    for length in lengths:
        q = torch.zeros(length, num_heads, head_dim, dtype=dtype, device=device)
        pages = torch.zeros(-(-length // page), page, num_kv_heads, head_dim, dtype=dtype, device=device)
        kv = pages.flatten(0, 1)[:length]
        causal_sdpa(q, kv, kv, scale)
    return len(lengths)


def without_lone_prompts(
    variants_of: Callable[[list[int], list[int]], set[Hashable]],
) -> Callable[[list[int], list[int]], set[Hashable]]:
    """The Triton attention variants a step launches under this plugin (see ``step_variants``): none
    for a lone fresh prompt, which SDPA takes, so start-up reaches the other steps' variants with
    steps that really launch them (a variant first met mid-run compiles inside a request's step)."""

    def triton_variants(computed: list[int], new: list[int]) -> set[Hashable]:
        if len(new) == 1 and computed[0] == 0:
            return set()
        return variants_of(computed, new)

    return triton_variants


@plugin("paged_attention_sdpa", kind="attention")
class PagedAttentionSdpa(PagedAttention):
    """``paged_attention`` (same contract, fake and reference), with a lone fresh prompt through SDPA."""

    def forward(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        if is_lone_fresh_prompt(q, seq_lens, max_query_len, max_seq_len, sliding_window):
            return fresh_prompt_attention(q, k_cache, v_cache, block_tables[0], max_query_len, scale)
        return super().forward(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                               max_query_len, max_seq_len, scale, sliding_window)  # fmt: skip

    def forward_into(self, out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                     max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        if is_lone_fresh_prompt(q, seq_lens, max_query_len, max_seq_len, sliding_window):
            out.copy_(fresh_prompt_attention(q, k_cache, v_cache, block_tables[0], max_query_len, scale))
            return
        super().forward_into(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                             max_query_len, max_seq_len, scale, sliding_window)  # fmt: skip
