"""Prefill-sized linear layers on cuBLAS: time per token across step sizes (rows), on a preset's shapes.

    python3 scripts/bench_prefill_gemm.py --preset llama-3.1-8b --rows 8150 8192 8320 8448 [--json FILE]

A mixed step's GEMMs run at ~720 TFLOP/s on an H100 (benchmarks/NOTES.md). With 128-row output tiles
a step of M rows makes ceil(M / 128) row tiles, and 132 SMs take a multiple of 66 of them in whole
waves: 8,448 rows (66 x 128) may waste less of the last wave than 8,192 (64 x 128). This measures it:
for each row count, every layer's projection (q|k|v, o, gate|up, down) back to back as a step runs them,
in microseconds a layer, TFLOP/s and microseconds per 1,000 tokens (what a token budget trades).
Outputs are checked against an fp32 product on a slice before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def layer_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each fused linear layer of the preset's decoder layer (bench_skinny_gemm's, without the
    LM head: a mixed step runs it on its sampling rows only)."""
    from bench_skinny_gemm import shapes  # (this script's folder is on the path)

    return {k: v for k, v in shapes(name).items() if k != "lm_head"}


def time_rows(
    shapes: dict[str, tuple[int, int]], rows: int, iters: int, dev: torch.device
) -> dict[str, float]:
    """Microseconds of each projection at ``rows`` rows (median of ``iters`` timed calls; CUDA events on
    a GPU, the wall clock elsewhere: only a GPU's figures count)."""
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out: dict[str, float] = {}
    for name, (n, k) in shapes.items():
        x = torch.randn(rows, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
        ref = x[:64].float() @ w.float().t()
        torch.testing.assert_close(F.linear(x, w)[:64].float(), ref, atol=2e-2, rtol=2e-2)
        for _ in range(3):
            F.linear(x, w)
        times = []
        for _ in range(iters):
            if dev.type != "cuda":
                t0 = time.perf_counter()
                F.linear(x, w)
                times.append((time.perf_counter() - t0) * 1e6)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            F.linear(x, w)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--rows", type=int, nargs="+", default=[8150, 8192, 8320, 8448, 8580, 8712])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the sizes, in rotated order")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    shapes = layer_shapes(args.preset)
    flops_per_row = sum(2 * n * k for n, k in shapes.values())
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{args.preset} on {name}: a layer's projections (F.linear; cuBLAS on a GPU)")
    columns = " ".join(f"{s:>9}" for s in shapes)
    print(f"{'rows':>6} {columns} {'layer us':>9} {'TFLOP/s':>8} {'us/1k tok':>9}")
    # Sizes in interleaved rounds, each round starting one size later, after a warm-up pass: a card's
    # clocks fall as it heats under GEMMs, and the size timed first on a cold card looked ~10% faster.
    time_rows(shapes, args.rows[0], 3, dev)
    runs: dict[int, list[dict[str, float]]] = {rows: [] for rows in args.rows}
    for r in range(args.rounds):
        for rows in args.rows[r % len(args.rows) :] + args.rows[: r % len(args.rows)]:
            runs[rows].append(time_rows(shapes, rows, args.iters, dev))
    report = []
    for rows in args.rows:
        us = {s: statistics.median(run[s] for run in runs[rows]) for s in shapes}
        total = sum(us.values())
        tflops = flops_per_row * rows / total / 1e6
        print(f"{rows:>6} " + " ".join(f"{us[s]:>9.1f}" for s in shapes)
              + f" {total:>9.1f} {tflops:>8.1f} {total / rows * 1e3:>9.1f}")  # fmt: skip
        report.append(dict(rows=rows, us=us, layer_us=total, tflops=tflops))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(preset=args.preset, device=name, torch=torch.__version__, rounds=args.rounds,
                           rows=report), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
