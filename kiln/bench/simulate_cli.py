"""``kiln bench simulate``: the engine's scheduler over a throughput workload, timed by a cost model
(``simulate.py``): its options, and the table it prints (also beside measured reports)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.bench.simulate import StepCostModel


def add_arguments(p: argparse.ArgumentParser, policies: list[str], num_requests: int, max_batch: int) -> None:
    """The simulate sub-parser's options; ``policies``, ``num_requests`` and ``max_batch`` are the
    throughput command's choices and defaults."""
    from kiln.bench.simulate import StepCostModel

    p.add_argument("--num-requests", type=int, default=num_requests)
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=128)
    p.add_argument("--isl-stdev", type=float, default=0.0)
    p.add_argument("--osl-stdev", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", nargs="+", default=policies, choices=policies)
    p.add_argument("--max-batch-size", type=int, default=max_batch)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--kv-tokens", type=int, default=438_368,
                   help="KV pool in tokens (default: Llama-3.1-8B, H100 80GB, kv fraction 0.9)")  # fmt: skip
    p.add_argument("--tokens-per-block", type=int, default=32)
    p.add_argument("--no-overlap", action="store_true", help="one step in flight (the engine on a CPU)")
    p.add_argument("--from-report", nargs="+", default=None, metavar="JSON",
                   help="simulate the workloads of these `kiln bench throughput --json` reports (requests, "
                   "limits, policy, KV pool) and print the model next to what they measured")  # fmt: skip
    d = StepCostModel()
    for name, help_ in (
        ("base_s", "a step's floor, seconds"),
        ("token_s", "seconds per token a step computes"),
        ("kv_bandwidth", "bytes/s of KV read by decode rows"),
        ("kv_bytes_per_token", "KV bytes per token, all layers"),
        ("attention_flops", "FLOP/s of the chunks' causal attention"),
        ("layers", "decoder layers"),
        ("attention_width", "query heads x head dim"),
    ):
        default = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"{help_} (default {default:g}: Llama-3.1-8B, BF16, H100, fitted)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from kiln.bench.simulate import StepCostModel, simulate
    from kiln.bench.workloads import synthetic
    from kiln.config import EngineLimits

    cost = StepCostModel(args.base_s, args.token_s, args.kv_bandwidth, args.kv_bytes_per_token,
                         args.attention_flops, args.layers, args.attention_width)  # fmt: skip
    if args.from_report:
        return _simulate_reports(args.from_report, args.tokens_per_block, cost)
    wl = synthetic(args.num_requests, args.isl, args.osl, 32_000, args.isl_stdev, args.osl_stdev, args.seed)
    limits = EngineLimits(args.max_batch_size, args.max_num_tokens, wl.max_seq_len)
    print(f"{wl.num_requests} requests, {args.isl}/{args.osl}; KV pool {args.kv_tokens:,} tokens, "
          f"max batch {args.max_batch_size}, {args.max_num_tokens} tokens a step")  # fmt: skip
    print(f"{'policy':20} {'steps':>6} {'decode-only':>11} {'mean batch':>10} {'preempted':>9} "
          f"{'model s':>8} {'output tok/s':>12}")  # fmt: skip
    for policy in args.policy:
        r = simulate(wl, policy, limits, args.kv_tokens, tokens_per_block=args.tokens_per_block,
                     overlap=not args.no_overlap, cost=cost)  # fmt: skip
        print(f"{r.policy:20} {r.steps:>6} {r.decode_steps:>11} {r.mean_batch:>10.1f} {r.preemptions:>9} "
              f"{r.seconds:>8.1f} {r.output_tok_s:>12,.0f}")  # fmt: skip
    return 0


def _simulate_reports(paths: list[str], tokens_per_block: int, cost: StepCostModel) -> int:
    """Each report's synthetic workload through the simulation, beside the report's own figures."""
    import json

    from kiln.bench.simulate import simulate
    from kiln.bench.workloads import synthetic
    from kiln.config import EngineLimits

    print(
        f"{'report':44} {'':8} {'steps':>6} {'decode-only':>11} {'preempted':>9} {'step s':>7} {'tok/s':>7}"
    )
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        w, st, res = rep["workload"], rep["settings"], rep["results"]["kiln"]
        if w["name"] != "synthetic" or "kv_capacity_tokens" not in res:
            print(f"{path}: not a synthetic throughput report with its KV capacity; skipped")
            continue
        wl = synthetic(
            w["num_requests"], w["isl"], w["osl"], 32_000, w["isl_stdev"], w["osl_stdev"], w["seed"]
        )
        limits = EngineLimits(st["max_batch_size"], st["max_num_tokens"], st["max_seq_len"] or wl.max_seq_len)
        policy = st.get("scheduler_policy", "guaranteed_no_evict")
        run = simulate(
            wl, policy, limits, res["kv_capacity_tokens"], tokens_per_block=tokens_per_block, cost=cost
        )
        (dec_n, dec_ms), (mix_n, mix_ms) = res["step_kinds"]
        step_s = (dec_n * dec_ms + mix_n * mix_ms) / 1e3
        name = os.path.splitext(os.path.basename(path))[0][-44:]
        print(f"{name:44} {'measured':8} {res['steps']:>6} {dec_n:>11} {res['preemptions']:>9} "
              f"{step_s:>7.1f} {res['output_tok_s']:>7,.0f}")  # fmt: skip
        print(f"{'':44} {'model':8} {run.steps:>6} {run.decode_steps:>11} {run.preemptions:>9} "
              f"{run.seconds:>7.1f} {run.output_tok_s:>7,.0f}")  # fmt: skip
    return 0
