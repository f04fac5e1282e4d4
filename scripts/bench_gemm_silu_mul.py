"""The gated MLP's gate|up projection + SiLU-and-mul at prefill row counts: cuBLAS then kiln's
``silu_and_mul`` against the fused Triton GEMM (kiln/plugins/triton/gemm_silu_mul.py).

    python3 scripts/bench_gemm_silu_mul.py [--preset llama-3.1-8b llama-3.2-1b] [--shape K,N ...]
        [--rows 2048 8192 8448] [--sweep] [--json FILE]
    python3 scripts/bench_gemm_silu_mul.py --device cpu --preset tiny-llama --rows 64 --iters 2  # smoke

For each shape (K = hidden size, N = intermediate size: x [rows, K], weight [2N, K]) and row count it
times (a) ``silu_and_mul(F.linear(x, w))``, the unfused path with its [rows, 2N] intermediate, (b) the
fused kernel under ``default_config`` or, with ``--sweep``, each configuration of a small sweep, and for
reference ``F.linear`` alone (cuBLAS's GEMM, the speed the fused kernel's GEMM must hold). Every output
is checked against the plain-torch reference before anything is timed; a configuration that fails to
compile (shared memory, registers) or to match is reported and skipped. Times are the median of
``--iters`` replays of a CUDA graph of ``--reps`` back-to-back calls (as the engine replays them, with
no host launch cost in the figure); on the CPU (Triton's interpreter) only the wall clock of a call,
whose figures mean nothing but that the script runs. TFLOP/s counts 2 * rows * K * 2N. The unfused
path runs for ``--warm-up-s`` first (a cold card's clocks read ~10% fast) and is timed first and last;
speed-ups are against the mean of the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_PRESETS = ["llama-3.1-8b", "llama-3.2-1b"]


def preset_shape(name: str) -> tuple[int, int]:
    """(K, N) of a kiln preset's MLP: hidden size and intermediate size."""
    from kiln.bench.presets import get_preset

    c = get_preset(f"preset:{name}").config
    return c["hidden_size"], c["intermediate_size"]


def sweep_configs() -> list[Any]:
    """The default tile in each variant, then the knobs most likely to move it on an H100: pipeline
    depth, L2 grouping, a narrower or taller tile, a longer K step. Sizes are those that fit
    227 KB of shared memory with no register spills when compiled for sm_90a."""
    from kiln.plugins.triton.gemm_silu_mul import GemmSiluMulConfig

    base = GemmSiluMulConfig()
    r = dataclasses.replace
    return [
        base,
        r(base, num_stages=4),
        r(base, flatten=True),
        r(base, persistent=False),
        r(base, persistent=False, num_stages=4),
        r(base, tma=False),
        r(base, tma=False, persistent=False),
        r(base, group_m=4),
        r(base, group_m=8),
        r(base, group_m=32),
        r(base, group_m=64),
        r(base, block_k=128, num_stages=2),
        r(base, block_m=256, block_n=64),
        r(base, block_n=64, num_warps=4, num_stages=4),
        r(base, block_m=64, num_warps=4, num_stages=4),
    ]


def time_us(fn: Callable[[], Any], dev: torch.device, iters: int, reps: int) -> float:
    """Microseconds a call: median over ``iters`` replays of a CUDA graph of ``reps`` calls on a GPU;
    the median wall clock of single calls elsewhere."""
    if dev.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    from kiln.bench.graph_timing import graph_replay_us

    return graph_replay_us(fn, iters, calls=reps)


def bench_shape(k: int, n: int, rows: int, configs: list[Any], args: argparse.Namespace) -> list[dict]:
    from kiln.plugins.triton.activation import silu_and_mul
    from kiln.plugins.triton.gemm_silu_mul import gemm_silu_mul, gemm_silu_mul_reference

    dev = torch.device(args.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16  # the interpreter has no bf16
    x = torch.randn(rows, k, device=dev, dtype=dt)
    w = (torch.randn(2 * n, k, device=dev) / k**0.5).to(dt)
    ref = gemm_silu_mul_reference(x, w)
    flops = 2 * rows * k * 2 * n

    def check(out: torch.Tensor) -> None:
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)

    variants: list[tuple[str, Any, Callable[[], Any]]] = [
        ("cublas+silu_and_mul", None, lambda: silu_and_mul(F.linear(x, w))),
        ("cublas linear only", None, lambda: F.linear(x, w)),
    ]
    variants += [(f"fused {c.label()}", c, functools.partial(gemm_silu_mul, x, w, c)) for c in configs]
    # The unfused path again last: a card's clocks fall as it heats under GEMMs, so speed-ups are taken
    # against the mean of both timings, after a warm-up that heats it first.
    variants.append(("cublas+silu_and_mul again", None, variants[0][2]))
    if dev.type == "cuda":
        t_end = time.perf_counter() + args.warm_up_s
        while time.perf_counter() < t_end:
            variants[0][2]()
            torch.cuda.synchronize()
    out: list[dict] = []
    for name, cfg, fn in variants:
        row: dict[str, Any] = dict(k=k, n=n, rows=rows, variant=name,
                                   config=dataclasses.asdict(cfg) if cfg is not None else None)  # fmt: skip
        try:
            if name != "cublas linear only":
                check(fn())
            us = time_us(fn, dev, args.iters, args.reps)
        except Exception as e:  # a configuration that does not compile or match: report, go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"{k:>6} {n:>6} {rows:>6}  {name:<52} failed: {row['error']}")
            out.append(row)
            continue
        row.update(us=us, tflops=flops / us / 1e6)
        out.append(row)
    timed = [r for r in out if "us" in r]
    base = [r["us"] for r in timed if r["variant"].startswith("cublas+silu_and_mul")]
    base_us = statistics.mean(base) if base else None
    for r in out:
        if "us" not in r:
            continue
        r["speedup"] = base_us / r["us"] if base_us else None
        speedup = f"{r['speedup']:>7.3f}" if r["speedup"] else f"{'-':>7}"
        print(f"{k:>6} {n:>6} {rows:>6}  {r['variant']:<52} {r['us']:>10.1f} {r['tflops']:>8.1f} {speedup}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=None, help=f"kiln presets (default: {DEFAULT_PRESETS})")
    ap.add_argument("--shape", action="append", default=[], help="K,N (hidden, intermediate); repeatable")
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 8192, 8448])
    ap.add_argument("--sweep", action="store_true", help="time each configuration of the sweep")
    ap.add_argument("--only", type=int, nargs="+", default=None, help="with --sweep: these entries (0-based)")
    ap.add_argument("--iters", type=int, default=20, help="timed graph replays (median)")
    ap.add_argument("--reps", type=int, default=10, help="calls in each replayed graph")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warm-up-s", type=float, default=2.0, help="seconds of the unfused path before timing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type != "cuda":  # before anything imports triton: its kernels are made at import
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    from kiln.plugins.triton.gemm_silu_mul import default_config

    if args.only is not None and any(not 0 <= i < len(sweep_configs()) for i in args.only):
        ap.error(f"--only takes entries 0..{len(sweep_configs()) - 1} of the sweep, got {args.only}")

    presets = args.preset if args.preset is not None else ([] if args.shape else DEFAULT_PRESETS)
    shapes = [preset_shape(p) for p in presets]
    shapes += [(int(a), int(b)) for a, b in (s.split(",") for s in args.shape)]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    print(f"gate|up GEMM + SiLU-and-mul on {name}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'K':>6} {'N':>6} {'rows':>6}  {'variant':<52} {'us':>10} {'TFLOP/s':>8} {'speedup':>7}")
    results = []
    for k, n in shapes:
        for rows in args.rows:
            configs = sweep_configs() if args.sweep else [default_config(rows, n, k)]
            if args.sweep and args.only is not None:
                configs = [configs[i] for i in args.only]
            results += bench_shape(k, n, rows, configs, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                           results=results), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
