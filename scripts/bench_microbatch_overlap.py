"""A mixed step's decoder layers as one batch against two micro-batches on two streams: whether the
decode rows' memory-bound work hides beside the prompts' compute-bound GEMMs.

    python3 scripts/bench_microbatch_overlap.py [--decode-rows 190] [--context 2100] [--prompts 4]
        [--prompt-len 2048] [--layers 8] [--json FILE]

A 2048/128 mixed step carries ~190 decode rows at ~2,100 tokens of context and ~4 fresh prompts. In
one batch every GEMM runs on all rows (compute-bound at ~8,400 rows) and, per layer, the decode
rows' paged attention (1.6 GB of K/V a layer on Llama-3.1-8B, memory-bound) runs alone between them.
Split, the prompts' layers (GEMMs, cuDNN attention) run on one stream and the decode rows' layers
(the same weights read again at 190 rows, and the paged attention) on another, so the second can
use the memory bandwidth and SMs the first leaves idle. This times, per layer, as CUDA-graph replays
of ``--layers`` layers: the one batch, each micro-batch alone, and both micro-batches on two
streams. The split wins if "two streams" comes under "one batch"; "max of the two alone" is its
floor. Each variant runs kiln's plugin kernels (norms, SiLU-and-mul, the paged Triton attention,
cuDNN through ``causal_sdpa``) and cuBLAS GEMMs, on one layer's weights reused by every layer (a
layer's 0.44 GB is far past the L2). RoPE and the KV write are left out of every variant alike (a
copy of q stands in for RoPE's output). The
split's outputs are first checked against the one batch's.

On a machine without CUDA (``--device cpu``) the reference kernels run at the sizes given, with no
streams or graphs: a check of the script, with times of no meaning.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    page: int


LLAMA_8B = Shape(hidden=4096, intermediate=14336, q_heads=32, kv_heads=8, head_dim=128, page=32)
TINY = Shape(hidden=64, intermediate=128, q_heads=4, kv_heads=2, head_dim=16, page=16)


class MixedLayer:
    """One decoder layer's kernels over a mixed step's rows: the first ``decode`` rows decode against a
    paged cache, the rest are ``prompts`` fresh prompts of ``prompt_len`` tokens each."""

    def __init__(self, shape: Shape, decode: int, context: int, prompts: int, prompt_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
        from kiln.plugins import get_plugin

        backend = "forward" if device.type == "cuda" else "reference"
        self.add_rms = get_plugin("fused_add_rms_norm").impl(backend)
        self.silu_mul = get_plugin("silu_and_mul").impl(backend)
        self.paged = get_plugin("paged_attention").impl(backend)
        self.shape, self.decode, self.prompts, self.prompt_len = shape, decode, prompts, prompt_len
        self.context = context
        s, g = shape, torch.Generator(device=device).manual_seed(0)  # drawn where they live: fast

        def weight(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, generator=g, device=device) / cols**0.5).to(dtype)

        self.q_width, self.kv_width = s.q_heads * s.head_dim, s.kv_heads * s.head_dim
        self.w_qkv = weight(self.q_width + 2 * self.kv_width, s.hidden)
        self.w_o = weight(s.hidden, self.q_width)
        self.w_gate_up = weight(2 * s.intermediate, s.hidden)
        self.w_down = weight(s.hidden, s.intermediate)
        self.norm_in = torch.ones(s.hidden, device=device, dtype=dtype)
        self.norm_post = torch.ones(s.hidden, device=device, dtype=dtype)
        # the decode rows' cache: each row's context in its own pages, in a shuffled order
        pages_each = -(-(context + 1) // s.page)
        num_blocks = 1 + decode * pages_each
        cache_shape = (num_blocks, s.page, s.kv_heads, s.head_dim)
        self.k_cache = torch.randn(cache_shape, generator=g, device=device).to(dtype)
        self.v_cache = torch.randn(cache_shape, generator=g, device=device).to(dtype)
        order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1
        self.block_tables = order.view(decode, pages_each).to(device=device, dtype=torch.int32)
        self.seq_lens = torch.full((decode,), context + 1, device=device, dtype=torch.int32)
        self.query_start = torch.arange(decode + 1, device=device, dtype=torch.int32)
        self.scale = s.head_dim**-0.5

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decode: bool, prompts: bool,
                  out: torch.Tensor) -> None:  # fmt: skip
        """Rows [0, d) decode against the cache (d = decode rows when ``decode``), the rest are the
        fresh prompts (when ``prompts``), attending to their own K/V rows."""
        from kiln.plugins.sdpa_prefill import causal_sdpa

        d = self.decode if decode else 0
        if decode:
            out[:d] = self.paged(q[:d], self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                                 self.query_start, 1, self.context + 1, self.scale, 0)  # fmt: skip
        if prompts:
            n, length = self.prompts, self.prompt_len
            o = causal_sdpa(q[d:].unflatten(0, (n, length)), k[d:].unflatten(0, (n, length)),
                            v[d:].unflatten(0, (n, length)), self.scale)  # fmt: skip
            out[d:] = o.flatten(0, 1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, decode: bool, prompts: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One layer over the rows of the chosen micro-batches (decode rows first)."""
        s, eps = self.shape, 1e-5
        h, residual = self.add_rms(x, residual, self.norm_in, eps)
        qkv = F.linear(h, self.w_qkv)
        # q contiguous, as the RoPE kernel's output is in the engine (its one extra pass stands in for it)
        q = qkv[:, : self.q_width].unflatten(1, (s.q_heads, s.head_dim)).contiguous()
        k = qkv[:, self.q_width : self.q_width + self.kv_width].unflatten(1, (s.kv_heads, s.head_dim))
        v = qkv[:, self.q_width + self.kv_width :].unflatten(1, (s.kv_heads, s.head_dim))
        attn = torch.empty_like(q)
        self.attention(q, k, v, decode, prompts, attn)
        h, residual = self.add_rms(F.linear(attn.flatten(1), self.w_o), residual, self.norm_post, eps)
        return F.linear(self.silu_mul(F.linear(h, self.w_gate_up)), self.w_down), residual


def run_layers(layer: MixedLayer, x: torch.Tensor, residual: torch.Tensor, layers: int, decode: bool,
               prompts: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    for _ in range(layers):
        x, residual = layer.forward(x, residual, decode, prompts)
    return x, residual


def two_streams(layer: MixedLayer, xd: torch.Tensor, rd: torch.Tensor, xp: torch.Tensor, rp: torch.Tensor,
                layers: int, side: torch.cuda.Stream) -> None:  # fmt: skip
    """The prompts' layers on the current stream, the decode rows' on ``side``; joined at the end
    (the fork and join are events, so a graph capture records both streams)."""
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        run_layers(layer, xd, rd, layers, decode=True, prompts=False)
    run_layers(layer, xp, rp, layers, decode=False, prompts=True)
    main.wait_stream(side)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode-rows", type=int, default=190)
    ap.add_argument("--context", type=int, default=2100, help="each decode row's cached tokens")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8, help="layers in a timed graph (times: per layer)")
    ap.add_argument("--reps", type=int, default=10, help="graph replays timed (median)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    ap.add_argument("--tiny", action="store_true", help="tiny head and hidden sizes (the CPU check)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = dict(decode_rows=args.decode_rows, context=args.context, prompts=args.prompts,
                 prompt_len=args.prompt_len, layers=args.layers, reps=args.reps)  # fmt: skip
    if bad := {k: v for k, v in sizes.items() if v < 1}:
        raise SystemExit(
            f"--decode-rows, --context, --prompts, --prompt-len, --layers, --reps must be >= 1, got {bad}"
        )
    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = TINY if args.tiny else LLAMA_8B
    layer = MixedLayer(shape, args.decode_rows, args.context, args.prompts, args.prompt_len, dev, dtype)
    d, p = args.decode_rows, args.prompts * args.prompt_len
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(d + p, shape.hidden, generator=g, device=dev).to(dtype)
    res = torch.zeros_like(x)

    # the split computes what the one batch does (row for row, up to the GEMMs' summation order)
    with torch.inference_mode():
        whole, _ = layer.forward(x, res, decode=True, prompts=True)
        dec, _ = layer.forward(x[:d], res[:d], decode=True, prompts=False)
        pro, _ = layer.forward(x[d:], res[d:], decode=False, prompts=True)
    split = torch.cat([dec, pro])
    err = (split.float() - whole.float()).abs().max().item()
    scale = whole.float().abs().max().item()
    tolerance = 2e-2 * scale if on_gpu else 1e-4 * scale
    card = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"{args.decode_rows} decode rows @{args.context} + {args.prompts} x {args.prompt_len} prompt "
          f"tokens, {args.layers} layers, hidden {shape.hidden}, on {card}")  # fmt: skip
    print(f"split vs one batch: max abs error {err:.3g} (outputs up to {scale:.3g}; allowed {tolerance:.3g})")
    if not err <= tolerance:
        raise SystemExit("the split's outputs differ from the one batch's")
    if not on_gpu:
        print("no CUDA device: outputs checked, nothing timed")
        return

    from kiln.bench.graph_timing import graph_replay_us

    n, side = args.layers, torch.cuda.Stream()
    xd, rd, xp, rp = x[:d].clone(), res[:d].clone(), x[d:].clone(), res[d:].clone()
    variants = {
        "one batch": lambda: run_layers(layer, x, res, n, True, True),
        "decode rows alone": lambda: run_layers(layer, xd, rd, n, True, False),
        "prompts alone": lambda: run_layers(layer, xp, rp, n, False, True),
        "two streams": lambda: two_streams(layer, xd, rd, xp, rp, n, side),
    }
    print(f"\n{'per layer':<24}{'us':>10}")
    per_layer: dict[str, float] = {}
    with torch.inference_mode():
        for name, fn in variants.items():  # each row as it is measured: a run cut short keeps them
            per_layer[name] = graph_replay_us(fn, args.reps) / n
            print(f"{name:<24}{per_layer[name]:>10.1f}", flush=True)
    per_layer["max of the two alone"] = max(per_layer["decode rows alone"], per_layer["prompts alone"])
    print(f"{'max of the two alone':<24}{per_layer['max of the two alone']:>10.1f}")
    gain = 1 - per_layer["two streams"] / per_layer["one batch"]
    print(f"two streams against one batch: {100 * gain:+.1f}% a layer")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "per_layer_us": per_layer, "max_abs_err": err}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
