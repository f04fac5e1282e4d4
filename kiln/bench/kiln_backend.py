"""Running a workload through kiln's ``LLM``: engine set-up, all requests at once, engine-stat sampling."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.bench.workloads import Workload, synthetic
from kiln.config import SchedulerPolicy

if TYPE_CHECKING:
    from kiln.llm import LLM
    from kiln.outputs import RequestOutput


@dataclass(frozen=True)
class EngineSettings:
    dtype: str = "auto"
    device: str | None = None
    max_batch_size: int = 256
    max_num_tokens: int = 8192
    max_seq_len: int | None = None
    kv_fraction: float = 0.9
    scheduler_policy: SchedulerPolicy = "guaranteed_no_evict"
    executor: str = "auto"
    seed: int = 0
    plugins: tuple[tuple[str, str], ...] = ()  # (kind, plugin name) overrides
    piecewise_graphs: bool = True
    compile: bool | None = None  # None: the engine's default (torch.compile on a GPU)


def open_llm(model_dir: str, s: EngineSettings) -> LLM:
    from kiln.config import KvCacheConfig, SchedulerConfig
    from kiln.executor.gc_policy import freeze_startup_objects
    from kiln.llm import LLM

    llm = LLM(
        model=model_dir,
        dtype=s.dtype,
        device=s.device,
        max_batch_size=s.max_batch_size,
        max_num_tokens=s.max_num_tokens,
        max_seq_len=s.max_seq_len,
        kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=s.kv_fraction),
        scheduler_config=SchedulerConfig(policy=s.scheduler_policy),
        plugins=dict(s.plugins) or None,
        seed=s.seed,
        executor=s.executor,
        piecewise_graphs=s.piecewise_graphs,
        compile=s.compile,
    )
    freeze_startup_objects()  # the front end's full collections then scan only the requests' objects
    return llm


@dataclass
class KilnRun:
    outputs: list[RequestOutput]
    wall_s: float
    peak_running: int = 0
    peak_step_batch: int = 0
    peak_kv_usage: float = 0.0
    steps: int = 0
    num_preemptions: int = 0
    mean_step_ms: float = 0.0  # engine step period (with overlap: one pipeline stage)
    mean_host_ms: float = 0.0  # of which host work (scheduling, updating) per step
    # decode-only (graph) steps against mixed / prefill steps: [count, mean ms] each
    step_kinds: list[list[float]] = field(default_factory=list)
    # a mixed / prefill step from its scheduling to its results applied (ms, mean): with overlap its
    # launch and its results fall in two engine steps
    mixed_span_ms: float = 0.0
    # per step: host work, waiting on the device, engine-loop I/O, garbage collection (ms); a wait
    # near 0 means host-bound
    step_split_ms: list[float] = field(default_factory=list)
    late_kernel_compiles: int = 0  # Triton kernels compiled during the run (each stalls a step)
    samples: int = 0  # how many times the engine stats were read while the run went on
    extra: dict[str, Any] = field(default_factory=dict)


class _StatsSampler:
    """Reads ``llm.stats()`` every few milliseconds in a thread and keeps the peaks."""

    def __init__(self, llm: LLM, period_s: float = 0.002) -> None:
        self.llm, self.period = llm, period_s
        self.peak_running = self.peak_batch = self.samples = 0
        self.peak_kv = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kiln-bench-stats", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def sample(self) -> None:
        s = self.llm.stats()
        self.samples += 1
        self.peak_running = max(self.peak_running, s.num_running)
        self.peak_batch = max(self.peak_batch, s.last_batch_size)
        self.peak_kv = max(self.peak_kv, s.kv_usage)

    def __enter__(self) -> _StatsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def run_workload(llm: LLM, workload: Workload) -> KilnRun:
    """Queue every request at once (EOS ignored) and wait for all of them."""
    from kiln.sampling_params import SamplingParams

    prompts: list[Any] = [{"prompt_token_ids": p} for p in workload.prompts]
    params = [
        SamplingParams(max_tokens=n, ignore_eos=True, temperature=workload.temperature, top_k=-1, top_p=1.0)
        for n in workload.output_lens
    ]
    before = llm.stats()
    with _StatsSampler(llm) as sampler:
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    after = llm.stats()
    steps = after.steps - before.steps
    dec = after.decode_steps - before.decode_steps
    dec_s = after.decode_step_time_total - before.decode_step_time_total
    mixed_s = after.step_time_total - before.step_time_total - dec_s
    return KilnRun(
        step_kinds=[[dec, _per_step_ms(dec_s, dec)], [steps - dec, _per_step_ms(mixed_s, steps - dec)]],
        mixed_span_ms=_per_step_ms(after.mixed_step_span_total - before.mixed_step_span_total, steps - dec),
        step_split_ms=[
            _per_step_ms(after.host_time_total - before.host_time_total, steps),
            _per_step_ms(after.device_wait_total - before.device_wait_total, steps),
            _per_step_ms(after.loop_io_time_total - before.loop_io_time_total, steps),
            _per_step_ms(after.gc_time_total - before.gc_time_total, steps),
        ],
        outputs=outputs,
        wall_s=wall,
        peak_running=sampler.peak_running,
        peak_step_batch=sampler.peak_batch,
        peak_kv_usage=sampler.peak_kv,
        steps=after.steps - before.steps,
        mean_step_ms=_per_step_ms(after.step_time_total - before.step_time_total, after.steps - before.steps),
        mean_host_ms=_per_step_ms(after.host_time_total - before.host_time_total, after.steps - before.steps),
        num_preemptions=after.num_preemptions - before.num_preemptions,
        late_kernel_compiles=after.late_kernel_compiles - before.late_kernel_compiles,
        samples=sampler.samples,
    )


def _per_step_ms(seconds: float, steps: int) -> float:
    return 1e3 * seconds / steps if steps > 0 else 0.0


def warm_up(llm: LLM, num_requests: int, isl: int, osl: int, seed: int) -> float:
    """A short run of fresh random prompts (no prefix-cache hits later) so first-use work —
    kernel compilation, allocator growth — stays out of the measurement. Returns its seconds."""
    if num_requests <= 0:
        return 0.0
    wl = synthetic(num_requests, max(1, isl), max(1, osl), llm.vocab_size, seed=seed + 1_000_003)
    t0 = time.perf_counter()
    run_workload(llm, wl)
    return time.perf_counter() - t0


def request_times(out: RequestOutput) -> tuple[float | None, float | None, float | None]:
    """(TTFT, end-to-end latency, mean time per output token after the first) in seconds."""
    m = out.metrics
    if m is None or m.first_token_time is None or m.finished_time is None:
        return None, None, None
    n = len(out.outputs[0].token_ids) if out.outputs else 0
    tpot = (m.finished_time - m.first_token_time) / (n - 1) if n > 1 else None
    return m.first_token_time - m.arrival_time, m.finished_time - m.arrival_time, tpot


def kv_capacity_tokens(llm: LLM) -> int | None:
    blocks = llm.engine_info.get("num_blocks")
    if blocks is None:
        return None
    from kiln.config import KvCacheConfig

    return int(blocks) * KvCacheConfig().tokens_per_block
