"""The transformers peer: the same workload through ``generate`` on the same device, for comparison.

Latency uses a static KV cache, which makes ``generate`` compile the decode step with torch.compile
(its documented automatic path); throughput uses batched ``generate`` with left padding (eager,
dynamic cache) on a subsample of the requests, since a full large run would not fit a benchmark's
time. EOS is ignored the same way kiln ignores it: ``min_new_tokens == max_new_tokens``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from kiln.bench.report import percentiles
from kiln.bench.workloads import Workload


def torch_dtype(dtype: str, config_dtype: str | None, device: str) -> Any:
    import torch

    if dtype == "auto":
        dtype = (config_dtype or "float32") if device.startswith("cuda") else "float32"
    return getattr(torch, dtype)


def load_model(model_dir: str, dtype: str, device: str) -> Any:
    """``AutoModelForCausalLM`` in eval mode on ``device``."""
    import json
    import os

    from transformers import AutoModelForCausalLM

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg_dtype = json.load(f).get("torch_dtype")
    td = torch_dtype(dtype, cfg_dtype, device)
    try:  # straight onto the device where this transformers can
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=td, device_map=device)
    except (ImportError, ValueError):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=td)
        model = model.to(device)
    model.eval()
    return model


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _gen_kwargs(n_new: int, temperature: float) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": n_new, "min_new_tokens": n_new, "pad_token_id": 0}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    return kw


def _left_padded(prompts: list[list[int]], device: str) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def hf_throughput(model: Any, workload: Workload, batch_size: int, device: str) -> dict[str, Any]:
    """Batches of ``batch_size`` requests in workload order, each run to its longest output.

    Figures count only the tokens each request asked for; padding rows' extra tokens are reported
    apart (``generated_tokens``).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"the transformers batch size must be >= 1, got {batch_size}")
    warm_ids, warm_mask = _left_padded([[1, 2, 3, 4]] * 2, device)
    with torch.inference_mode():
        model.generate(warm_ids, attention_mask=warm_mask, **_gen_kwargs(4, workload.temperature))
    elapsed = 0.0
    generated = 0
    batch_times: list[float] = []
    for start in range(0, workload.num_requests, batch_size):
        prompts = workload.prompts[start : start + batch_size]
        n_new = max(workload.output_lens[start : start + batch_size])
        ids, mask = _left_padded(prompts, device)
        with torch.inference_mode():
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, **_gen_kwargs(n_new, workload.temperature))
            _sync(device)
        dt = time.perf_counter() - t0
        if out.shape[1] - ids.shape[1] != n_new:
            raise RuntimeError(
                f"transformers generated {out.shape[1] - ids.shape[1]} tokens, asked for {n_new}"
            )
        elapsed += dt
        batch_times.append(dt)
        generated += n_new * len(prompts)
    out_tok, in_tok = workload.num_output_tokens, workload.num_input_tokens
    return {
        "num_requests": workload.num_requests,
        "elapsed_s": elapsed,
        "output_tok_s": out_tok / elapsed,
        "total_tok_s": (out_tok + in_tok) / elapsed,
        "requests_per_s": workload.num_requests / elapsed,
        "ttft_ms": None,
        "tpot_ms": None,
        "e2e_s": percentiles(batch_times),
        "peak_batch": min(batch_size, workload.num_requests),
        "generated_tokens": generated,
        "scope": f"{workload.num_requests} requests, batch {batch_size}",
        "notes": [
            "transformers generate, eager, dynamic cache, left padding; each batch runs to its longest "
            "output and only requested tokens are counted; request latency = batch time"
        ],
    }


class _FirstTokenClock:
    """A ``generate`` streamer that notes when the first new token exists on the device.

    ``put`` is called with the prompt first, then once per step with the new tokens.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            _sync(self.device)
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def hf_latency(
    model: Any,
    prompt_sets: list[list[list[int]]],
    osl: int,
    device: str,
    compile: bool = True,
    warmup: int = 1,
) -> dict[str, Any]:
    """Decode speed excluding prefill: per iteration, one ``generate`` of ``osl`` tokens; a streamer
    marks when the first token is ready, and (end - first token) / (osl - 1) is the time per token.

    ``prompt_sets`` holds one batch of prompts per iteration (warm-ups first), all of one length.
    """
    import torch

    if osl < 2:
        raise ValueError(f"latency needs osl >= 2 to time decoding, got {osl}")
    extra: dict[str, Any] = {"cache_implementation": "static"} if compile else {}
    ttfts: list[float] = []
    tpots: list[float] = []
    warm_s = 0.0
    for it, prompts in enumerate(prompt_sets):
        ids, mask = _left_padded(prompts, device)
        clock = _FirstTokenClock(device)
        with torch.inference_mode():
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, streamer=clock, **_gen_kwargs(osl, 0.0), **extra)
            _sync(device)
            t1 = time.perf_counter()
        if it < warmup:
            warm_s += t1 - t0
            continue
        assert clock.first_token_time is not None, "generate made no token"
        ttfts.append(clock.first_token_time - t0)
        tpots.append((t1 - clock.first_token_time) / (osl - 1))
    if not tpots:
        raise ValueError(f"no measured iterations: {len(prompt_sets)} prompt sets for {warmup} warm-up(s)")
    tpot = statistics.median(tpots)
    batch = len(prompt_sets[-1])
    if not compile:
        mode = "eager, dynamic cache"
    elif device.startswith("cuda"):
        mode = "static cache + torch.compile"
    else:  # generate compiles automatically only on accelerators
        mode = "static cache, not compiled on the CPU"
    return {
        "batch_size": batch,
        "iterations": len(tpots),
        "decode_tok_s": 1.0 / tpot,
        "batch_decode_tok_s": batch / tpot,
        "tpot_ms": tpot * 1e3,
        "ttft_ms": statistics.median(ttfts) * 1e3,
        "per_iteration_decode_tok_s": [1.0 / t for t in tpots],
        "warmup_s": warm_s,
        "scope": mode,
        "notes": [f"transformers generate, {mode}; warm-up (incl. compilation) took {warm_s:.1f} s"],
    }
