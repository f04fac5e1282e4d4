"""Decode-sized linear layers: torch (cuBLAS) against kiln's skinny GEMM and GEMV, on a preset's shapes.

    python3 scripts/bench_skinny_gemm.py --preset llama-3.1-8b --rows 1 2 4 8 [--sweep] [--json FILE]

The GEMV serves one row only; ``--sweep`` times each of its tile configurations at one row against
the plan's choice.

Each layer's weight is cycled through enough copies to exceed the L2 cache, as in a real step where
every layer reads its own weights; times come from CUDA graphs of back-to-back calls (as the engine
replays them); GB/s counts the weight bytes.
Both outputs are checked against an fp32 product before anything is timed. For q|k|v, gate|up and
down, the norm or SiLU-and-mul launched before cuBLAS is also timed against the skinny GEMM (and, at
one row, the GEMV) that applies it as a prologue.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from kiln.bench.presets import get_preset
from kiln.plugins.triton.gemv import add_rms_norm_gemv, gemv, silu_mul_gemv
from kiln.plugins.triton.skinny_gemm import add_rms_norm_skinny_gemm, silu_mul_skinny_gemm, skinny_gemm

_L2_BYTES = 256 << 20  # copies of a weight until this much is cycled through (H100/H200 L2: 50 MB)


def shapes(name: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each fused linear layer of the preset's decoder layer, and of the LM head."""
    c = get_preset(f"preset:{name}").config
    h, i, nh = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv, d = c.get("num_key_value_heads", nh), c.get("head_dim") or c["hidden_size"] // nh
    return {
        "qkv": ((nh + 2 * kv) * d, h),
        "o": (h, nh * d),
        "gate_up": (2 * i, h),
        "down": (h, i),
        "lm_head": (c["vocab_size"], h),
    }


def time_fn(fn, weights: list[torch.Tensor], x: torch.Tensor, iters: int) -> float:
    """Microseconds a call of fn(x, w), cycling through the weight copies, as a CUDA graph of ``iters``
    calls replays them: back to back on the device, as in the engine's graphs, with no host launch
    cost in the figure (timing each eager call measures the Python launch path of a few-us kernel)."""
    for w in weights[:3]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(iters):
            fn(x, weights[j % len(weights)])
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return 1e3 * statistics.median(times) / iters


def fused_rows(
    layer: str, weights: list[torch.Tensor], n: int, k: int, args: argparse.Namespace
) -> list[dict]:
    """The norm (before q|k|v and gate|up) or SiLU-and-mul (before down) as its own launch then cuBLAS,
    against the skinny GEMM with it as a prologue."""
    from kiln.plugins import get_plugin

    linear = torch.nn.functional.linear
    silu = get_plugin("silu_and_mul").plugin.forward
    norm = get_plugin("fused_add_rms_norm").plugin.forward
    dev, rows = weights[0].device, []
    for m in args.rows:
        other = torch.randn(m, 2 * k if layer == "down" else k, device=dev).to(torch.bfloat16)
        nw = torch.ones(k, device=dev, dtype=torch.bfloat16)
        if layer == "down":  # x is unused: gate|up (`other`) is the input

            def apart(x_, w_, g=other):
                return linear(silu(g), w_)

            def fused(x_, w_, g=other):
                return silu_mul_skinny_gemm(g, w_)

            def fused_gemv(x_, w_, g=other, **tiles):
                return silu_mul_gemv(g, w_, **tiles)

        else:  # `other` is the residual

            def apart(x_, w_, r=other, nw=nw):
                return linear(norm(x_, r, nw, 1e-5)[0], w_)

            def fused(x_, w_, r=other, nw=nw):
                return add_rms_norm_skinny_gemm(x_, r, nw, 1e-5, w_)[0]

            def fused_gemv(x_, w_, r=other, nw=nw, **tiles):
                return add_rms_norm_gemv(x_, r, nw, 1e-5, w_, **tiles)[0]

        what = "silu_and_mul" if layer == "down" else "fused_add_rms_norm"
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        t_apart = time_fn(apart, weights, x, args.iters)
        t_fused = time_fn(fused, weights, x, args.iters)
        t_gemv = time_fn(fused_gemv, weights, x, args.iters) if m == 1 else float("nan")
        best = {}
        if args.sweep and m == 1:  # the GEMV prologue's column tiles (x's row is re-read per program)
            swept = {}
            for cfg in itertools.product((1, 2, 4, 8, 16, 32), (512, 1024), (4, 8)):

                def fn(x_, w_, cfg=cfg, fused_gemv=fused_gemv):
                    return fused_gemv(x_, w_, block_n=cfg[0], block_k=cfg[1], num_warps=cfg[2])

                swept[cfg] = time_fn(fn, weights, x, args.iters // 4)
            ranked = sorted(swept.items(), key=lambda kv: kv[1])
            cfg, t_best = ranked[0]
            sweep = [[*c, t] for c, t in ranked]
            best = dict(gemv_fused_best_us=t_best, gemv_fused_best=cfg, gemv_fused_sweep=sweep)
            print(f"  best GEMV prologue: block_n {cfg[0]} block_k {cfg[1]} warps {cfg[2]} {t_best:.1f} us")
        print(f"{layer:<8} {f'{n} x {k}':>14} {m:>2}   {what} + cuBLAS {t_apart:7.1f} us, skinny prologue "
              f"{t_fused:7.1f} us ({t_apart / t_fused:.2f}x), GEMV prologue {t_gemv:7.1f} us "
              f"({t_apart / t_gemv:.2f}x)")  # fmt: skip
        rows.append(dict(layer=layer, n=n, k=k, m=m, prologue=what, apart_us=t_apart, fused_us=t_fused,
                         gemv_fused_us=t_gemv, **best))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time every GEMV tile configuration at one row")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows_out = []
    print(f"{args.preset} on {torch.cuda.get_device_name()}, bf16; us and GB/s of weight bytes")
    head = ("layer", "N x K", "M", "torch us", "GB/s", "skinny us", "GB/s", "speed-up")
    head += ("GEMV us", "GB/s", "speed-up")
    print("{:<8} {:>14} {:>2} {:>9} {:>6} {:>9} {:>6} {:>8} {:>9} {:>6} {:>8}".format(*head))
    for layer, (n, k) in shapes(args.preset).items():
        nbytes = n * k * 2
        copies = max(2, min(64, _L2_BYTES // nbytes + 1))
        weights = [(torch.randn(n, k, device=dev) / k**0.5).to(torch.bfloat16) for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            ref = x.float() @ weights[0].float().T
            kernels = [("torch", torch.nn.functional.linear), ("skinny", skinny_gemm)]
            for name, fn in kernels + ([("gemv", gemv)] if m == 1 else []):
                err = (fn(x, weights[0]).float() - ref).abs().max().item()
                if err > 0.05 * ref.abs().max().item() + 1e-2:
                    raise SystemExit(f"{name} {layer} M={m}: max error {err:.3g}, not timing a wrong kernel")
            t_torch = time_fn(torch.nn.functional.linear, weights, x, args.iters)
            t_skinny = time_fn(skinny_gemm, weights, x, args.iters)
            t_gemv = time_fn(gemv, weights, x, args.iters) if m == 1 else float("nan")
            gbs = lambda t, b=nbytes: b / (t * 1e-6) / 1e9  # noqa: E731
            best = ""
            row = dict(layer=layer, n=n, k=k, m=m, torch_us=t_torch, skinny_us=t_skinny, gemv_us=t_gemv,
                       torch_gb_s=gbs(t_torch), skinny_gb_s=gbs(t_skinny), gemv_gb_s=gbs(t_gemv))  # fmt: skip
            if args.sweep and m == 1:  # the GEMV plan's choice against every tile configuration
                swept = {}
                for cfg in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 3)):

                    def fn(x_, w_, cfg=cfg):
                        bn, bk, warps, stages = cfg
                        return gemv(x_, w_, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)

                    try:
                        swept[cfg] = time_fn(fn, weights, x, args.iters // 4)
                    except Exception as e:  # noqa: BLE001 - a configuration that cannot launch here
                        print(f"  GEMV {cfg}: skip ({type(e).__name__})")
                ranked = sorted(swept.items(), key=lambda kv: kv[1])
                (bn, bk, warps, stages), t_best = ranked[0]
                best = f"  best GEMV: block_n {bn} block_k {bk} warps {warps} stages {stages} {t_best:.1f} us"
                row.update(best_us=t_best, best_block_n=bn, best_block_k=bk, best_warps=warps,
                           best_stages=stages, sweep=[[*cfg, t] for cfg, t in ranked])  # fmt: skip
            print(f"{layer:<8} {f'{n} x {k}':>14} {m:>2} {t_torch:9.1f} {gbs(t_torch):6.0f} {t_skinny:9.1f} "
                  f"{gbs(t_skinny):6.0f} {t_torch / t_skinny:7.2f}x {t_gemv:9.1f} {gbs(t_gemv):6.0f} "
                  f"{t_torch / t_gemv:7.2f}x{best}")  # fmt: skip
            rows_out.append(row)
        if layer in ("qkv", "gate_up", "down"):  # the prologue each would take, fused or launched apart
            rows_out += fused_rows(layer, weights, n, k, args)
        del weights
    if args.json:
        meta = dict(preset=args.preset, card=torch.cuda.get_device_name(), torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows_out), f, indent=1)


if __name__ == "__main__":
    main()
