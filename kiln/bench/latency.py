"""``kiln bench latency``: decode speed of a small batch, prefill excluded.

Each iteration runs ``batch_size`` fresh random prompts (never a prefix-cache hit) of ``isl`` tokens
to exactly ``osl`` new tokens. Per request, time per output token = (finish - first token) /
(osl - 1); decode tok/s is its inverse, per sequence. Warm-up iterations run first; the figures
are medians over the measured iterations. Effective bandwidth = the bytes a decode step must move
(weights + KV read + KV written, at the run's mean context) / the measured time per step.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from kiln.bench.kiln_backend import EngineSettings, KilnRun, open_llm, request_times, run_workload
from kiln.bench.report import guarded, new_report
from kiln.bench.roofline import serial_bound
from kiln.bench.setup import BenchModel, roofline_summary
from kiln.bench.workloads import synthetic


@dataclass
class LatencyOptions:
    isl: int = 128
    osl: int = 256
    batch_size: int = 1
    iterations: int = 5
    warmup: int = 1
    seed: int = 0
    backend: str = "kiln"  # kiln | hf | both
    hf_compile: bool = True


def _prompt_sets(model: BenchModel, opts: LatencyOptions) -> list[list[list[int]]]:
    """One batch of prompts per iteration, warm-ups first; a new seed each so nothing is cached."""
    return [
        synthetic(opts.batch_size, opts.isl, opts.osl, model.vocab_size, seed=opts.seed + 7919 * i).prompts
        for i in range(opts.warmup + opts.iterations)
    ]


def _ttft_split(ttft_s: float, queued_s: float, run: KilnRun) -> list[float]:
    """TTFT in ms as (queued: arrival to admission, i.e. the pipe to the engine and its loop's wake-up;
    the engine's prefill steps, the iteration's steps that are not decode-only, all of them before the
    first tokens here, each from its scheduling to its results applied (launch and device time: the
    device runs while the host launches); the rest: the results' way back to the caller)."""
    n_mixed = run.step_kinds[1][0]
    prefill_ms = n_mixed * run.mixed_span_ms
    queued_ms, total_ms = queued_s * 1e3, ttft_s * 1e3
    return [queued_ms, prefill_ms, total_ms - queued_ms - prefill_ms]


def _kiln_latency(model: BenchModel, opts: LatencyOptions, engine: EngineSettings) -> dict[str, Any]:
    from kiln.bench.workloads import Workload

    ttfts, tpots, step_ms, host_ms, splits, ttft_splits, queued_splits = [], [], [], [], [], [], []
    wrong = 0
    with open_llm(model.path, engine) as llm:
        _say(f"kiln: engine ready ({llm.engine_info})")
        for i, prompts in enumerate(_prompt_sets(model, opts)):
            run = run_workload(llm, Workload("latency", prompts, [opts.osl] * len(prompts)))
            if i < opts.warmup:
                continue
            it_ttft, it_tpot, it_queued, it_to_engine = [], [], [], []
            for out in run.outputs:
                wrong += len(out.outputs[0].token_ids) != opts.osl
                ttft, _, tpot = request_times(out)
                if ttft is not None and tpot is not None:
                    it_ttft.append(ttft)
                    it_tpot.append(tpot)
                    m = out.metrics
                    if m is not None and m.first_scheduled_time is not None:
                        it_queued.append(m.first_scheduled_time - m.arrival_time)
                        if m.queued_time is not None:
                            it_to_engine.append(m.queued_time - m.arrival_time)
            if it_tpot:
                ttfts.append(statistics.mean(it_ttft))
                tpots.append(statistics.mean(it_tpot))
                step_ms.append(run.mean_step_ms)
                host_ms.append(run.mean_host_ms)
                splits.append(run.step_split_ms)
                if it_queued and run.step_kinds:
                    ttft_splits.append(_ttft_split(statistics.mean(it_ttft), statistics.mean(it_queued), run))
                if it_to_engine and len(it_to_engine) == len(it_queued):
                    to_engine, queued = statistics.mean(it_to_engine), statistics.mean(it_queued)
                    queued_splits.append([to_engine * 1e3, (queued - to_engine) * 1e3])
        info = dict(llm.engine_info)
    if not tpots:
        raise RuntimeError("no iteration produced timings (request metrics are missing)")
    tpot = statistics.median(tpots)
    notes = []
    if wrong:
        notes.append(f"{wrong} request(s) did not produce {opts.osl} tokens: figures are not valid")
    return {
        "batch_size": opts.batch_size,
        "iterations": len(tpots),
        "decode_tok_s": 1.0 / tpot,
        "batch_decode_tok_s": opts.batch_size / tpot,
        "tpot_ms": tpot * 1e3,
        "step_host_ms": [statistics.median(step_ms), statistics.median(host_ms)],
        "step_split_ms": [statistics.median(col) for col in zip(*splits, strict=True)],
        "ttft_ms": statistics.median(ttfts) * 1e3,
        "ttft_split_ms": [statistics.median(col) for col in zip(*ttft_splits, strict=True)],
        # the queued part: the request's way to the engine (its process), then its wait there for a slot
        "queued_split_ms": [statistics.median(col) for col in zip(*queued_splits, strict=True)],
        "per_iteration_decode_tok_s": [1.0 / t for t in tpots],
        "wrong_lengths": wrong,
        "engine_info": info,
        "notes": notes,
    }


def _hf_latency(model: BenchModel, opts: LatencyOptions, engine: EngineSettings) -> dict[str, Any]:
    from kiln.bench.hf_backend import hf_latency, load_model

    _say(f"transformers: loading {model.path}")
    try:
        hf_model = load_model(model.path, model.dtype, model.device)
        return hf_latency(
            hf_model, _prompt_sets(model, opts), opts.osl, model.device, opts.hf_compile, opts.warmup
        )
    finally:
        hf_model = None


def run_latency(
    model: BenchModel,
    opts: LatencyOptions,
    engine: EngineSettings,
    command: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The report; ``on_result`` gets it after each backend (so a later one timing out loses nothing)."""
    if opts.backend not in ("kiln", "hf", "both"):
        raise ValueError(f"--backend must be 'kiln', 'hf' or 'both', got {opts.backend!r}")
    if opts.osl < 2:
        raise ValueError(f"--osl must be >= 2 to time decoding, got {opts.osl}")
    if opts.iterations < 1 or opts.warmup < 0 or opts.batch_size < 1:
        raise ValueError("--iterations and --batch-size must be >= 1 and --warmup >= 0")
    need = opts.isl + opts.osl
    if need > model.max_position_embeddings:
        raise ValueError(f"isl + osl = {need} exceeds the model's context ({model.max_position_embeddings})")
    engine = replace(
        engine,
        dtype=model.dtype,
        max_batch_size=max(engine.max_batch_size if engine.max_batch_size else 1, opts.batch_size),
        max_seq_len=engine.max_seq_len or min(-(-need // 256) * 256, model.max_position_embeddings),
    )
    report = new_report("latency", command, model.device)
    report["model"] = model.summary()
    report["workload"] = {
        "name": "latency",
        "num_requests": opts.batch_size,
        "input_len_min_mean_max": [opts.isl, opts.isl, opts.isl],
        "output_len_min_mean_max": [opts.osl, opts.osl, opts.osl],
        "isl": opts.isl,
        "osl": opts.osl,
        "batch_size": opts.batch_size,
        "seed": opts.seed,
    }
    report["settings"] = {**asdict(engine), **asdict(opts)}
    bound = serial_bound(
        model.cost,
        [opts.isl] * opts.batch_size,
        [opts.osl] * opts.batch_size,
        model.peaks,
        max(opts.batch_size, 1),
        max(engine.max_num_tokens, opts.batch_size),
    )
    step_bytes = bound.mean_decode_step_bytes
    bound_tok_s = bound.decode_steps / bound.decode_seconds  # per sequence
    report["roofline"] = roofline_summary(
        model, bound_tok_s, "decode tok/s per sequence", {"decode_step_bytes": step_bytes, **bound.as_dict()}
    )
    _say(
        f"latency: batch {opts.batch_size}, {opts.isl} prompt + {opts.osl} output tokens, "
        f"{opts.warmup} warm-up + {opts.iterations} iterations; decode step moves {step_bytes / 1e9:.2f} GB; "
        f"roofline bound {bound_tok_s:,.1f} tok/s per sequence"
    )
    for name in ["kiln", "hf"] if opts.backend == "both" else [opts.backend]:
        run = _kiln_latency if name == "kiln" else _hf_latency
        res = report["results"][name] = guarded(name, partial(run, model, opts, engine))
        if "error" not in res:
            res["effective_gb_s"] = step_bytes / (res["tpot_ms"] / 1e3) / 1e9
            res["roofline_share"] = res["decode_tok_s"] / bound_tok_s
        if on_result is not None:
            on_result(report)
    return report


def _say(msg: str) -> None:
    print(f"kiln bench {msg}", file=sys.stderr, flush=True)
