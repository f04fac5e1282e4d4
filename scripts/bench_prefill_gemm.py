"""Prefill-sized linear layers on cuBLAS: time per token across step sizes (rows), on a preset's shapes.

    python3 scripts/bench_prefill_gemm.py --preset llama-3.1-8b --rows 8150 8192 8320 8448 [--json FILE]

A mixed step's GEMMs run at ~720 TFLOP/s on an H100 (benchmarks/NOTES.md). With 128-row output tiles
a step of M rows makes ceil(M / 128) row tiles, and 132 SMs take a multiple of 66 of them in whole
waves: 8,448 rows (66 x 128) may waste less of the last wave than 8,192 (64 x 128). This measures it:
for each row count, every layer's projection (q|k|v, o, gate|up, down) back to back as a step runs them,
in microseconds a layer, TFLOP/s and microseconds per 1,000 tokens (what a token budget trades).
Outputs are checked against an fp32 product on a slice before anything is timed.

``--blas cublas cublaslt`` times every size under each of torch's BLAS back ends in turn
(``torch.backends.cuda.preferred_blas_library``: cuBLAS's ``cublasGemmEx``, or cuBLASLt with its own
heuristic), to tell whether either picks faster kernels for a shape.

``--residual`` times instead the two projections whose output joins the residual stream (o and down)
with what follows them, two ways: ``F.linear`` then the fused residual add + RMSNorm kernel (as the
engine runs them), against ``torch.addmm(residual, x, W^T)`` (cuBLAS adds the residual in its
epilogue, reading it once) then a plain RMSNorm. Bound: the second way moves one [rows, H] tensor
fewer (at 8,448 rows of Llama-8B, 69 MB: ~23 us at 3.0 TB/s, twice a layer, ~1.5 ms a mixed step of
32 layers) if cuBLAS keeps its speed with the epilogue's read. On the CPU the norms are plain torch.
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
        out[name] = _median_us(lambda x=x, w=w: F.linear(x, w), iters, dev)
    return out


def _norms(dev: torch.device):
    """(rms_norm, fused_add_rms_norm): the engine's Triton kernels on a GPU, plain torch elsewhere."""
    if dev.type == "cuda":
        from kiln.plugins.triton.norms import fused_add_rms_norm, rms_norm

        return rms_norm, fused_add_rms_norm
    from kiln.plugins.norms import rms_norm_reference

    def fused(x, residual, weight, eps):
        h = x + residual
        return rms_norm_reference(h, weight, eps), h

    return rms_norm_reference, fused


def time_residual(
    shapes: dict[str, tuple[int, int]], rows: int, iters: int, dev: torch.device
) -> dict[str, float]:
    """Microseconds of o and down with the residual add and the next RMSNorm, each two ways: "NAME"
    (linear, then the fused add + norm) and "NAME+addmm" (addmm with the residual, then the norm)."""
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rms_norm, fused_add_rms_norm = _norms(dev)
    out: dict[str, float] = {}
    for name in ("o", "down"):
        n, k = shapes[name]
        x = torch.randn(rows, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
        residual = torch.randn(rows, n, device=dev, dtype=dt)
        g = torch.rand(n, device=dev, dtype=dt) + 0.5

        def apart(x=x, w=w, residual=residual, g=g):
            return fused_add_rms_norm(F.linear(x, w), residual, g, 1e-5)

        def in_epilogue(x=x, w=w, residual=residual, g=g):
            h = torch.addmm(residual, x, w.t())
            return rms_norm(h, g, 1e-5), h

        (a_norm, a_h), (b_norm, b_h) = apart(), in_epilogue()
        torch.testing.assert_close(b_h.float(), a_h.float(), atol=5e-2, rtol=2e-2)
        torch.testing.assert_close(b_norm.float(), a_norm.float(), atol=5e-2, rtol=2e-2)
        for label, fn in ((name, apart), (f"{name}+addmm", in_epilogue)):
            out[label] = _median_us(fn, iters, dev)
    return out


def _median_us(fn, iters: int, dev: torch.device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if dev.type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--rows", type=int, nargs="+", default=[8150, 8192, 8320, 8448, 8580, 8712])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the sizes, in rotated order")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--blas",
        nargs="+",
        default=None,
        choices=["cublas", "cublaslt"],
        help="time each size under these BLAS back ends in turn (default: torch's own choice)",
    )
    ap.add_argument(
        "--residual", action="store_true", help="o and down + residual add + RMSNorm: apart or in cuBLAS"
    )
    args = ap.parse_args()
    dev = torch.device(args.device)
    shapes = layer_shapes(args.preset)
    if args.residual:
        run_residual(args, shapes, dev)
        return
    flops_per_row = sum(2 * n * k for n, k in shapes.values())
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{args.preset} on {name}: a layer's projections (F.linear; cuBLAS on a GPU)")
    columns = " ".join(f"{s:>9}" for s in shapes)
    print(f"{'rows':>6} {columns} {'layer us':>9} {'TFLOP/s':>8} {'us/1k tok':>9}")
    # Sizes in interleaved rounds, each round starting one size later, after a warm-up pass: a card's
    # clocks fall as it heats under GEMMs, and the size timed first on a cold card looked ~10% faster.
    time_rows(shapes, args.rows[0], 3, dev)
    blases = args.blas or [None]
    cases = [(rows, blas) for rows in args.rows for blas in blases]
    runs: dict[tuple[int, str | None], list[dict[str, float]]] = {case: [] for case in cases}
    for r in range(args.rounds):
        for rows, blas in cases[r % len(cases) :] + cases[: r % len(cases)]:
            if blas is not None and dev.type == "cuda":
                torch.backends.cuda.preferred_blas_library(blas)
            runs[rows, blas].append(time_rows(shapes, rows, args.iters, dev))
    report = []
    for rows, blas in cases:
        us = {s: statistics.median(run[s] for run in runs[rows, blas]) for s in shapes}
        total = sum(us.values())
        tflops = flops_per_row * rows / total / 1e6
        label = f"  {blas}" if blas else ""
        print(f"{rows:>6} " + " ".join(f"{us[s]:>9.1f}" for s in shapes)
              + f" {total:>9.1f} {tflops:>8.1f} {total / rows * 1e3:>9.1f}{label}")  # fmt: skip
        report.append(dict(rows=rows, blas=blas, us=us, layer_us=total, tflops=tflops))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(preset=args.preset, device=name, torch=torch.__version__, rounds=args.rounds,
                           rows=report), f, indent=1)  # fmt: skip


def run_residual(args: argparse.Namespace, shapes: dict[str, tuple[int, int]], dev: torch.device) -> None:
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{args.preset} on {name}: o and down with the residual add and RMSNorm, apart vs addmm (us)")
    print(f"{'rows':>6} {'o':>9} {'o+addmm':>9} {'down':>9} {'down+addmm':>10} {'saved/layer':>11}")
    report = []
    for rows in args.rows:
        runs = [time_residual(shapes, rows, args.iters, dev) for _ in range(args.rounds)]
        us = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        saved = us["o"] + us["down"] - us["o+addmm"] - us["down+addmm"]
        print(f"{rows:>6} {us['o']:>9.1f} {us['o+addmm']:>9.1f} {us['down']:>9.1f} {us['down+addmm']:>10.1f}"
              f" {saved:>11.1f}")  # fmt: skip
        report.append(dict(rows=rows, us=us, saved_us_per_layer=saved))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(preset=args.preset, device=name, torch=torch.__version__, residual=report), f, indent=1
            )


if __name__ == "__main__":
    main()
