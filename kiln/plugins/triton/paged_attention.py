"""Paged attention over a ragged packed batch of decode rows and context chunks.

One tile kernel, launched once per pass (``attention_plan.py``: a decode pass with small query
tiles, plus a prefill pass with large tiles when some sequence has more new tokens than a decode
tile holds), then one merge launch if any pass splits the keys. Each pass has
grid = (query tiles, kv heads, kv splits):

- A *query tile* is up to ``TOKENS_PER_TILE`` consecutive new tokens of one sequence times the
  ``GROUP`` query heads that share one kv head, flattened into ``BLOCK_M`` rows
  (row r = token r // GROUP, head r % GROUP). Every K/V tile is loaded once per kv-head group and
  serves all its query heads (GQA packing); decode rows of a GQA model fill the MMA with heads.
- Tiles map to sequences either statically (``tiles_per_seq`` tiles per sequence, from
  max_query_len) or, when that would launch many idle programs (a long chunk among many decode rows),
  through a binary search over ``tile_start(s) = query_start_loc[s] // TOKENS_PER_TILE + s``, which
  gives every sequence at least the tiles it needs with ``T // TOKENS_PER_TILE + S`` programs in all.
- The visible key range of a tile, [lo, hi), is cut into ``num_splits`` equal parts (flash-decoding):
  with one split the kernel writes the normalised output; with several it writes fp32 partials
  (acc, running max, running sum) and a second kernel merges them.

The grids depend only on shapes and the int arguments (max_query_len, max_seq_len), never on device
data, so a captured CUDA graph stays valid while seq_lens / block_tables change between replays.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from kiln.plugins.triton._common import (
    check_last_dim_contiguous,
    dot_precision,
    env_ints,
    next_pow2,
    pdl_args,
    pdl_trigger,
    pdl_wait,
)
from kiln.plugins.triton.attention_plan import MAX_SPLITS, plan_passes

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)
# KILN_ATTENTION_DECODE_PLAN="BLOCK_N:WARPS:STAGES:SPLITS" (0: the planner's) overrides the plan of decode
# steps (every sequence one new token), for end-to-end tuning (scripts/decode_variants.py): the isolated
# sweep misled at batch 1 (benchmarks/NOTES.md). Start-up's warm-up does not know it: a tuning knob only.
DECODE_PLAN_ENV = "KILN_ATTENTION_DECODE_PLAN"

# In a step with both passes, the decode pass (bound by K/V bandwidth) runs on a second stream beside the
# prefill pass (bound by the MMAs), so the two can share the SMs; KILN_ATTENTION_OVERLAP=0 runs them in
# turn. Both orders give the same output. On an H100 a 2048/128 mixed step's attention took 792 -> 739 us
# a layer with paged_attention_sdpa's split (scripts/bench_attention.py --overlap), Triton alone 912 ->
# 895 (benchmarks/NOTES.md).
OVERLAP_PASSES = os.environ.get("KILN_ATTENTION_OVERLAP", "1") != "0"
_side_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


@triton.jit
def _attend(
    acc, m_i, l_i, q, q_pos, win_lo, row_ok, k_base, v_base, bt_row, d, d_ok,
    lo, hi, end, stride_kb, stride_ko, stride_vb, stride_vo, scale_log2,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys [lo, hi) in BLOCK_N tiles. MASKED=False only for whole tiles that
    every row of the query tile may see (no causal, window or range mask needed)."""
    for n0 in range(lo, hi, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < end
        if MASKED:
            page = tl.load(bt_row + kpos // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + kpos // PAGE_SIZE).to(tl.int64)
        slot = kpos % PAGE_SIZE
        k_mask = d_ok[:, None]
        v_mask = d_ok[None, :]
        if MASKED:
            k_mask = k_mask & k_ok[None, :]
            v_mask = v_mask & k_ok[:, None]
        k = tl.load(k_base + page[None, :] * stride_kb + slot[None, :] * stride_ko + d[:, None],
                    mask=k_mask, other=0.0)  # [BLOCK_D, BLOCK_N]  # fmt: skip
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = (kpos[None, :] <= q_pos[:, None]) & (kpos[None, :] > win_lo[:, None])
            visible = visible & k_ok[None, :] & row_ok[:, None]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows with nothing visible yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + page[:, None] * stride_vb + slot[:, None] * stride_vo + d[None, :],
                    mask=v_mask, other=0.0)  # [BLOCK_N, BLOCK_D]  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Triton compiles a variant per class of each int argument (== 1, divisible by 16, other); arguments
# that change from step to step are left unspecialised, so a new batch shape never compiles mid-run.
# The partials' split strides grow with the step's token count (T x Hq x ...): whether they divide by 16
# can follow T's parity (Hq = 28, say), so they stay unspecialised like the other per-step ints.
@triton.jit(
    do_not_specialize=[
        "num_seqs",
        "q_len_lo",
        "q_len_hi",
        "tiles_per_seq",
        "search_steps",
        "num_splits",
        "stride_pas",
        "stride_pms",
    ]  # fmt: skip
)
def _attention_tile_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    num_seqs, q_len_lo, q_len_hi, tiles_per_seq, search_steps, num_splits, scale_log2, sliding_window,
    stride_qt, stride_qh, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
    stride_bt, stride_ot, stride_oh, stride_pas, stride_pat, stride_pah, stride_pms, stride_pmt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    USE_SEARCH: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pdl_wait(PDL)
    # Heaviest tiles first: a sequence's later query tiles see more keys (causal), and starting them
    # first leaves the short ones to fill the last wave.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # -- which sequence and which of its query tiles this program owns
    if USE_SEARCH:
        lo = pid * 0
        hi = num_seqs
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            go = tl.load(query_start_loc_ptr + mid) // TOKENS_PER_TILE + mid <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        seq = lo  # largest s with tile_start(s) <= pid; == num_seqs for the padding programs
        local_tile = pid - (tl.load(query_start_loc_ptr + seq) // TOKENS_PER_TILE + seq)
    else:
        seq = pid // tiles_per_seq
        local_tile = pid % tiles_per_seq
    seq_c = tl.minimum(seq, num_seqs - 1)  # keep the loads in bounds; `active` below masks the rest
    q_start = tl.load(query_start_loc_ptr + seq_c)
    q_len = tl.load(query_start_loc_ptr + seq_c + 1) - q_start
    kv_len = tl.load(seq_lens_ptr + seq_c)
    t0 = local_tile * TOKENS_PER_TILE
    # this pass serves only sequences with q_len_lo < q_len <= q_len_hi (see attention_plan.py)
    active = (seq < num_seqs) & (t0 < q_len) & (q_len > q_len_lo) & (q_len <= q_len_hi)

    if active:
        ctx = kv_len - q_len  # position of the sequence's first new token
        rows = tl.arange(0, BLOCK_M)
        tok = t0 + rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = (rows < TOKENS_PER_TILE * GROUP) & (tok < q_len)
        q_pos = ctx + tok  # [BLOCK_M]
        # keys visible to a row: (win_lo, q_pos]; win_lo = -1 without a sliding window
        win_lo = tl.where(sliding_window > 0, q_pos - sliding_window, -1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        tok64 = (q_start + tok).to(tl.int64)
        q_off = tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

        # -- this tile's key range, then this split's share of it (a multiple of BLOCK_N)
        last_tok = tl.minimum(t0 + TOKENS_PER_TILE, q_len) - 1
        hi_key = ctx + last_tok + 1
        lo_key = tl.where(sliding_window > 0, tl.maximum(ctx + t0 - sliding_window + 1, 0), 0)
        if SPLIT:
            per_split = tl.cdiv(tl.cdiv(hi_key - lo_key, num_splits), BLOCK_N) * BLOCK_N
            start = lo_key + split * per_split
            end = tl.minimum(hi_key, start + per_split)
        else:
            start = lo_key
            end = hi_key

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 domain
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        bt_row = block_tables_ptr + seq_c.to(tl.int64) * stride_bt
        k_base = k_cache_ptr + kvh * stride_kh
        v_base = v_cache_ptr + kvh * stride_vh
        # Keys in [full_lo, full_hi) are visible to every row of the tile: whole BLOCK_N tiles there
        # skip the per-element mask. The edges (window start, causal diagonal, range end) are masked.
        full_lo = tl.where(sliding_window > 0, tl.maximum(ctx + last_tok - sliding_window + 1, start), start)
        full_hi = tl.minimum(end, ctx + t0 + 1)
        a = tl.minimum(start + tl.cdiv(tl.maximum(full_lo - start, 0), BLOCK_N) * BLOCK_N, end)
        b = a + tl.maximum(full_hi - a, 0) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, win_lo, row_ok, k_base, v_base, bt_row, d, d_ok,
                                start, a, end, stride_kb, stride_ko, stride_vb, stride_vo, scale_log2,
                                BLOCK_N, PAGE_SIZE, PRECISION, True)  # fmt: skip
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, win_lo, row_ok, k_base, v_base, bt_row, d, d_ok,
                                a, b, end, stride_kb, stride_ko, stride_vb, stride_vo, scale_log2,
                                BLOCK_N, PAGE_SIZE, PRECISION, False)  # fmt: skip
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, win_lo, row_ok, k_base, v_base, bt_row, d, d_ok,
                                b, end, end, stride_kb, stride_ko, stride_vb, stride_vo, scale_log2,
                                BLOCK_N, PAGE_SIZE, PRECISION, True)  # fmt: skip

        if SPLIT:
            pa = part_acc_ptr + split * stride_pas + tok64[:, None] * stride_pat + head[:, None] * stride_pah
            tl.store(pa + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
            pm = part_ml_ptr + split * stride_pms + tok64 * stride_pmt + head * 2
            tl.store(pm, m_i, mask=row_ok)
            tl.store(pm + 1, l_i, mask=row_ok)
        else:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            o_off = tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
            tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(
    do_not_specialize=[
        "num_seqs",
        "search_steps",
        "decode_tokens",
        "decode_splits",
        "prefill_splits",
        "stride_pas",
        "stride_pms",
    ]  # fmt: skip
)
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, query_start_loc_ptr,
    num_seqs, search_steps, decode_tokens, decode_splits, prefill_splits,
    stride_pas, stride_pat, stride_pah, stride_pms, stride_pmt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_P2: tl.constexpr, ONE_TOKEN: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pdl_wait(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    if ONE_TOKEN:  # no sequence has more than one new token (a decode step): every token is the decode pass's
        # a real token lies before query_start_loc[-1]; only the store waits for that load
        real = t < tl.load(query_start_loc_ptr + num_seqs)
        num_splits = decode_splits
    else:
        # the token's sequence (largest s with query_start_loc[s] <= t) decides which pass wrote it
        lo = t * 0
        hi = num_seqs
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            go = tl.load(query_start_loc_ptr + mid) <= t
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        seq_c = tl.minimum(lo, num_seqs - 1)
        q_len = tl.load(query_start_loc_ptr + seq_c + 1) - tl.load(query_start_loc_ptr + seq_c)
        num_splits = tl.where(q_len <= decode_tokens, decode_splits, prefill_splits)
        real = lo < num_seqs
    # padding tokens (past query_start_loc[-1]) were written by no pass (their partials are not stored
    # from); one-split passes wrote `out`
    if num_splits > 1:
        t64 = t.to(tl.int64)
        j = tl.arange(0, SPLITS_P2)
        j_ok = j < num_splits
        d = tl.arange(0, BLOCK_D)
        pm = part_ml_ptr + j * stride_pms + t64 * stride_pmt + h * 2
        m = tl.load(pm, mask=j_ok, other=float("-inf"))  # [SPLITS_P2]
        l = tl.load(pm + 1, mask=j_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for empty splits
        pa = part_acc_ptr + j[:, None] * stride_pas + t64 * stride_pat + h * stride_pah + d[None, :]
        acc = tl.load(pa, mask=j_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [SPLITS_P2, BLOCK_D]
        out = tl.sum(acc * w[:, None], axis=0) / tl.maximum(tl.sum(w * l, axis=0), 1e-30)
        o = out_ptr + t64 * stride_ot + h * stride_oh + d
        tl.store(o, out.to(out_ptr.dtype.element_ty), mask=(d < HEAD_DIM) & real)


def _validate(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    head_dim = q.shape[2]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"paged_attention supports head dims {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, Hkv, {head_dim}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k_cache.shape[2]})")
    num_seqs = seq_lens.shape[0]
    bad_tables = block_tables.dim() != 2 or block_tables.shape[0] < num_seqs
    if bad_tables or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"need block_tables [S, max_blocks], seq_lens [S], query_start_loc [S+1]; got "
            f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, {tuple(query_start_loc.shape)}"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        check_last_dim_contiguous(name, t)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int,
    *,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    decode_num_warps: int | None = None,
    decode_num_stages: int | None = None,
    out: torch.Tensor | None = None,
    overlap_passes: bool | None = None,
) -> torch.Tensor:
    """Causal paged attention; see ``kiln.plugins.attention.PagedAttention`` for the contract.

    max_query_len must bound every sequence's new-token count; max_seq_len only sizes the kv
    splits (pass a fixed upper bound when capturing a CUDA graph). Keyword overrides are for tests
    and tuning (``block_m``, ``num_warps`` and ``num_stages`` apply to the prefill pass, the
    ``decode_`` ones to the decode pass; see ``plan_passes``). Rows past query_start_loc[-1]
    (padding) are left unwritten, as in the reference. ``out`` (q's shape and dtype, rows of
    contiguous heads) receives the result instead of a new tensor. ``overlap_passes`` (default
    ``OVERLAP_PASSES``) runs the decode pass on a side stream beside the prefill pass (CUDA only).
    """
    _validate(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1 or out.stride(1) != head_dim:
        raise ValueError(
            f"out must be a {q.dtype} tensor of q's shape {tuple(q.shape)} with contiguous heads, got "
            f"{out.dtype} {tuple(out.shape)} with strides {out.stride()}"
        )
    if num_tokens == 0 or num_seqs == 0:
        return out
    seq_lens, query_start_loc = seq_lens.contiguous(), query_start_loc.contiguous()
    tuned = env_ints(DECODE_PLAN_ENV, 4) if max_query_len == 1 else None
    if tuned is not None:  # explicit arguments first
        block_n = block_n or tuned[0] or None
        decode_num_warps = decode_num_warps or tuned[1] or None
        decode_num_stages = decode_num_stages or tuned[2] or None
        num_splits = num_splits or tuned[3] or None
    passes = plan_passes(
        num_tokens, num_seqs, num_kv_heads, group, head_dim, q.dtype, max_query_len, max_seq_len, q.device,
        num_splits=num_splits, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
        decode_num_warps=decode_num_warps, decode_num_stages=decode_num_stages,
    )  # fmt: skip
    max_splits = max(p.num_splits for p in passes)
    if max_splits > 1:
        # fp32 partials shared by both passes (they write disjoint tokens):
        # acc [splits, T, Hq, D] (unnormalised), (max, sum) [splits, T, Hq, 2]
        part_acc = q.new_empty((max_splits, num_tokens, num_q_heads, head_dim), dtype=torch.float32)
        part_ml = q.new_empty((max_splits, num_tokens, num_q_heads, 2), dtype=torch.float32)
    else:
        # Never touched when no pass splits, but shaped like the real partials' pointers and strides:
        # Triton keys a compiled variant on pointer dtypes and stride classes too, so a pass that does
        # not split must launch the same variant whether or not the other pass splits (one that did
        # not compiled mid-run, in a served request's step, when a split decode pass sat beside it).
        # They are fp32 views of `out`'s memory: no allocation per call.
        t, h, d = num_tokens, num_q_heads, head_dim
        room = out.numel() * out.element_size() >= 4 * d
        f32 = out.view(torch.float32) if room else out.new_empty(d, dtype=torch.float32)
        part_acc = f32.as_strided((1, 1, 1, d), (t * h * d, h * d, d, 1))
        part_ml = f32.as_strided((1, 1, 1, 2), (t * h * 2, h * 2, 2, 1))
    block_d = next_pow2(head_dim)
    search_steps = num_seqs.bit_length()
    overlap = OVERLAP_PASSES if overlap_passes is None else overlap_passes
    side = side_stream(q.device) if overlap and len(passes) == 2 and q.is_cuda else None
    if side is not None:
        # The passes write disjoint rows of out and of the partials. The side stream starts after
        # everything queued so far (this step's K/V writes) and the main stream waits for it before
        # anything after this call (the merge, the next layer, freeing the partials for reuse).
        side.wait_stream(torch.cuda.current_stream(q.device))
    for p in passes:
        on_side = side is not None and p is passes[0]  # the decode pass
        with torch.cuda.stream(side) if on_side else contextlib.nullcontext():
            _launch_pass(p, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_acc,
                         part_ml, num_seqs, search_steps, scale, sliding_window, group, head_dim, block_d,
                         num_kv_heads, page_size)  # fmt: skip
    if side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)
    if max_splits > 1:
        wrap_triton(_merge_splits_kernel)[(num_tokens, num_q_heads)](
            part_acc, part_ml, out, query_start_loc,
            num_seqs, search_steps, passes[0].q_len_hi, passes[0].num_splits,
            passes[-1].num_splits if len(passes) > 1 else 1,
            part_acc.stride(0), part_acc.stride(1), part_acc.stride(2), part_ml.stride(0), part_ml.stride(1),
            out.stride(0), out.stride(1),
            # one variant for every split count the plan makes (one per power of two would compile
            # mid-run, the first time a step's shapes gave a new one)
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS_P2=next_pow2(max(max_splits, MAX_SPLITS)),
            # a decode step skips the search of each token's sequence: two dependent loads fewer
            ONE_TOKEN=max_query_len == 1, num_warps=4, **pdl_args(q.device),
        )  # fmt: skip
    return out


def _launch_pass(p, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_acc, part_ml,
                 num_seqs, search_steps, scale, sliding_window, group, head_dim, block_d, num_kv_heads,
                 page_size) -> None:  # fmt: skip
    """One pass of the tile kernel (see ``plan_passes``) on the current stream."""
    wrap_triton(_attention_tile_kernel)[(p.num_tiles, num_kv_heads, p.num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_acc, part_ml,
        num_seqs, p.q_len_lo, p.q_len_hi, p.tiles_per_seq, search_steps, p.num_splits,
        scale * math.log2(math.e), sliding_window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2), part_ml.stride(0), part_ml.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=p.block_m, BLOCK_N=p.block_n,
        TOKENS_PER_TILE=p.tokens_per_tile, PAGE_SIZE=page_size, USE_SEARCH=p.use_search,
        SPLIT=p.num_splits > 1, PRECISION=dot_precision(q.dtype),
        num_warps=p.num_warps, num_stages=p.num_stages, **pdl_args(q.device),
    )  # fmt: skip
