"""``kiln bench throughput``: offline throughput of a whole workload queued at once.

Every request ignores EOS and makes exactly its output length. Figures: output and total tokens
per second over the wall time of the run, requests per second, TTFT / time-per-output-token /
request latency percentiles from each request's arrival, first-token and finish times, the peak
batch and KV usage seen in the engine stats, and the share of the serial roofline bound.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from kiln.bench.kiln_backend import (
    EngineSettings,
    KilnRun,
    kv_capacity_tokens,
    open_llm,
    request_times,
    run_workload,
    warm_up,
)
from kiln.bench.report import guarded, new_report, percentiles
from kiln.bench.roofline import BoundResult, serial_bound
from kiln.bench.setup import BenchModel, roofline_summary
from kiln.bench.workloads import Workload, nano_vllm, synthetic

DEFAULT_NUM_REQUESTS = 512
DEFAULT_HF_NUM_REQUESTS = 256
DEFAULT_HF_BATCH_SIZE = 64


@dataclass
class ThroughputOptions:
    workload: str = "synthetic"
    num_requests: int = DEFAULT_NUM_REQUESTS
    isl: int = 128
    osl: int = 128
    isl_stdev: float = 0.0
    osl_stdev: float = 0.0
    temperature: float = 0.0
    seed: int = 0
    warmup_requests: int = 4
    backend: str = "kiln"  # kiln | hf | both
    hf_num_requests: int = DEFAULT_HF_NUM_REQUESTS
    hf_batch_size: int = DEFAULT_HF_BATCH_SIZE


def make_workload(opts: ThroughputOptions, vocab_size: int) -> Workload:
    if opts.workload == "nano-vllm":
        return nano_vllm()
    if opts.workload != "synthetic":
        raise ValueError(f"--workload must be 'synthetic' or 'nano-vllm', got {opts.workload!r}")
    return synthetic(
        opts.num_requests,
        opts.isl,
        opts.osl,
        vocab_size,
        opts.isl_stdev,
        opts.osl_stdev,
        opts.seed,
        opts.temperature,
    )


def kiln_figures(run: KilnRun, workload: Workload) -> dict[str, Any]:
    """Figures of one kiln run; ``wrong_lengths`` counts requests whose output length differs from
    the one asked for (which would make the figures meaningless)."""
    ttft: list[float] = []
    e2e: list[float] = []
    tpot: list[float] = []
    out_tokens = wrong = 0
    for out, want in zip(run.outputs, workload.output_lens, strict=True):
        n = len(out.outputs[0].token_ids)
        out_tokens += n
        wrong += n != want
        a, b, c = request_times(out)
        if a is not None and b is not None:
            ttft.append(a)
            e2e.append(b)
        if c is not None:
            tpot.append(c)
    wall = run.wall_s
    notes = []
    if wrong:
        notes.append(
            f"{wrong} request(s) did not produce their requested output length: figures are not valid"
        )
    if run.num_preemptions:
        notes.append(f"{run.num_preemptions} preemption(s) during the run (KV cache too small for the batch)")
    return {
        "num_requests": workload.num_requests,
        "elapsed_s": wall,
        "input_tokens": workload.num_input_tokens,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + workload.num_input_tokens) / wall,
        "requests_per_s": workload.num_requests / wall,
        "ttft_ms": percentiles(ttft, 1e3),
        "tpot_ms": percentiles(tpot, 1e3),
        "e2e_s": percentiles(e2e),
        "peak_batch": run.peak_running,
        "peak_step_batch": run.peak_step_batch,
        "peak_kv_usage": run.peak_kv_usage,
        "steps": run.steps,
        "step_host_ms": [run.mean_step_ms, run.mean_host_ms],
        "step_kinds": run.step_kinds,
        "mixed_span_ms": run.mixed_span_ms,
        "step_split_ms": run.step_split_ms,
        "preemptions": run.num_preemptions,
        "late_kernel_compiles": run.late_kernel_compiles,
        "wrong_lengths": wrong,
        "notes": notes,
    }


def run_throughput(
    model: BenchModel,
    opts: ThroughputOptions,
    engine: EngineSettings,
    command: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the workload on the chosen backend(s) and return the report (see ``kiln.bench.report``);
    ``on_result`` gets the report after each backend (so a later one timing out loses nothing)."""
    if opts.backend not in ("kiln", "hf", "both"):
        raise ValueError(f"--backend must be 'kiln', 'hf' or 'both', got {opts.backend!r}")
    wl = make_workload(opts, model.vocab_size)
    engine = replace(engine, max_seq_len=engine_max_seq_len(model, wl, engine), dtype=model.dtype)
    report = new_report("throughput", command, model.device)
    report["model"] = model.summary()
    report["workload"] = wl.summary()
    report["settings"] = {**asdict(engine), "backend": opts.backend, "warmup_requests": opts.warmup_requests}
    bound = serial_bound(
        model.cost, wl.input_lens, wl.output_lens, model.peaks, engine.max_batch_size, engine.max_num_tokens
    )
    report["roofline"] = roofline_summary(model, bound.output_tok_s, "output tok/s", bound.as_dict())
    _say(
        f"throughput: {wl.num_requests} requests ({wl.name}), {wl.num_input_tokens:,} prompt + "
        f"{wl.num_output_tokens:,} output tokens, max batch {engine.max_batch_size}, "
        f"max tokens/step {engine.max_num_tokens}; roofline bound {bound.output_tok_s:,.0f} output tok/s"
    )
    backends = ["kiln", "hf"] if opts.backend == "both" else [opts.backend]
    for name in backends:
        run = _kiln_throughput if name == "kiln" else _hf_throughput
        report["results"][name] = guarded(name, partial(run, model, wl, opts, engine, bound))
        if on_result is not None:
            on_result(report)
    return report


def _kiln_throughput(
    model: BenchModel, wl: Workload, opts: ThroughputOptions, engine: EngineSettings, bound: BoundResult
) -> dict[str, Any]:
    with open_llm(model.path, engine) as llm:
        warm = warm_up(
            llm,
            min(opts.warmup_requests, engine.max_batch_size),
            min(max(wl.input_lens), 256),
            8,
            opts.seed,
        )
        _say(f"kiln: engine ready ({llm.engine_info}); warm-up {warm:.1f} s; running ...")
        run = run_workload(llm, wl)
        res = kiln_figures(run, wl)
        res["kv_capacity_tokens"] = kv_capacity_tokens(llm)
        res["engine_info"] = dict(llm.engine_info)
        res["roofline_share"] = res["output_tok_s"] / bound.output_tok_s
    return res


def _hf_throughput(
    model: BenchModel, wl: Workload, opts: ThroughputOptions, engine: EngineSettings, bound: BoundResult
) -> dict[str, Any]:
    from kiln.bench.hf_backend import hf_throughput, load_model

    sub = wl.subsample(opts.hf_num_requests)
    _say(f"transformers: {sub.num_requests} of {wl.num_requests} requests, batches of {opts.hf_batch_size}")
    try:
        hf_model = load_model(model.path, model.dtype, model.device)
        res = hf_throughput(hf_model, sub, opts.hf_batch_size, model.device)
    finally:
        hf_model = None
        _free_cuda(model.device)
    # The peer runs static batches of a subsample: its bound is that subsample's at its batch size.
    sub_bound = serial_bound(
        model.cost,
        sub.input_lens,
        sub.output_lens,
        model.peaks,
        opts.hf_batch_size,
        max(opts.hf_batch_size, engine.max_num_tokens),
    )
    res["roofline_share"] = res["output_tok_s"] / sub_bound.output_tok_s
    res["roofline_bound_output_tok_s"] = sub_bound.output_tok_s
    if sub.num_requests < wl.num_requests:
        res["notes"].append(
            f"ran on a subsample: the first {sub.num_requests} of {wl.num_requests} requests "
            "(the full run would take too long); its share is of the subsample's own bound"
        )
    return res


def engine_max_seq_len(model: BenchModel, wl: Workload, engine: EngineSettings) -> int:
    """The engine's context limit: as asked, else the workload's longest request (or its own
    max_model_len) rounded up to 256 and capped by the model's."""
    if wl.max_seq_len > model.max_position_embeddings:
        raise ValueError(
            f"the workload needs {wl.max_seq_len} tokens of context but the model allows "
            f"{model.max_position_embeddings}; lower --isl/--osl"
        )
    if engine.max_seq_len is not None:
        if engine.max_seq_len < wl.max_seq_len:
            raise ValueError(f"--max-seq-len {engine.max_seq_len} is below the workload's {wl.max_seq_len}")
        return engine.max_seq_len
    want = max(wl.max_seq_len, wl.max_model_len or 0)
    return min(-(-want // 256) * 256, model.max_position_embeddings)


def _free_cuda(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _say(msg: str) -> None:
    print(f"kiln bench {msg}", file=sys.stderr, flush=True)
