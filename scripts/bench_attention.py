"""Paged attention's launch configurations swept: the prefill pass (torch's SDPA as a peer), --decode,
or --split (paged_attention_sdpa's fresh prompts through cuDNN beside the Triton kernel).

    python3 scripts/bench_attention.py [--json FILE] [--reps 30] [--case NAME ...]

Llama-3.1-8B heads (Hq 32, Hkv 8, D 128), bf16, the engine's default page size, block tables in
random order. Each case is timed under every prefill configuration (block_m x block_n x num_warps x
num_stages; block_n also applies to the decode pass of the mixed case); a configuration that fails
to compile or launch (e.g. out of shared memory) is skipped with its reason, and one whose output
misses the plugin's reference (computed in fp32 on the same inputs; max abs error >= 2e-2) is
reported and not timed. Times are medians of CUDA-event timings of CUDA-graph replays of one call
(--eager: of back-to-back calls) after a warm-up. Kernels launch directly, as the engine's plugin op
launches them, not through wrap_triton's tracing path (hundreds of us of host time a launch).
TFLOP/s counts the causal FLOPs 4·Hq·D·Σ_s (L_s·P_s + L_s(L_s+1)/2) (P_s: the cached prefix), as in
docs/kernels.md. The prefill-only cases also time torch.nn.functional.scaled_dot_product_attention
(is_causal, enable_gqa) on contiguous [B, H, L, D] tensors under each SDPA backend that runs: a
bound that pays for no paging.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kiln.config import KvCacheConfig

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B
DTYPE = torch.bfloat16
MAX_ABS_ERR = 2e-2

# option name -> (title, [(new tokens, kv length after the step)] per sequence, in packed order)
CASES: dict[str, tuple[str, list[tuple[int, int]]]] = {
    "prefill1": ("prefill 1x2048", [(2048, 2048)]),  # the TTFT case
    "prefill4": ("prefill 4x2048", [(2048, 2048)] * 4),  # a full 8192-token step
    "chunk": ("chunk 2048 after 2048", [(2048, 4096)]),
    "mixed": ("mixed 256 decode @2k + 1x2048", [(1, 2048)] * 256 + [(2048, 2048)]),
    "prefill64": ("prefill 64x128", [(128, 128)] * 64),  # a 128/128 prefill step
}

Config = tuple[int, int, int, int]  # block_m, block_n, num_warps, num_stages


def config_name(c: Config) -> str:
    return f"m{c[0]} n{c[1]} w{c[2]} s{c[3]}"


def causal_flops(seqs: list[tuple[int, int]]) -> int:
    return 4 * NUM_Q_HEADS * HEAD_DIM * sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in seqs)


def paged_batch(
    seqs: list[tuple[int, int]], page: int, device: torch.device, in_order: bool = False
) -> tuple:
    """The attention arguments (without sliding_window) for ``seqs``: every sequence's pages are drawn
    from one shuffled pool, so consecutive pages of a sequence are scattered through the cache
    (``in_order``: the pages are the blocks 0, 1, 2, ... in packed order, as a fresh pool gives them)."""
    need = [-(-kv // page) for _, kv in seqs]
    num_blocks = sum(need)
    perm = (torch.arange(num_blocks) if in_order else torch.randperm(num_blocks)).to(device, torch.int32)
    tables = torch.zeros((len(seqs), max(need)), dtype=torch.int32, device=device)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used : used + n]
        used += n
    shape = (num_blocks, page, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=device, dtype=DTYPE)
    v_cache = torch.randn(shape, device=device, dtype=DTYPE)
    q_lens = [q for q, _ in seqs]
    q = torch.randn(sum(q_lens), NUM_Q_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    query_start_loc = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32, device=device)
    return (q, k_cache, v_cache, tables, seq_lens, query_start_loc, max(q_lens), max(kv for _, kv in seqs),
            HEAD_DIM**-0.5)  # fmt: skip


def time_us(fn: Callable[[], object], reps: int, warmup: int, graph: bool) -> float:
    """Median microseconds of ``reps`` CUDA-event-timed runs of fn() after ``warmup`` calls: replays of
    a CUDA graph of one call (the GPU time alone), or with ``graph=False`` eager calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    run: Callable[[], object] = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
        run()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for s, e in zip(start, end, strict=True):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(start, end, strict=True))


def bounded(c: Config) -> bool:
    """Whether the default sweep keeps configuration ``c``. Left out, as their compiles cost most of
    the sweep's time: 64-row tiles with 8 warps (two warpgroups on one 64-row MMA tile), and tiles
    whose fp32 scores and accumulator alone need over 192 registers a thread (they spill; 128 x 128
    tiles on 4 warps compiled in ~6 s each and ran at ~0.6x the default on an H100)."""
    block_m, block_n, warps, _ = c
    fp32_regs = block_m * (block_n + HEAD_DIM) // (32 * warps)
    return not (block_m < 128 and warps > 4) and fp32_regs <= 192


def short_reason(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:120] if lines else ''}"


@dataclass
class Case:
    name: str
    seqs: list[tuple[int, int]]
    args: tuple
    ref: torch.Tensor
    flops: int
    default: Config
    rows: list[dict] = field(default_factory=list)


def default_config(args: tuple) -> Config:
    from kiln.plugins.triton.attention_plan import plan_passes

    q, k_cache = args[0], args[1]
    hkv = k_cache.shape[2]
    p = plan_passes(q.shape[0], args[4].shape[0], hkv, q.shape[1] // hkv, q.shape[2], q.dtype, args[6],
                    args[7], q.device)[-1]  # fmt: skip
    return (p.block_m, p.block_n, p.num_warps, p.num_stages)


def sdpa_peers(case: Case, reps: int, warmup: int, graph: bool) -> list[dict]:
    """torch SDPA on the case's own q/K/V laid out contiguously [B, H, L, D] (prefill cases only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k_cache, v_cache, tables = case.args[:4]
    length, page, b = case.seqs[0][0], k_cache.shape[1], len(case.seqs)
    n_pages = -(-length // page)

    def gather(cache: torch.Tensor) -> torch.Tensor:  # [B, Hkv, L, D]
        pages = [cache[tables[s, :n_pages].long()] for s in range(b)]  # [n_pages, page, Hkv, D] each
        per_seq = [p.reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:length] for p in pages]
        return torch.stack(per_seq).transpose(1, 2).contiguous()

    qb = q.view(b, length, NUM_Q_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    kb, vb = gather(k_cache), gather(v_cache)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        # GQA as the kernel takes it; a backend that refuses enable_gqa gets K/V repeated to Hq heads
        for gqa in (True, False):
            k_, v_ = (kb, vb) if gqa else (kb.repeat_interleave(group, 1), vb.repeat_interleave(group, 1))
            kw = {"enable_gqa": True} if gqa else {}

            def fn(k_=k_, v_=v_, kw=kw, backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qb, k_, v_, is_causal=True, **kw)

            label = f"sdpa {backend.name}" + ("" if gqa else " (K/V repeated)")
            try:
                with warnings.catch_warnings():  # a refusing backend warns once per reason
                    warnings.simplefilter("ignore")
                    out = fn().transpose(1, 2).reshape(-1, NUM_Q_HEADS, HEAD_DIM)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                print(f"  {label}: skip: {short_reason(e)}")
                continue
            err = (out.float() - case.ref).abs().max().item()
            try:
                us = time_us(fn, reps, warmup, graph)
            except Exception as e:  # noqa: BLE001
                print(f"  {label}: skip: {short_reason(e)}")
                continue
            rows.append(dict(case=case.name, kind="sdpa", config=label, us=us, tflops=case.flops / us / 1e6,
                             default=False, max_abs_err=err))  # fmt: skip
            break
    return rows


def varlen_peers(case: Case, reps: int, warmup: int, graph: bool) -> list[dict]:
    """torch's packed variable-length attention ops on the case's q and its K/V gathered from the pages
    into packed [T_k, H, D] (the gather timed on its own): cuDNN with K/V at their own head count and
    repeated to Hq, and flash. A chunk after a cached prefix (seq_q < seq_k) checks which end the
    causal diagonal is aligned to: a wrong alignment shows as a max error, not a time."""
    q, k_cache, v_cache, tables, seq_lens, qsl = case.args[:6]
    page = k_cache.shape[1]

    def seq_slots(s: int, kv: int) -> torch.Tensor:
        pos = torch.arange(kv, device=q.device)
        return tables[s, pos // page].long() * page + pos % page

    slots = torch.cat([seq_slots(s, kv) for s, (_, kv) in enumerate(case.seqs)])
    flat_k, flat_v = k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM), v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    cu_q = qsl.to(torch.int32)
    cu_k = torch.tensor([0, *[kv for _, kv in case.seqs]], device=q.device).cumsum(0).to(torch.int32)
    max_q, max_k = max(n for n, _ in case.seqs), max(kv for _, kv in case.seqs)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    k, v = flat_k.index_select(0, slots), flat_v.index_select(0, slots)
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    aten = torch.ops.aten

    def cudnn(k_: torch.Tensor, v_: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: aten._cudnn_attention_forward(q, k_, v_, None, cu_q, cu_k, max_q, max_k, False, 0.0,
                                                     True, False, scale=HEAD_DIM**-0.5)[0]  # fmt: skip

    def flash() -> torch.Tensor:
        return aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                             scale=HEAD_DIM**-0.5)[0]  # fmt: skip

    candidates: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("varlen cudnn (GQA)", cudnn(k, v)), ("varlen cudnn (K/V repeated)", cudnn(kr, vr)),
        ("varlen flash (GQA)", flash)]  # fmt: skip
    lengths = {n for n, _ in case.seqs}
    if all(n == kv for n, kv in case.seqs) and len(lengths) == 1:
        # equal fresh prompts: packed q *is* [B, L, H, D]; SDPA takes the strided [B, H, L, D] view
        b, n = len(case.seqs), lengths.pop()

        def bshd(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, t.shape[1], HEAD_DIM).transpose(1, 2)

        def dense() -> torch.Tensor:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(
                    bshd(q), bshd(k), bshd(v), is_causal=True, enable_gqa=True
                )
            return o.transpose(1, 2).reshape(-1, NUM_Q_HEADS, HEAD_DIM)

        candidates.append(("dense cudnn, strided views (GQA)", dense))
    rows = []
    for label, fn in candidates:
        try:
            out = fn()
            torch.cuda.synchronize()
            err = (out.float() - case.ref).abs().max().item()
            try:  # a host sync in the op would stall the engine's overlapped step loop
                torch.cuda.set_sync_debug_mode("error")
                fn()
                label += ", no sync"
            except RuntimeError:
                label += ", SYNCS"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            # cuDNN's variable-length path fails CUDA-graph capture (H100, torch 2.11): timed eagerly
            eager = not graph or label.startswith("varlen cudnn")
            us = time_us(fn, reps, warmup, not eager)
            label += ", eager" if eager else ""
        except Exception as e:  # noqa: BLE001
            print(f"  {case.name}: {label}: skip: {short_reason(e)}")
            continue
        rows.append(dict(case=case.name, kind="sdpa", config=label, us=us, tflops=case.flops / us / 1e6,
                         default=False, max_abs_err=err))  # fmt: skip
    copies: list[tuple[str, Callable[[], object]]] = [
        ("gather K+V from pages", lambda: (flat_k.index_select(0, slots), flat_v.index_select(0, slots))),
        ("repeat K+V to Hq heads", lambda: (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))),
    ]
    for label, fn in copies:
        us = time_us(fn, reps, warmup, graph)
        rows.append(dict(case=case.name, kind="sdpa", config=label, us=us, tflops=0.0, default=False,
                         max_abs_err=0.0))  # fmt: skip
    return rows


def print_table(case: Case, skipped: dict[str, str]) -> None:
    paged = sorted((r for r in case.rows if r["kind"] == "paged"), key=lambda r: r["us"])
    peers = sorted((r for r in case.rows if r["kind"] == "sdpa"), key=lambda r: r["us"])
    default_us = next((r["us"] for r in paged if r["default"]), None)
    print(f"\n{case.name}: {len(case.seqs)} sequence(s), {sum(q for q, _ in case.seqs)} new tokens, "
          f"{case.flops / 1e9:.1f} GFLOP causal; default {config_name(case.default)} (*)")  # fmt: skip
    if case.name.startswith("mixed"):
        kv_bytes = 2 * sum(kv for _, kv in case.seqs) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
        print(f"  (block_n also applies to the decode pass here; its K/V stream, {kv_bytes / 1e9:.2f} GB, "
              "is memory bound)")  # fmt: skip
    print(f"  {'config':<34} {'us':>9} {'TFLOP/s':>8} {'vs default':>10} {'max err':>8}")
    for r in paged + peers:
        rel = f"{default_us / r['us']:.2f}x" if default_us else "-"
        label = r["config"] + (" *" if r["default"] else "")
        print(f"  {label:<34} {r['us']:9.1f} {r['tflops']:8.1f} {rel:>10} {r['max_abs_err']:8.1e}")
    for name, why in skipped.items():
        print(f"  {name:<34} skip: {why}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    case_help = "cases to run: " + ", ".join(f"{k} ({title})" for k, (title, _) in CASES.items())
    ap.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES), help=case_help)
    ap.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--num-warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--num-stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--all", action="store_true", help="also run the configurations bounded() leaves out")
    ap.add_argument("--page-size", type=int, default=KvCacheConfig().tokens_per_block,
                    help="tokens per KV page (default: the engine's tokens_per_block)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=30, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stop starting new configurations after this many seconds of sweep")  # fmt: skip
    ap.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA peers")
    ap.add_argument("--varlen", action="store_true",
                    help="time only the defaults; torch's packed variable-length ops as peers")  # fmt: skip
    ap.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    ap.add_argument("--overlap", action="store_true",
                    help="mixed case: also time every configuration on two streams")  # fmt: skip
    ap.add_argument("--json", default=None, help="write every row and the environment to this file")
    ap.add_argument("--decode", action="store_true", help="sweep the decode pass instead (DECODE_CASES)")
    ap.add_argument(
        "--split",
        action="store_true",
        help="time paged_attention_sdpa's fresh-prompt split against Triton alone (SPLIT_CASES)",
    )
    ap.add_argument("--decode-case", nargs="+", choices=list(DECODE_CASES), default=list(DECODE_CASES))
    ap.add_argument("--decode-block-n", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--decode-warps", type=int, nargs="+", default=[4])
    ap.add_argument("--decode-stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--decode-splits", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--decode-calls", type=int, default=1,
                    help="decode sweep: calls per timed graph, each on its own K/V (a model's layers back to "
                    "back: 32 times a call of a few us out of the launch's noise)")  # fmt: skip
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA device")
    with direct_launches():
        run_decode(args) if args.decode else run_split(args) if args.split else run(args)


def direct_launches() -> contextlib.AbstractContextManager:
    """Kernels launched straight away, as the engine's plugin op launches them (kiln/plugins/registry.py)."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # a torch without the switch
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


def run(args: argparse.Namespace) -> None:

    import triton

    from kiln.plugins import get_plugin
    from kiln.plugins.triton.paged_attention import paged_attention

    t_start = time.time()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    reference = get_plugin("paged_attention").plugin.reference
    gpu = torch.cuda.get_device_name()
    print(f"paged attention prefill sweep on {gpu}: torch {torch.__version__}, triton {triton.__version__}, "
          f"bf16, Hq {NUM_Q_HEADS} Hkv {NUM_KV_HEADS} D {HEAD_DIM}, page {args.page_size}")  # fmt: skip

    cases = []
    for key in args.case:
        name, seqs = CASES[key]
        batch = paged_batch(seqs, args.page_size, dev)
        # the reference on fp32 copies: the kernel's error is then its own plus one bf16 rounding
        ref = reference(*(t.float() for t in batch[:3]), *batch[3:], 0)
        cases.append(Case(name, seqs, batch, ref, causal_flops(seqs), default_config(batch)))
    torch.cuda.synchronize()
    print(f"inputs and references ready in {time.time() - t_start:.1f} s")

    configs: list[Config] = []
    for c in [*(case.default for case in cases),
              *itertools.product(args.block_m, args.block_n, args.num_warps, args.num_stages)]:  # fmt: skip
        if c in configs or (args.varlen and c not in [k.default for k in cases]):
            continue
        if not args.all and not bounded(c) and c not in [k.default for k in cases]:
            continue
        configs.append(c)
    print(f"{len(configs)} configurations x {len(cases)} cases (default first)")

    skipped: dict[str, dict[str, str]] = {case.name: {} for case in cases}
    t_sweep = time.time()
    for i, c in enumerate(configs):
        name = config_name(c)
        if time.time() - t_sweep > args.budget_s:
            print(f"[{i + 1}/{len(configs)}] {name}: skip: the sweep's {args.budget_s:.0f} s are spent")
            for case in cases:
                skipped[case.name][name] = "time budget"
            continue
        overrides = dict(block_m=c[0], block_n=c[1], num_warps=c[2], num_stages=c[3])
        t0 = time.time()
        notes = []
        for case in cases:

            def fn(case=case, overrides=overrides):
                return paged_attention(*case.args, 0, **overrides, overlap_passes=False)  # one stream

            try:
                out = fn()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                why = short_reason(e)
                skipped[case.name][name] = why
                notes.append(f"{case.name}: skip: {why}")
                continue
            err = (out.float() - case.ref).abs().max().item()
            if not err < MAX_ABS_ERR:  # NaN fails too
                skipped[case.name][name] = f"wrong: max abs error {err:.3g}"
                notes.append(f"{case.name}: WRONG (max abs error {err:.3g}), not timed")
                continue
            try:
                us = time_us(fn, args.reps, args.warmup, not args.eager)
            except Exception as e:  # noqa: BLE001
                why = short_reason(e)
                skipped[case.name][name] = why
                notes.append(f"{case.name}: skip: {why}")
                continue
            case.rows.append(dict(case=case.name, kind="paged", config=name, block_m=c[0], block_n=c[1],
                                  num_warps=c[2], num_stages=c[3], us=us, tflops=case.flops / us / 1e6,
                                  default=c == case.default, max_abs_err=err))  # fmt: skip
            notes.append(f"{us:.0f} us")
            if args.overlap and case.name.startswith("mixed"):
                # the same launches with the decode pass on a second stream beside the prefill pass
                def fn_overlap(case=case, overrides=overrides):
                    return paged_attention(*case.args, 0, **overrides, overlap_passes=True)

                same = torch.equal(fn_overlap(), out)
                us_o = time_us(fn_overlap, args.reps, args.warmup, not args.eager)
                case.rows.append(dict(case=case.name, kind="paged", config=name + " overlap", block_m=c[0],
                                      block_n=c[1], num_warps=c[2], num_stages=c[3], us=us_o,
                                      tflops=case.flops / us_o / 1e6, default=False, max_abs_err=err,
                                      same_as_sequential=same))  # fmt: skip
                notes.append(f"overlapped {us_o:.0f} us{'' if same else ' (OUTPUT DIFFERS)'}")
        print(f"[{i + 1}/{len(configs)}] {name} ({time.time() - t0:.1f} s): " + "; ".join(notes), flush=True)

    if not args.no_sdpa:
        print("\ntorch SDPA peers (prefill-only cases)")
        for case in cases:
            if all(kv == q for q, kv in case.seqs) and len({q for q, _ in case.seqs}) == 1:
                case.rows += sdpa_peers(case, args.reps, args.warmup, not args.eager)
    if args.varlen:
        print("\ntorch variable-length attention peers")
        for case in cases:
            if not case.name.startswith("mixed"):
                case.rows += varlen_peers(case, args.reps, args.warmup, not args.eager)

    for case in cases:
        print_table(case, skipped[case.name])
    print(f"\ntotal {time.time() - t_start:.0f} s")

    if args.json:
        meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                    python=platform.python_version(), page_size=args.page_size, dtype="bfloat16",
                    heads=dict(q=NUM_Q_HEADS, kv=NUM_KV_HEADS, dim=HEAD_DIM), reps=args.reps,
                    timing="eager" if args.eager else "cuda graph replay",
                    cases={c.name: dict(seqs=len(c.seqs), flops=c.flops, default=config_name(c.default))
                           for c in cases})  # fmt: skip
        rows = [r for case in cases for r in case.rows]
        skips = [dict(case=k, config=n, reason=why) for k, d in skipped.items() for n, why in d.items()]
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, skipped=skips), f, indent=1)
        print(f"wrote {args.json}")


# ------------------------------------------------------------------ the decode pass (--decode)

# option name -> (title, number of sequences, (min, max) KV length): one new token each, lengths drawn
# uniformly with a fixed seed; the running batches of the throughput workloads
DECODE_CASES: dict[str, tuple[str, int, tuple[int, int]]] = {
    "decode512": ("decode 512 x 129-256 (128/128)", 512, (129, 256)),
    "decode200": ("decode 200 x 2049-2176 (2048/128)", 200, (2049, 2176)),
    "decode100": ("decode 100 x 2049-4096 (2048/2048)", 100, (2049, 4096)),
    # batch 1: a decode graph plans its splits for the engine's longest context, so each step at bs 1
    # pays the split partials and the merge launch; are they worth it at a few hundred keys?
    "decode1": ("decode 1 x 129-384 (bs-1 latency)", 1, (129, 384)),
}

DecodeConfig = tuple[int, int, int, int]  # block_n, num_warps, num_stages, num_splits (0: the planner's)


def run_decode(args: argparse.Namespace) -> None:
    """The decode pass under each (block_n, warps, stages, splits); GB/s of its K/V stream."""
    import random

    import triton

    from kiln.plugins import get_plugin
    from kiln.plugins.triton.paged_attention import paged_attention

    dev = torch.device("cuda")
    torch.manual_seed(0)
    reference = get_plugin("paged_attention").plugin.reference
    gpu = torch.cuda.get_device_name()
    print(f"paged attention decode sweep on {gpu}: torch {torch.__version__}, triton {triton.__version__}")
    rows: list[dict] = []
    for key in args.decode_case:
        title, n, (lo, hi) = DECODE_CASES[key]
        rng = random.Random(0)
        seqs = [(1, rng.randint(lo, hi)) for _ in range(n)]
        # one batch per call of the timed graph: the same sequences, each call on its own K/V (as layers)
        batches = [paged_batch(seqs, args.page_size, dev) for _ in range(args.decode_calls)]
        batch = batches[0]
        ref = reference(*(t.float() for t in batch[:3]), *batch[3:], 0)
        kv_bytes = 2 * sum(kv for _, kv in seqs) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
        per = f", {args.decode_calls} calls a graph, us per call" if args.decode_calls > 1 else ""
        print(f"\n{title}: K/V stream {kv_bytes / 1e9:.2f} GB{per}")
        print(f"  {'block_n warps stages splits':<30} {'us':>8} {'GB/s':>7} {'vs default':>10}")
        default_us = None
        configs: list[DecodeConfig] = [(0, 0, 0, 0)]
        configs += itertools.product(
            args.decode_block_n, args.decode_warps, args.decode_stages, args.decode_splits
        )
        for c in configs:
            bn, warps, stages, splits = c
            kw = dict(block_n=bn or None, decode_num_warps=warps or None, decode_num_stages=stages or None,
                      num_splits=splits or None)  # fmt: skip

            def fn(kw=kw, batch=batch):
                return paged_attention(*batch, 0, **kw)

            def fn_all(kw=kw, batches=batches):
                for b in batches:
                    paged_attention(*b, 0, **kw)

            label = "default" if c == (0, 0, 0, 0) else f"n{bn} w{warps} s{stages} splits {splits}"
            try:
                out = fn()
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                if not err < MAX_ABS_ERR:
                    print(f"  {label:<30} WRONG (max abs error {err:.3g})")
                    continue
                us = time_us(fn_all, args.reps, args.warmup, not args.eager) / len(batches)
            except Exception as e:  # noqa: BLE001
                print(f"  {label:<30} skip: {short_reason(e)}")
                continue
            default_us = default_us or us
            print(f"  {label:<30} {us:8.1f} {kv_bytes / us / 1e3:7.0f} {default_us / us:9.2f}x", flush=True)
            rows.append(
                dict(
                    case=title,
                    config=label,
                    us=us,
                    gbps=kv_bytes / us / 1e3,
                    default=label == "default",
                    calls=len(batches),
                    pdl=os.environ.get("KILN_PDL", "0") == "1",
                )
            )
    if args.json:
        with open(args.json, "w") as f:
            meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__)
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")


# ------------------------------------------------------------------ fresh prompts to SDPA (--split)

# name -> (title, [(new tokens, kv length after the step)] in packed order): decode rows first
SPLIT_CASES: dict[str, tuple[str, list[tuple[int, int]]]] = {
    "mixed2048x128": ("2048/128 mixed: 150 decode @2.1k + 3x2048 + 1x1500",
                      [(1, 2100)] * 150 + [(2048, 2048)] * 3 + [(1500, 1500)]),
    "budget8192": ("8,192-token step: 180 decode @2.1k + 182 after 1,866 + 3x2048 + 1x1686",
                   [(1, 2100)] * 180 + [(182, 2048)] + [(2048, 2048)] * 3 + [(1686, 1686)]),
    "budget8448": ("8,448-token step: 180 decode @2.1k + 1,972 after 76 + 3x2048 + 1x152",
                   [(1, 2100)] * 180 + [(1972, 2048)] + [(2048, 2048)] * 3 + [(152, 152)]),
    "mixed2048x2048": ("2048/2048 mixed: 100 decode @3k + 1x2048", [(1, 3000)] * 100 + [(2048, 2048)]),
    "chunked": ("a chunk after its prefix + 2x2048", [(1000, 3048)] + [(2048, 2048)] * 2),
}  # fmt: skip


def run_split(args: argparse.Namespace) -> None:
    """paged_attention_sdpa's forward_into with the step's FreshPrompts (the leading sequences to the
    Triton kernel, the trailing fresh prompts to cuDNN) against the Triton kernel alone on the same
    step; CUDA-graph replays of one call (the split's Python launches cost nothing in the figure,
    as they do not in a step whose GPU work outlasts them). The split four ways: "split" (equal
    prompts batched, K/V gathered), "in-place" (K/V read where they lie: the pages run in order here,
    as on a fresh pool), "one-by-one" (every prompt its own call, gathered: the earlier plugin) and
    "overlap" (in place, the decode rows on a side stream: the engine's default). The others run on one
    stream (KILN_ATTENTION_OVERLAP=0)."""
    import numpy as np
    import triton

    from kiln.engine.attention_metadata import FreshPrompts
    from kiln.plugins import get_plugin, sdpa_prefill
    from kiln.plugins.triton import paged_attention as triton_attention

    dev = torch.device("cuda")
    torch.manual_seed(0)
    reference = get_plugin("paged_attention").plugin.reference
    triton_into = get_plugin("paged_attention").into_impl
    split_into = get_plugin("paged_attention_sdpa").into_impl
    gpu = torch.cuda.get_device_name()
    print(f"fresh-prompt split on {gpu}: torch {torch.__version__}, triton {triton.__version__}, bf16, "
          f"Hq {NUM_Q_HEADS} Hkv {NUM_KV_HEADS} D {HEAD_DIM}, page {args.page_size}")  # fmt: skip
    rows: list[dict] = []
    one_by_one_runs = lambda lengths, *_: [(i, 1) for i in range(len(lengths))]  # noqa: E731
    batched_runs = sdpa_prefill.sdpa_runs
    overlap_default = False  # one stream unless a variant says otherwise (the engine's default is on)
    triton_attention.OVERLAP_PASSES = overlap_default
    for key, (title, seqs) in SPLIT_CASES.items():
        batch = paged_batch(seqs, args.page_size, dev, in_order=True)
        ref = reference(*(t.float() for t in batch[:3]), *batch[3:], 0)
        computed = np.array([kv - q for q, kv in seqs])
        new = np.array([q for q, _ in seqs])
        num_decode = int(np.sum((new == 1) & (computed > 0)))
        fresh = FreshPrompts.of_step(computed, new, num_decode)
        tables = batch[3].cpu().numpy()
        updates = np.array([(s, j, tables[s, j]) for s, (_, kv) in enumerate(seqs)
                            for j in range(-(-kv // args.page_size))])  # fmt: skip
        placed = FreshPrompts.of_step(
            computed, new, num_decode, np.arange(len(seqs)), updates, args.page_size
        )
        out = torch.empty_like(batch[0])
        times = {}

        def alone(out=out, batch=batch):
            triton_into(out, *batch, 0)

        def split(out=out, batch=batch, fresh=fresh):
            sdpa_prefill.sdpa_runs = batched_runs
            split_into(out, *batch, 0, fresh_prompts=fresh)

        def in_place(out=out, batch=batch, fresh=placed):
            sdpa_prefill.sdpa_runs = batched_runs
            split_into(out, *batch, 0, fresh_prompts=fresh)

        def one_by_one(out=out, batch=batch, fresh=fresh):
            sdpa_prefill.sdpa_runs = one_by_one_runs
            split_into(out, *batch, 0, fresh_prompts=fresh)

        def overlap(out=out, batch=batch, fresh=placed):  # in place, the decode rows on a side stream
            sdpa_prefill.sdpa_runs = batched_runs
            triton_attention.OVERLAP_PASSES = True
            try:
                split_into(out, *batch, 0, fresh_prompts=fresh)
            finally:
                triton_attention.OVERLAP_PASSES = overlap_default

        variants = (("triton", alone), ("split", split), ("in-place", in_place), ("one-by-one", one_by_one),
                    ("overlap", overlap))  # fmt: skip
        for name, fn in variants:
            try:
                fn()
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                if not err < MAX_ABS_ERR:
                    print(f"  {title}: {name} WRONG (max abs error {err:.3g})")
                    continue
                times[name] = time_us(fn, args.reps, args.warmup, not args.eager)
            except Exception as e:  # noqa: BLE001 - e.g. a backend that cannot be captured here
                print(f"  {title}: {name} skip: {short_reason(e)}")
        sdpa_prefill.sdpa_runs = batched_runs
        if "triton" in times:
            others = ", ".join(
                f"{k} {v:.1f} us ({times['triton'] / v:.2f}x)" for k, v in times.items() if k != "triton"
            )
            print(f"{title}: Triton {times['triton']:.1f} us, {others}", flush=True)
        rows.append(dict(case=key, title=title, **{f"{k}_us": v for k, v in times.items()}))
    if args.json:
        with open(args.json, "w") as f:
            meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__)
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
