"""A long step's gated MLP in one piece against token chunks small enough to keep its intermediate in L2.

    python3 scripts/bench_mlp_chunks.py [--preset llama-3.1-8b] [--tokens 8192] [--chunks 256 512 1024]

In an 8,192-token step the gate|up output (8,192 x 2I bf16: 470 MB for Llama-3.1-8B) goes to HBM,
SiLU-and-mul reads it back and writes its half, which the down projection reads again: ~705 MB a
layer, ~0.24 ms at 3.0 TB/s. Run over chunks of C tokens, the intermediate is C x 2I (29 MB at 512)
and may stay in the 50 MB L2 between the three launches, if cuBLAS keeps its rate at M = C and the
weights streaming through do not evict it. This times the three launches (cuBLAS, kiln's
``silu_and_mul`` plugin, cuBLAS) as CUDA-graph replays, whole and chunked, on one layer's shapes with
the weights cycled past the L2 as in a real step; outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import json

import torch

from kiln.bench.presets import get_preset

_L2_BYTES = 256 << 20  # weight copies cycled until this much is read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=10, help="graph replays timed (median)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from kiln.bench.graph_timing import graph_replay_us
    from kiln.plugins import get_plugin

    silu = get_plugin("silu_and_mul").plugin.forward
    dev = torch.device("cuda")
    torch.manual_seed(0)
    c = get_preset(f"preset:{args.preset}").config
    h, i = c["hidden_size"], c["intermediate_size"]
    t = args.tokens
    layer_bytes = 3 * h * i * 2
    copies = max(2, min(64, _L2_BYTES // layer_bytes + 1))
    gate_up = [(torch.randn(2 * i, h, device=dev) / h**0.5).to(torch.bfloat16) for _ in range(copies)]
    down = [(torch.randn(h, i, device=dev) / i**0.5).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn(t, h, device=dev).to(torch.bfloat16)
    out = torch.empty(t, h, device=dev, dtype=torch.bfloat16)

    def mlp(rows: slice, j: int) -> None:
        out[rows] = torch.nn.functional.linear(silu(torch.nn.functional.linear(x[rows], gate_up[j])), down[j])

    def layers(chunk: int) -> None:  # one pass over every weight copy, as consecutive layers would
        for j in range(copies):
            for lo in range(0, t, chunk):
                mlp(slice(lo, min(t, lo + chunk)), j)

    layers(t)
    whole = out.clone()
    flops = 2 * t * h * 3 * i
    print(f"{args.preset} gated MLP, {t} tokens, H {h}, I {i}, on {torch.cuda.get_device_name()}; "
          f"{copies} weight copies; per layer:")  # fmt: skip
    rows = []
    for chunk in [t, *[ch for ch in args.chunks if ch < t]]:
        layers(chunk)
        torch.cuda.synchronize()
        err = (out.float() - whole.float()).abs().max().item()
        # the checked pass above is the warm-up; a replay runs every weight copy: per layer is / copies
        us = graph_replay_us(lambda chunk=chunk: layers(chunk), args.reps, warmup=0) / copies
        label = "whole" if chunk == t else f"chunks of {chunk}"
        print(f"  {label:<16} {us:8.1f} us  {flops / us / 1e6:6.0f} TFLOP/s  max |diff| vs whole {err:.3g}")
        rows.append(dict(chunk=chunk, us=us, tflops=flops / us / 1e6, max_diff=err))
    if args.json:
        meta = dict(preset=args.preset, tokens=t, card=torch.cuda.get_device_name(), torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
