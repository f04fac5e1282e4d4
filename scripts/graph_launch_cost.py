"""Host cost of replaying one CUDA graph, alone and with many other graphs instantiated.

    python3 scripts/graph_launch_cost.py [--nodes 150] [--others 400] [--other-nodes 15]

Plain torch, nothing of the engine: a graph of ``--nodes`` small kernels is replayed and the CPU time
of ``replay()`` measured (median of many, the GPU kept ahead so the launch queue never blocks), then
``--others`` graphs of ``--other-nodes`` kernels each are captured into a second pool and the first
graph is timed again. Tells whether the driver's launch cost grows with the graphs a process holds
(the engine's decode-graph launch did, once piecewise graphs were captured: benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def step(kind: str):
    """One node's work: a torch elementwise kernel, a Triton kernel (the engine's RMSNorm, launched
    directly as its plugin op does), or a cuBLAS GEMV."""
    if kind == "torch":
        return lambda y, w: y * 1.0001
    if kind == "cublas":
        return lambda y, w: (w @ y.view(-1, 1)).view(-1)
    from torch._library.triton import set_wrap_triton_enabled

    from kiln.plugins.triton.norms import rms_norm

    def norm(y, w):
        with set_wrap_triton_enabled(False):
            return rms_norm(y.view(1, -1), w[0], 1e-5).view(-1)

    return norm


def capture(n: int, x: torch.Tensor, w: torch.Tensor, pool: object, kind: str) -> torch.cuda.CUDAGraph:
    op = step(kind)
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = x
        for _ in range(n):  # warm-up outside the capture
            y = op(y, w)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(g, pool=pool, stream=stream):
        y = x
        for _ in range(n):
            y = op(y, w)
    return g


def replay_cpu_us(g: torch.cuda.CUDAGraph, reps: int) -> float:
    times = []
    for i in range(reps):
        if i % 50 == 0:
            torch.cuda.synchronize()  # never let the queue fill: time the launch, not a wait
        t = time.perf_counter()
        g.replay()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=150)
    ap.add_argument("--others", type=int, default=400)
    ap.add_argument("--other-nodes", type=int, default=15)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--kind", choices=["torch", "triton", "cublas"], default="torch", help="the kernels")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_launch_cost.py needs a CUDA device")
    x = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    main_graph = capture(args.nodes, x, w, torch.cuda.graph_pool_handle(), args.kind)
    before = replay_cpu_us(main_graph, args.reps)
    pool = torch.cuda.graph_pool_handle()
    others = [capture(args.other_nodes, x, w, pool, args.kind) for _ in range(args.others)]
    for g in others[:3]:
        g.replay()
    after = replay_cpu_us(main_graph, args.reps)
    del others
    torch.cuda.synchronize()
    freed = replay_cpu_us(main_graph, args.reps)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"replay() of a {args.nodes}-node graph of {args.kind} kernels, CPU time (median of {args.reps}):")
    print(f"  alone                                   {before:7.1f} us")
    print(f"  with {args.others} graphs of {args.other_nodes} nodes instantiated  {after:7.1f} us")
    print(f"  after those are freed                   {freed:7.1f} us")


if __name__ == "__main__":
    main()
