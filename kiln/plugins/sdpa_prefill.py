"""``paged_attention_sdpa``: paged attention with fresh prompts handed to torch's SDPA.

A prompt with nothing cached before it is plain causal attention over the K/V this step just wrote.
torch's scaled_dot_product_attention runs that on cuDNN's attention, which on an H100 takes 85 us
for a 2,048-token Llama-8B layer against 160 us for the Triton kernel, 262 against 536 us for four
such prompts (scripts/bench_attention.py, 2026-11-27). Two cases take it:

- a step that is one fresh prompt (the time-to-first-token case), decided from shapes alone, so
  the custom op (compiled or captured code) takes it too. It cut the 8B's TTFT at ISL 2,048 from
  48.4-48.6 to 46.8-47.6 ms on an H100 (benchmarks/RESULTS.md);
- in ``forward_into`` (called eagerly, e.g. between piecewise graphs), a step whose trailing
  sequences are a few long fresh prompts (``sdpa_takes``), known from the step's host-side
  ``FreshPrompts``: those go to SDPA one by one, the leading sequences (decode rows, chunks with a
  cached prefix) to the Triton kernel as a smaller batch of the same layout.

Everything else (a sliding window, many short prompts) goes to the Triton kernel, so the plugin keeps
the ``attention`` kind's contract everywhere. The default attention plugin; ``paged_attention`` is
the Triton kernel alone.

Shapes: cuDNN builds an execution plan per shape (and strides), so the prompt is padded to a
multiple of ``PAD_TOKENS`` (a bounded set of plans). Padded keys sit after every real query, which
the causal mask hides from them. The engine's start-up runs every padded length once (``warm_up``),
on inputs laid out as a step's, so the plans exist before the first request.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np
import torch
import torch.nn.functional as F

from kiln.engine.attention_metadata import FreshPrompts
from kiln.plugins.attention import PagedAttention
from kiln.plugins.registry import plugin

PAD_TOKENS = 128
# sdpa_takes: at most this many fresh prompts a step, and on average at least this much work each
# (tokens x query heads x head dim: 512 tokens of Llama-3.1-8B, 1,024 of Qwen3-0.6B)
MAX_SPLIT_PROMPTS = 8
MIN_SPLIT_WORK = 1 << 21


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
    q: torch.Tensor,  # [T >= L, Hq, D] from the prompt's first row; rows past L are other tokens or padding
    k_cache: torch.Tensor,  # [num_blocks, page, Hkv, D]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int32: the sequence's row
    length: int,  # L: the prompt's tokens, all new
    scale: float,
) -> torch.Tensor:
    """Causal attention of a prompt to itself through SDPA -> [L, Hq, D].

    Few copies: SDPA reads q where it lies (the rows after the prompt stand in as its padding queries;
    copied only when q has too few of them) and K/V as the prompt's pages gathered in order (one
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

    return causal_sdpa(qp, gather(k_cache), gather(v_cache), scale)[:length]


def sdpa_takes(fresh: FreshPrompts, width: int) -> bool:
    """Whether a step's trailing fresh prompts go to SDPA (the rest of the step to the paged kernel),
    for query rows ``width`` = heads x head dim wide: a lone prompt always; several when they are few
    and long. Each costs an SDPA call and two page gathers a layer, ~0.1 ms of Python: a short
    prompt's attention saves less than that, and a step of many (a 128/128 step packs 64) or of a
    small model's short ones would spend more host time launching them than the GPU saves."""
    n = len(fresh.lengths)
    if fresh.first_seq == 0 and n == 1:
        return True
    return n <= MAX_SPLIT_PROMPTS and sum(fresh.lengths) * width >= MIN_SPLIT_WORK * n


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
    # a view when SDPA wrote rows in q's layout (cuDNN); a copy when it wrote heads first (the others)
    return o.transpose(1, 2).reshape(q.shape).contiguous()


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


def without_fresh_prompts(
    variants_of: Callable[[list[int], list[int]], set[Hashable]], width: int, split_up_to: int
) -> Callable[[list[int], list[int]], set[Hashable]]:
    """The Triton attention variants a step launches under this plugin (see ``step_variants``), for
    query rows ``width`` wide: none for a lone fresh prompt; for a step of at most ``split_up_to``
    tokens (those whose attention is called through ``forward_into``) only its leading sequences'
    when SDPA takes its fresh prompts.
    So start-up reaches the other steps' variants with steps that really launch them (a variant first
    met mid-run compiles inside a request's step)."""

    def triton_variants(computed: list[int], new: list[int]) -> set[Hashable]:
        if len(new) == 1 and computed[0] == 0:
            return set()
        fresh = FreshPrompts.of_step(np.asarray(computed), np.asarray(new), 0)
        if fresh is None or sum(new) > split_up_to or not sdpa_takes(fresh, width):
            return variants_of(computed, new)
        first = fresh.first_seq
        return variants_of(computed[:first], new[:first]) if first else set()

    return triton_variants


@plugin("paged_attention_sdpa", kind="attention")
class PagedAttentionSdpa(PagedAttention):
    """``paged_attention`` (same contract, fake and reference), with fresh prompts through SDPA: a lone
    one in ``forward``, a step's trailing ones in ``forward_into`` (see the module docstring)."""

    def forward(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        if is_lone_fresh_prompt(q, seq_lens, max_query_len, max_seq_len, sliding_window):
            rows = fresh_prompt_attention(q, k_cache, v_cache, block_tables[0], max_query_len, scale)
            if q.shape[0] == max_query_len:
                return rows
            out = torch.empty_like(q)  # padding rows past the prompt: left unwritten
            out[:max_query_len] = rows
            return out
        return super().forward(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                               max_query_len, max_seq_len, scale, sliding_window)  # fmt: skip

    def forward_into(self, out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                     max_query_len, max_seq_len, scale, sliding_window,
                     fresh_prompts: FreshPrompts | None = None):  # fmt: skip
        """``forward`` into ``out``; ``fresh_prompts`` (the step's host-side facts, when the caller has
        them) lets a step's trailing fresh prompts go to SDPA beside the paged kernel."""
        fresh = fresh_prompts
        if fresh is None and is_lone_fresh_prompt(q, seq_lens, max_query_len, max_seq_len, sliding_window):
            fresh = FreshPrompts(0, (0,), (max_query_len,), 0, 0)  # a caller without the step's facts
        if fresh is None or sliding_window > 0 or not sdpa_takes(fresh, q.shape[1] * q.shape[2]):
            super().forward_into(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                 max_query_len, max_seq_len, scale, sliding_window)  # fmt: skip
            return
        first = fresh.first_seq
        if first:  # the leading sequences are a packed batch of their own: a prefix of every argument
            t0 = fresh.starts[0]
            super().forward_into(out[:t0], q[:t0], k_cache, v_cache, block_tables[:first], seq_lens[:first],
                                 query_start_loc[: first + 1], fresh.rest_max_query_len,
                                 fresh.rest_max_seq_len, scale, sliding_window)  # fmt: skip
        for i, (start, length) in enumerate(zip(fresh.starts, fresh.lengths, strict=True)):
            rows = fresh_prompt_attention(q[start:], k_cache, v_cache, block_tables[first + i], length, scale)
            out[start : start + length].copy_(rows)
