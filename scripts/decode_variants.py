"""Decode-step time under several launch settings, in one engine on one machine, taken in turns.

    python3 scripts/decode_variants.py --model preset:llama-3.1-8b --batch-size 1 \
        --variant base= --variant pre4096=KILN_GEMV_PREFETCH_K=4096 --variant nopdl=KILN_PDL=0

A variant is NAME=ENV=VALUE[,ENV=VALUE...] (NAME= alone: the environment as it is). The settings read at
each kernel launch (``KILN_PDL``, ``KILN_GEMV_PREFETCH_K``) reach a decode step through its CUDA graph,
so each variant sets its variables and captures the decode graphs again; the engine, its weights and the
running requests stay. Rounds take the variants in turn (A B C, A B C, ...), so a drift of the machine or
of the context length falls on all of them alike. A start-up per setting (``kiln bench latency``) costs
about a minute on an 8B model; a variant here costs the capture and the timed steps, a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np
import torch
from profile_step import drain, start_decoding, timed_steps  # scripts/, beside this one

from kiln.executor.engine_core import EngineCore, EngineCoreConfig


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'NAME=ENV=VALUE,ENV=VALUE' -> (NAME, {ENV: VALUE}); 'NAME=' -> (NAME, {})."""
    name, sep, rest = spec.partition("=")
    if not name or not sep:
        raise ValueError(f"a variant is NAME=ENV=VALUE[,ENV=VALUE...] or NAME=, got {spec!r}")
    env: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise ValueError(f"variant {name!r}: each setting is ENV=VALUE, got {item!r}")
        env[key] = value
    return name, env


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory or preset:NAME")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=ENV=VALUE,...")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per variant and round")
    ap.add_argument("--warmup-steps", type=int, default=8)
    ap.add_argument("--preset-cache", default=None, metavar="DIR")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    ap.add_argument("--json", default=None, help="write every timing to this file")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    if len({name for name, _ in variants}) != len(variants):
        raise SystemExit("variant names must differ")

    from kiln.bench.presets import resolve_model
    from kiln.config import EngineLimits, KvCacheConfig, SchedulerConfig

    path, _ = resolve_model(args.model, args.preset_cache)
    on_gpu = args.device.startswith("cuda")
    steps_per_seq = args.rounds * len(variants) * (args.steps + args.warmup_steps) + 8
    cfg = EngineCoreConfig(
        model=path,
        dtype="auto",
        device=args.device,
        limits=EngineLimits(
            max_batch_size=max(8, args.batch_size),
            max_num_tokens=8192,
            max_seq_len=args.isl + steps_per_seq + 16,
        ),
        kv_config=KvCacheConfig(),
        scheduler_config=SchedulerConfig(),
        plugin_backend="forward" if on_gpu else "reference",
        overlap_scheduling=on_gpu,
    )
    core = EngineCore(cfg)
    card = torch.cuda.get_device_name() if on_gpu else "cpu"
    start_decoding(core, args.batch_size, args.isl, steps_per_seq, np.random.default_rng(0))

    base_env = {k: os.environ.get(k) for _, env in variants for k in env}
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(args.rounds):
        # every step is one token longer than the last, so a variant late in a round sees longer
        # contexts (which matters at long ones): odd rounds run the variants in reverse
        for name, env in variants if r % 2 == 0 else variants[::-1]:
            drain(core)  # no launched work spans a re-capture
            for key, value in base_env.items():  # each variant from the environment the script started in
                _set_env(key, value)
            for key, value in env.items():
                _set_env(key, value)
            if core.engine.graphs is not None:
                core.engine.graphs.capture()  # the settings take effect where the kernels are launched
            timed_steps(core, args.warmup_steps)
            times[name].append(statistics.median(timed_steps(core, args.steps)))
            print(f"  round {r + 1} {name:<16} {1e3 * times[name][-1]:8.3f} ms a step", flush=True)
    drain(core)
    core.close()

    rounds = f"median of {args.rounds} rounds"
    print(f"\n== decode step, batch {args.batch_size}, context {args.isl}+, {card}; {rounds}")
    base_ms = 1e3 * statistics.median(times[variants[0][0]])
    for name, env in variants:
        ms = 1e3 * statistics.median(times[name])
        spec = ",".join(f"{k}={v}" for k, v in env.items()) or "(environment as is)"
        rate = args.batch_size / ms * 1e3
        print(
            f"  {name:<16} {ms:8.3f} ms  {rate:9,.1f} tok/s  {base_ms / ms:6.3f}x vs {variants[0][0]}  {spec}"
        )
    if args.json:
        report = dict(model=args.model, card=card, torch=torch.__version__, batch_size=args.batch_size,
                      isl=args.isl, steps=args.steps, variants=dict(variants), step_s=times)  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


if __name__ == "__main__":
    main()
