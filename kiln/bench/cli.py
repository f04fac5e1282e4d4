"""``kiln bench``: throughput, latency, serve (an HTTP load generator), simulate and presets.

``kiln.cli`` calls ``add_arguments(parser)`` on the ``bench`` sub-parser and ``main(args)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, get_args

from kiln.bench import simulate_cli
from kiln.bench.throughput import DEFAULT_HF_BATCH_SIZE, DEFAULT_HF_NUM_REQUESTS, DEFAULT_NUM_REQUESTS
from kiln.config import SchedulerPolicy

# The sub-parsers built by add_arguments, so a run can write its command line back out.
_PARSERS: dict[str, argparse.ArgumentParser] = {}

THROUGHPUT_MAX_BATCH = 512
_POLICIES = list(get_args(SchedulerPolicy))  # the scheduler's admission policies


def command_line(args: argparse.Namespace) -> str:
    """``kiln bench CMD`` and every option whose value differs from its default, in parser order:
    the command that reproduces this run, however it was invoked."""
    import shlex

    parser = _PARSERS[args.bench_command]
    words = ["kiln", "bench", args.bench_command]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _serve_module() -> Any | None:
    """``kiln.bench.serve`` when it and its dependencies import, else None."""
    try:
        from kiln.bench import serve
    except ImportError:
        return None
    return serve


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or preset:NAME (see `kiln bench presets`)")
    p.add_argument(
        "--backend",
        default="kiln",
        choices=["kiln", "hf", "both"],
        help="kiln (default), hf (transformers on the same device) or both, side by side",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="auto: the checkpoint's dtype on a GPU, float32 on the CPU",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help=f"engine max batch size (default: {THROUGHPUT_MAX_BATCH} for throughput, else the batch size)",
    )
    p.add_argument(
        "--max-num-tokens",
        type=int,
        default=None,
        help="engine token budget per step (default: the engine's, whole GEMM waves of the GPU near 8,192: "
        "8,448 on an H100; 8,192 on the CPU)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="engine context limit (default: the workload's longest request, rounded up to 256)",
    )
    p.add_argument(
        "--kv-fraction",
        type=float,
        default=0.9,
        help="share of free GPU memory for the KV cache (default 0.9)",
    )
    p.add_argument(
        "--scheduler-policy",
        default="guaranteed_no_evict",
        choices=_POLICIES,
        help="admission: reserve each request's whole KV budget (default), or admit while the next chunk "
        "fits and preempt the newest sequence when one cannot grow",
    )
    p.add_argument("--executor", default="auto", choices=["auto", "thread", "process"])
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="KIND=NAME",
        help="use plugin NAME for KIND (repeatable), e.g. linear=skinny_linear",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="run the decoder layers eagerly (inside the CUDA graphs) instead of through torch.compile",
    )
    p.add_argument(
        "--no-piecewise-graphs",
        action="store_true",
        help="run prefill and mixed steps eagerly instead of through piecewise CUDA graphs",
    )
    p.add_argument(
        "--preset-cache",
        default=None,
        metavar="DIR",
        help="where presets are materialised (default ~/.cache/kiln/presets)",
    )
    p.add_argument(
        "--roofline",
        default="auto",
        choices=["auto", "configured", "measured"],
        help="device peaks for the bound: configured (H100: 3.0 TB/s, 794 TFLOP/s), measured "
        "(timed on this device) or auto (configured on an H100 SXM, measured elsewhere)",
    )
    p.add_argument(
        "--hbm-bandwidth", type=float, default=None, help="bytes/s for the bound (sets configured)"
    )
    p.add_argument("--peak-flops", type=float, default=None, help="FLOP/s for the bound (sets configured)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    p.add_argument(
        "--host-profile",
        default=None,
        metavar="FILE",
        help="profile the engine loop's host time with cProfile into FILE (read it with "
        "`python -m kiln.executor.host_profile FILE`)",
    )
    p.add_argument(
        "--append-results",
        default=None,
        metavar="FILE",
        help="append one markdown row to FILE (e.g. benchmarks/RESULTS.md)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    t = sub.add_parser("throughput", help="offline throughput: every request queued at once, EOS ignored")
    _add_common(t)
    _PARSERS["throughput"] = t
    t.add_argument(
        "--workload",
        default="synthetic",
        choices=["synthetic", "nano-vllm"],
        help="synthetic (random ids, --isl/--osl) or nano-vllm (256 requests, lengths 100-1024, "
        "temperature 0.6, max_model_len 4096)",
    )
    t.add_argument(
        "--num-requests",
        type=int,
        default=DEFAULT_NUM_REQUESTS,
        help=f"requests (default {DEFAULT_NUM_REQUESTS}: minutes at most on an H100 at 128/128)",
    )
    t.add_argument("--isl", type=int, default=128, help="mean prompt tokens (default 128)")
    t.add_argument("--osl", type=int, default=128, help="mean output tokens (default 128)")
    t.add_argument("--isl-stdev", type=float, default=0.0, help="prompt length standard deviation")
    t.add_argument("--osl-stdev", type=float, default=0.0, help="output length standard deviation")
    t.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    t.add_argument("--warmup-requests", type=int, default=4, help="short requests run before timing")
    t.add_argument(
        "--hf-num-requests",
        type=int,
        default=DEFAULT_HF_NUM_REQUESTS,
        help=f"requests the transformers peer runs (default {DEFAULT_HF_NUM_REQUESTS}; the first N)",
    )
    t.add_argument(
        "--hf-batch-size",
        type=int,
        default=DEFAULT_HF_BATCH_SIZE,
        help=f"transformers generate batch size (default {DEFAULT_HF_BATCH_SIZE})",
    )
    lat = sub.add_parser("latency", help="decode speed of a small batch, prefill excluded")
    _add_common(lat)
    _PARSERS["latency"] = lat
    lat.add_argument("--isl", type=int, default=128, help="prompt tokens (default 128)")
    lat.add_argument("--osl", type=int, default=256, help="output tokens (default 256)")
    lat.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1)")
    lat.add_argument("--iterations", type=int, default=5, help="measured iterations; the median counts")
    lat.add_argument("--warmup", type=int, default=1, help="warm-up iterations (default 1)")
    lat.add_argument(
        "--no-hf-compile",
        action="store_true",
        help="transformers peer eager with a dynamic cache instead of static cache + compile",
    )
    serve = _serve_module()
    if serve is not None:
        s = sub.add_parser("serve", help="load generator against an OpenAI-compatible server")
        serve.add_arguments(s)
    sim = sub.add_parser("simulate", help="the scheduler over a throughput workload, timed by a cost model")
    _PARSERS["simulate"] = sim
    simulate_cli.add_arguments(sim, _POLICIES, DEFAULT_NUM_REQUESTS, THROUGHPUT_MAX_BATCH)
    pr = sub.add_parser("presets", help="list model presets, or materialise one")
    pr.add_argument("--make", default=None, metavar="NAME", help="materialise preset NAME and print its path")
    pr.add_argument(
        "--device", default=None, help="where the random weights are drawn (default: cuda if present)"
    )
    pr.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    pr.add_argument("--preset-cache", default=None, metavar="DIR")


def main(args: argparse.Namespace) -> int:
    cmd = args.bench_command
    if cmd == "serve":
        serve = _serve_module()
        if serve is None:
            print("kiln bench serve: its dependencies are not installed", file=sys.stderr)
            return 2
        return int(serve.main(args) or 0)
    if cmd == "presets":
        return _presets(args)
    if cmd == "simulate":
        return simulate_cli.main(args)
    return _run(args)


def _presets(args: argparse.Namespace) -> int:
    from kiln.bench.checkpoint import num_parameters
    from kiln.bench.presets import PRESETS, materialize_preset

    if args.make:
        print(materialize_preset(args.make, args.preset_cache, device=args.device, dtype=args.dtype))
        return 0
    for name in sorted(PRESETS):
        p = PRESETS[name]
        print(f"preset:{name:<16} {num_parameters(p.config) / 1e9:8.3f} B parameters  ({p.source})")
    return 0


def _plugin_overrides(specs: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for spec in specs:
        kind, sep, name = spec.partition("=")
        if not sep or not kind or not name:
            raise ValueError(f"--plugin takes KIND=NAME (e.g. linear=skinny_linear), got {spec!r}")
        pairs.append((kind, name))
    return tuple(pairs)


def _check_run_flags(args: argparse.Namespace) -> None:
    """The flags the engine would reject only once it starts (inside the run, as a traceback and a
    partial report), checked before the model is read or a preset drawn."""
    from kiln.config import KvCacheConfig
    from kiln.plugins import PluginSet
    from kiln.sampling_params import SamplingParams

    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-num-tokens", args.max_num_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    try:
        KvCacheConfig(free_gpu_memory_fraction=args.kv_fraction)
    except ValueError:
        raise ValueError(f"--kv-fraction must be in (0, 1], got {args.kv_fraction}") from None
    PluginSet("reference", dict(_plugin_overrides(args.plugin)))  # names the valid kinds and plugins
    if args.bench_command == "throughput":
        SamplingParams(temperature=args.temperature, ignore_eos=True)


def _run(args: argparse.Namespace) -> int:
    import torch

    from kiln.bench.kiln_backend import EngineSettings
    from kiln.bench.report import append_results, failed_backends, render_table, write_json
    from kiln.bench.setup import prepare_model
    from kiln.engine.token_budget import default_max_num_tokens
    from kiln.executor.host_profile import ENV as HOST_PROFILE_ENV

    _check_run_flags(args)
    if args.host_profile:  # read where the engine loop starts, in the worker process too
        os.environ[HOST_PROFILE_ENV] = os.path.abspath(args.host_profile)
    model = prepare_model(
        args.model,
        args.dtype,
        args.device,
        args.preset_cache,
        args.roofline,
        args.hbm_bandwidth,
        args.peak_flops,
    )
    # Throughput: 512 sequences per step. On an 8B model at batch 512 the decode GEMMs are
    # compute-bound (256 sits at the ridge), so weights are read half as often per token.
    max_batch = args.max_batch_size
    if max_batch is None:
        max_batch = THROUGHPUT_MAX_BATCH if args.bench_command == "throughput" else 1
    max_tokens = args.max_num_tokens
    if max_tokens is None:  # the engine's own default, asked here for the roofline (the GPU is open already)
        max_tokens = default_max_num_tokens(torch.device(model.device), max_batch)
    engine = EngineSettings(
        dtype=model.dtype,
        device=model.device,
        max_batch_size=max_batch,
        max_num_tokens=max_tokens,
        max_seq_len=args.max_seq_len,
        kv_fraction=args.kv_fraction,
        scheduler_policy=args.scheduler_policy,
        executor=args.executor,
        seed=args.seed,
        plugins=_plugin_overrides(args.plugin),
        piecewise_graphs=not args.no_piecewise_graphs,
        compile=False if args.no_compile else None,
    )
    if engine.max_num_tokens < engine.max_batch_size:
        raise ValueError(
            f"--max-num-tokens ({engine.max_num_tokens}) must be >= "
            f"--max-batch-size ({engine.max_batch_size})"
        )
    # the JSON is rewritten after each backend, so a peer that runs out of time loses no kiln figure
    checkpoint = (lambda r: write_json(r, args.json)) if args.json else None
    if args.bench_command == "throughput":
        from kiln.bench.throughput import ThroughputOptions, run_throughput

        opts = ThroughputOptions(
            workload=args.workload,
            num_requests=args.num_requests,
            isl=args.isl,
            osl=args.osl,
            isl_stdev=args.isl_stdev,
            osl_stdev=args.osl_stdev,
            temperature=args.temperature,
            seed=args.seed,
            warmup_requests=args.warmup_requests,
            backend=args.backend,
            hf_num_requests=args.hf_num_requests,
            hf_batch_size=args.hf_batch_size,
        )
        report = run_throughput(model, opts, engine, command_line(args), checkpoint)
    else:
        from kiln.bench.latency import LatencyOptions, run_latency

        lopts = LatencyOptions(
            isl=args.isl,
            osl=args.osl,
            batch_size=args.batch_size,
            iterations=args.iterations,
            warmup=args.warmup,
            seed=args.seed,
            backend=args.backend,
            hf_compile=not args.no_hf_compile,
        )
        report = run_latency(model, lopts, engine, command_line(args), checkpoint)
    if args.json:
        write_json(report, args.json)
        print(f"kiln bench: wrote {args.json}", file=sys.stderr)
    if args.append_results:
        append_results(report, args.append_results)
        print(f"kiln bench: appended a row to {args.append_results}", file=sys.stderr)
    print(render_table(report), flush=True)  # the human-readable summary comes last
    failed = failed_backends(report)
    if failed:
        print(
            f"kiln bench: failed: {', '.join(failed)} (see the error above and in the report)",
            file=sys.stderr,
        )
        return 1
    return 0
