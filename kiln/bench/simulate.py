"""``kiln bench simulate``: the engine's scheduler over a throughput workload, timed by a cost model.

The scheduler is the engine's own (``kiln.executor.scheduler``), driven as ``EngineCore`` drives it:
two steps in flight with overlap scheduling (one with ``overlap=False``), prefix caching on, each
step's sampled tokens fed back. Only the model is replaced: a step costs

    max(base_s, tokens x token_s) + KV read by its decode rows / kv_bandwidth
        + the chunks' causal attention FLOPs / attention_flops

On the H100 runs of Llama-3.1-8B it made the very steps the engine made (2048/2048 under both
policies, preemptions included, 2048/128, 128/128, 128/2048), and the defaults, fitted to the 2048/2048
runs, put the step time within 1% (2048/2048, 2048/128) to 8% (128/2048) of theirs
(benchmarks/NOTES.md). It ranks policies, limits and request counts on a CPU in seconds; a GPU run of
the same workload checks what it predicts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from kiln.bench.workloads import Workload
from kiln.config import EngineLimits, SchedulerConfig, SchedulerPolicy
from kiln.executor.messages import Request, ScheduledBatch, StepOutput
from kiln.executor.scheduler import Scheduler
from kiln.sampling_params import SamplingParams


@dataclass(frozen=True)
class StepCostModel:
    """Seconds per step from its shape. Defaults: Llama-3.1-8B, BF16, one H100 80GB HBM3 (fitted)."""

    base_s: float = 4.08e-3  # a step's floor: weights, launch, sampler
    token_s: float = 22.2e-6  # per token the step computes: GEMMs, norms, activations
    kv_bandwidth: float = 2.50e12  # bytes/s of KV read by decode rows (carries every per-row cost)
    kv_bytes_per_token: int = 131_072  # 2 x layers x kv heads x head dim x 2 bytes
    attention_flops: float = 300e12  # FLOP/s of the chunks' causal attention
    layers: int = 32
    attention_width: int = 4096  # query heads x head dim

    def seconds(self, batch: ScheduledBatch) -> float:
        new = batch.num_new_tokens.astype(np.int64)
        done = batch.num_computed.astype(np.int64)
        decode = np.arange(batch.num_seqs) < batch.num_decode
        kv_read = float((done + new)[decode].sum()) * self.kv_bytes_per_token
        # each new token of a chunk attends to the chunk's prefix and to the chunk's tokens up to itself
        pairs = float((new * done + new * (new + 1) // 2)[~decode].sum())
        gemms = max(self.base_s, float(new.sum()) * self.token_s)  # memory-bound below ~200 rows
        attention = 4 * self.layers * self.attention_width * pairs / self.attention_flops
        return gemms + kv_read / self.kv_bandwidth + attention


@dataclass
class SimulatedRun:
    policy: str
    steps: int
    decode_steps: int  # steps whose every row decodes
    mean_batch: float
    preemptions: int
    output_tokens: int
    seconds: float  # of modelled step time

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds


def simulate(
    workload: Workload,
    policy: SchedulerPolicy,
    limits: EngineLimits,
    kv_tokens: int,
    *,
    tokens_per_block: int = 32,
    overlap: bool = True,
    cost: StepCostModel | None = None,
) -> SimulatedRun:
    """Run ``workload`` (all requests queued at once, EOS ignored) through the scheduler with a KV pool
    of ``kv_tokens`` tokens."""
    cost = cost or StepCostModel()
    num_blocks = kv_tokens // tokens_per_block + 1  # block 0 is the null block
    sched = Scheduler(SchedulerConfig(policy), limits, num_blocks, tokens_per_block,
                      free_delay_steps=1 if overlap else 0)  # fmt: skip
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
    depth = 2 if overlap else 1  # steps in flight before the oldest is applied, as in EngineCore
    in_flight: deque[ScheduledBatch] = deque()
    run = SimulatedRun(policy, 0, 0, 0.0, 0, 0, 0.0)
    while sched.has_unfinished() or in_flight:
        batch = sched.schedule() if sched.has_unfinished() else None
        if batch is not None:
            run.seconds += cost.seconds(batch)
            run.steps += 1
            run.decode_steps += batch.num_decode == batch.num_seqs
            run.mean_batch += batch.num_seqs
            in_flight.append(batch)
            if len(in_flight) < depth:
                continue
        if not in_flight:
            raise RuntimeError(
                f"{policy}: no step can run with {sched.num_unfinished_requests()} requests unfinished "
                f"(a KV pool of {kv_tokens} tokens is too small for one of them)"
            )
        done = in_flight.popleft()
        rows = done.num_samples
        out = StepOutput(done.step_id, done.sample_seq_ids.copy(), np.ones(rows, np.int32),
                         np.zeros(rows, np.float32))  # fmt: skip
        run.output_tokens += sum(len(u.new_token_ids) for u in sched.update(done, out))
    run.mean_batch /= max(run.steps, 1)
    run.preemptions = sched.stats().num_preemptions
    return run
