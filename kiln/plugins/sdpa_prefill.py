"""``paged_attention_sdpa``: paged attention with fresh prompts handed to torch's SDPA.

A prompt with nothing cached before it is plain causal attention over the K/V this step just wrote.
torch's scaled_dot_product_attention runs that on cuDNN's attention, which on an H100 takes 85 us
for a 2,048-token Llama-8B layer against 160 us for the Triton kernel, 262 against 536 us for four
such prompts (scripts/bench_attention.py, 2026-11-27). Two cases take it:

- a step that is one fresh prompt (the time-to-first-token case), decided from shapes alone, so
  the custom op (compiled or captured code) takes it too. It cut the 8B's TTFT at ISL 2,048 from
  48.4-48.6 to 46.8-47.6 ms on an H100 (benchmarks/RESULTS.md);
- in ``forward_into`` (called eagerly, e.g. between piecewise graphs), a step whose trailing
  sequences are a few long fresh prompts (``sdpa_takes``; a chunk after a short cached prefix counts,
  its prefix's queries played by the q rows before it), known from the step's host-side
  ``FreshPrompts``: those go to SDPA, consecutive prompts of one length (in whole ``PAD_TOKENS``) in
  one batched call (``sdpa_runs``), the others one by one, their K/V read in place when their pages
  are one run of blocks (``in_place_block``); the leading sequences (decode rows, chunks with a
  cached prefix) go to the Triton kernel as a smaller batch of the same layout.

With this plugin the engine also captures *prompt graphs* (kiln/engine/piecewise_graphs.py): a step
that is one fresh prompt replays its whole forward as one CUDA graph, whose attention is
``lone_prompt_attention`` (the same SDPA call, over K/V gathered through a static row of page ids).

Everything else (a sliding window, many short prompts) goes to the Triton kernel, so the plugin keeps
the ``attention`` kind's contract everywhere. The default attention plugin; ``paged_attention`` is
the Triton kernel alone.

Shapes: cuDNN builds an execution plan per shape (and strides), so the prompt is padded to a
multiple of ``PAD_TOKENS`` (a bounded set of plans). Padded keys sit after every real query, which
the causal mask hides from them. The engine's start-up runs every shape once (``warm_up``: each
padded length alone, and n at a time for the lengths that are batched), on inputs laid out as a
step's, so the plans exist before the first request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence

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
    q: torch.Tensor,  # [T >= n x L, Hq, D] from the first prompt's first row; rows past them: others, padding
    k_cache: torch.Tensor,  # [num_blocks, page, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [n, max_blocks] int32: the prompts' rows
    length: int,  # L: each prompt's KV positions 0..L-1, one q row each (a prefix's rows: stand-ins)
    scale: float,
    first_block: int = -1,  # >= 0: the prompts' pages are the blocks first_block, first_block + 1, ...
) -> torch.Tensor:
    """Causal attention of ``n`` consecutive fresh prompts of ``length`` tokens each to themselves, in
    one SDPA call -> [n, L, Hq, D]. Several only when L is a multiple of ``PAD_TOKENS`` (``sdpa_runs``).

    Few copies: SDPA reads q where it lies (the rows after a lone prompt stand in as its padding queries;
    copied only when q has too few of them) and K/V as the prompts' pages gathered in order (one
    index_select each), both through strided [n, H, L, D] views. Keys past a prompt are zeroed: only
    padding queries see them, but a stale NaN there would still reach real rows through P @ V.
    With ``first_block`` (``in_place_block``: L in whole pages and whole ``PAD_TOKENS``, so no key
    past a prompt is read) K/V are read where they lie too, as the same [n, L, Hkv, D] layout."""
    n, page = block_tables.shape[0], k_cache.shape[1]
    padded = padded_length(length)
    assert n == 1 or padded == length, "prompts batched in one call need a length of whole PAD_TOKENS"
    if q.shape[0] >= n * padded:
        qp = q[: n * padded]
    else:
        qp = q.new_empty((padded, *q.shape[1:]))
        qp[:length] = q[:length]
        qp[length:].zero_()
    own_pages, pages_each = -(-length // page), -(-padded // page)
    pages = block_tables[:, :own_pages]  # int32 indices: index_select takes them as they are
    pages = pages[0] if n == 1 else pages.reshape(-1)

    def gather(cache: torch.Tensor) -> torch.Tensor:  # [n, padded, Hkv, D]
        if first_block >= 0:  # strides as the gathered buffer's below: the same cuDNN plan
            return cache[first_block : first_block + n * pages_each].view(n, padded, *cache.shape[2:])
        buf = cache.new_empty((n, pages_each, *cache.shape[1:]))
        # n > 1: every prompt fills its pages_each pages (padded == length), so one index_select
        torch.index_select(cache, 0, pages, out=buf[0, :own_pages] if n == 1 else buf.flatten(0, 1))
        rows = buf.flatten(1, 2)
        rows[:, length:].zero_()
        return rows[:, :padded]

    return causal_sdpa(qp.unflatten(0, (n, padded)), gather(k_cache), gather(v_cache), scale)[:, :length]


def lone_prompt_attention(
    scales: Sequence[float], kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[int, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The attention of a prompt graph (``PiecewiseGraphRunner``: a step of ``size`` rows that is one
    fresh prompt, the rest padding, captured whole): layer i's causal SDPA over ``size`` keys gathered
    from ``pages`` ([1, P] int32: the prompt's pages, then the null block). The prompt's rows see its
    own keys only; the keys past it were written by the padding rows in the same step."""

    def attend(i: int, q: torch.Tensor, pages: torch.Tensor, size: int) -> torch.Tensor:
        k_cache, v_cache = kv_caches[i]
        return fresh_prompt_attention(q, k_cache, v_cache, pages, size, scales[i])[0]

    return attend


def in_place_block(first_blocks: tuple[int, ...], i: int, n: int, length: int, page: int) -> int:
    """The first KV block of prompts ``i .. i + n - 1`` (``FreshPrompts.first_blocks``) when their K/V
    can be read where they lie: each of ``length`` tokens in whole pages and whole ``PAD_TOKENS`` (no
    padding key to zero), their pages one run of block ids; else -1 (gathered)."""
    if not first_blocks or length % page or length != padded_length(length):
        return -1
    first, pages = first_blocks[i], length // page
    if first < 0 or any(first_blocks[i + j] != first + j * pages for j in range(1, n)):
        return -1
    return first


def batchable(length: int, width: int) -> bool:
    """Whether prompts of ``length`` tokens may share an SDPA call (see ``sdpa_runs``)."""
    return length % PAD_TOKENS == 0 and length * width >= MIN_SPLIT_WORK


def sdpa_runs(lengths: tuple[int, ...], width: int, prefixes: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """The SDPA calls for a step's fresh prompts: (first prompt, how many), in order, for query rows
    ``width`` = heads x head dim wide. Consecutive prompts of one length L with nothing cached
    (``prefixes``) go as one batched call when L is a multiple of ``PAD_TOKENS`` and each is long
    enough to be worth a call of its own (``MIN_SPLIT_WORK``), at most ``MAX_SPLIT_PROMPTS`` a call:
    their q rows are then a [n, L, H, D] view whose strides depend on L alone, so cuDNN's plans (one
    per shape and strides) stay a set that start-up builds (``warm_up``). On an H100, four 2,048-token
    prompts took 263 us in one call against ~85 us each alone (benchmarks/NOTES.md). Any other prompt
    is a call of its own."""

    def alone(k: int) -> bool:
        return bool(prefixes) and prefixes[k] > 0

    runs, i = [], 0
    while i < len(lengths):
        length, j = lengths[i], i + 1
        if not alone(i) and batchable(length, width):
            while (j < len(lengths) and j - i < MAX_SPLIT_PROMPTS and lengths[j] == length
                   and not alone(j)):  # fmt: skip
                j += 1
        runs.append((i, j - i))
        i = j
    return runs


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
    """Prompts of one length, packed rows: q [n, L, Hq, D], k/v [n, L, Hkv, D] -> [n, L, Hq, D]
    contiguous; cuDNN first. SDPA sees [n, H, L, D] views of the rows as they lie (cuDNN takes the
    strides)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]  # fmt: skip

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2)

    with sdpa_kernel(backends, set_priority=True):
        o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                           scale=scale, enable_gqa=True)  # fmt: skip
    # a view when SDPA wrote rows in q's layout (cuDNN); a copy when it wrote heads first (the others)
    return o.transpose(1, 2).contiguous()


def warm_up(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype,
            device: torch.device, max_tokens: int, page: int) -> int:  # fmt: skip
    """Run SDPA once for every shape a step of up to ``max_tokens`` tokens can give it (each padded
    length alone; the lengths ``sdpa_runs`` batches, n at a time for every n that fits), on inputs
    laid out as a step's (q rows, K/V gathered from pages), so cuDNN builds each plan at start-up
    rather than in a request's step; returns how many shapes ran."""
    shapes = []
    for length in range(PAD_TOKENS, padded_length(max_tokens) + 1, PAD_TOKENS):
        batched = batchable(length, num_heads * head_dim)
        shapes += [
            (n, length)
            for n in range(1, MAX_SPLIT_PROMPTS + 1)
            if n == 1 or batched and n * length <= max_tokens
        ]
    for n, length in shapes:
        q = torch.zeros(n * length, num_heads, head_dim, dtype=dtype, device=device).unflatten(0, (n, length))
        pages = torch.zeros(n, -(-length // page), page, num_kv_heads, head_dim, dtype=dtype, device=device)
        kv = pages.flatten(1, 2)[:, :length]
        causal_sdpa(q, kv, kv, scale)
    return len(shapes)


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


def _overlap_stream(q: torch.Tensor) -> torch.cuda.Stream | None:
    """Unless ``KILN_ATTENTION_OVERLAP=0`` (paged_attention.OVERLAP_PASSES): the stream for a split step's
    leading part (decode rows, bound by K/V bandwidth) beside the SDPA calls (bound by the MMAs), so
    the two can share the SMs; None otherwise. It starts after everything queued so far (this step's
    K/V writes); the caller's stream waits for it before anything after the attention."""
    if not q.is_cuda:
        return None
    from kiln.plugins.triton import paged_attention as triton_attention

    if not triton_attention.OVERLAP_PASSES:
        return None
    side = triton_attention.side_stream(q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    return side


@plugin("paged_attention_sdpa", kind="attention")
class PagedAttentionSdpa(PagedAttention):
    """``paged_attention`` (same contract, fake and reference), with fresh prompts through SDPA: a lone
    one in ``forward``, a step's trailing ones in ``forward_into`` (see the module docstring)."""

    def forward(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        if is_lone_fresh_prompt(q, seq_lens, max_query_len, max_seq_len, sliding_window):
            rows = fresh_prompt_attention(q, k_cache, v_cache, block_tables[:1], max_query_len, scale)[0]
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
        side = _overlap_stream(q) if first else None
        if first:  # the leading sequences are a packed batch of their own: a prefix of every argument
            t0, lead = fresh.starts[0], slice(0, first)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                super().forward_into(out[:t0], q[:t0], k_cache, v_cache, block_tables[lead], seq_lens[lead],
                                     query_start_loc[: first + 1], fresh.rest_max_query_len,
                                     fresh.rest_max_seq_len, scale, sliding_window)  # fmt: skip
        for i, n in sdpa_runs(fresh.lengths, q.shape[1] * q.shape[2], fresh.prefixes):
            start, length, prefix = fresh.starts[i], fresh.lengths[i], fresh.prefix(i)
            tables = block_tables[first + i : first + i + n]
            # a chunk after a cached prefix: causal attention over prefix + chunk, whose first rows (the
            # q rows before the chunk, other tokens' queries) stand in for the prefix's and are dropped
            total = prefix + length
            if start >= prefix:
                rows_q = q[start - prefix :]
            else:
                rows_q = q.new_zeros((padded_length(total), *q.shape[1:]))  # padded: copied once
                rows_q[prefix:total] = q[start : start + length]
            in_place = in_place_block(fresh.first_blocks, i, n, total, k_cache.shape[1])
            rows = fresh_prompt_attention(rows_q, k_cache, v_cache, tables, total, scale, in_place)
            out[start : start + n * length].unflatten(0, (n, length)).copy_(rows[:, prefix:])
        if side is not None:
            torch.cuda.current_stream(q.device).wait_stream(side)
