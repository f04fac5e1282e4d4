"""Where a decode step's time goes: host phases, GPU kernels, and the gap between them.

    python3 scripts/profile_step.py --model preset:llama-3.2-1b --batch-size 1 --isl 128 --steps 64
    python3 scripts/profile_step.py --model preset:llama-3.1-8b --prefill --batch-size 1 --isl 2048
    python3 scripts/profile_step.py --model preset:llama-3.1-8b --mixed 150:2048:4:2000

Drives the EngineCore by hand (no worker process) so every phase can be timed: first a plain
run (the real step time), then a run with a device sync after each phase (host time of each phase,
and the GPU time left to wait for), then torch.profiler over a few steps for the kernel table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from kiln.executor.engine_core import EngineCore, EngineCoreConfig
from kiln.executor.messages import Request
from kiln.sampling_params import SamplingParams


@torch.inference_mode()  # the engine's parts are driven directly here, in the mode EngineCore uses
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory or preset:NAME")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument(
        "--prefill", action="store_true", help="profile prefill steps (batch x isl new tokens, no decode)"
    )
    ap.add_argument(
        "--mixed",
        default=None,
        metavar="D:C:P:L",
        help="profile mixed steps: D sequences decoding at a context of ~C tokens, plus P fresh prompts of L "
        "tokens each step (as in a 2048/128 throughput run)",
    )
    ap.add_argument(
        "--sequence",
        default=None,
        metavar="START:COUNT",
        help="also list the profiled kernels START..START+COUNT-1 of the first profiled step in device "
        "order, each with the idle gap before it (e.g. one decoder layer: which kernels and hand-overs "
        "the gaps sit at)",
    )
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-piecewise-graphs", action="store_true", help="prefill and mixed steps eagerly")
    ap.add_argument("--no-overlap", action="store_true", help="one step at a time (GPU default: overlapped)")
    ap.add_argument("--preset-cache", default=None, metavar="DIR", help="where presets are materialised")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    args = ap.parse_args()
    if args.sequence:
        _parse_sequence(args.sequence)  # a bad spec fails before the engine is built

    from kiln.bench.presets import resolve_model
    from kiln.config import EngineLimits, KvCacheConfig, SchedulerConfig

    path, _ = resolve_model(args.model, args.preset_cache)
    on_gpu = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    max_seq = args.isl + 3 * args.steps + 16
    max_tokens = max(8192, args.batch_size * args.isl if args.prefill else 0)
    max_batch = max(8, args.batch_size)
    mixed = _parse_mixed(args.mixed) if args.mixed else None
    if mixed is not None:
        decode, context, prompts, length = mixed
        max_seq = max(context, length) + 3 * args.steps + 16
        max_tokens = max(8192, decode + prompts * length)
        max_batch = max(8, decode + prompts)
    cfg = EngineCoreConfig(
        model=path,
        dtype="auto",
        device=args.device,
        limits=EngineLimits(max_batch_size=max_batch, max_num_tokens=max_tokens, max_seq_len=max_seq),
        kv_config=KvCacheConfig(),
        scheduler_config=SchedulerConfig(),
        plugin_backend="forward" if args.device.startswith("cuda") else "reference",
        cuda_graphs=not args.no_graphs,
        piecewise_graphs=not args.no_piecewise_graphs,
        overlap_scheduling=on_gpu and not args.no_overlap,
    )
    t0 = time.perf_counter()
    core = EngineCore(cfg)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s: {core.info()}")
    rng = np.random.default_rng(0)
    card = torch.cuda.get_device_name() if on_gpu else "cpu"
    if args.prefill or mixed is not None:
        if mixed is not None:
            profile_mixed(core, mixed, args.steps, rng, sync, card)
        else:
            profile_prefill(core, args, rng, sync, card)
        core.close()
        return
    start_decoding(core, args.batch_size, args.isl, 3 * args.steps, rng)
    plain = timed_steps(core, args.steps)
    drain(core)  # the phase timing below runs one step at a time

    phases: dict[str, list[float]] = {k: [] for k in ("schedule", "forward", "sample", "update")}
    for _ in range(args.steps // 2):
        t = time.perf_counter()
        batch = core.scheduler.schedule()
        t1 = time.perf_counter()
        fwd = core.engine.forward(batch)
        sync()
        t2 = time.perf_counter()
        out = core.decoder.sample(fwd.logits, batch)
        t3 = time.perf_counter()
        core.scheduler.update(batch, out)
        t4 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[name].append(dt)

    n_prof = 8
    prof = _profiled(lambda: [core.step() for _ in range(n_prof)], on_gpu, sync)
    rate = args.batch_size / statistics.median(plain)
    mode = "overlapped" if cfg.overlap_scheduling else "one at a time"
    print(f"\n== decode step, batch {args.batch_size}, context ~{args.isl}+ tokens, {card}")
    print(f"  step ({mode}, no syncs) {_ms(plain):7.3f} ms   -> {rate:,.0f} tok/s")
    for k, v in phases.items():
        print(f"  {k:<22} {_ms(v):7.3f} ms   (synced after each phase)")
    _print_tables(prof, n_prof, "step")
    core.close()


def profile_prefill(
    core: EngineCore, args: argparse.Namespace, rng: np.random.Generator, sync, card: str
) -> None:
    """Time steps that prefill batch_size fresh prompts of isl tokens each and sample one token."""
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    vocab = min(1000, core.engine.vocab_size)
    counter = iter(range(1 << 30))

    def one_prefill() -> None:
        for _ in range(args.batch_size):
            core.add_request(Request(f"p{next(counter)}", rng.integers(1, vocab, args.isl).tolist(), sp))
        while core.has_work():
            core.step()

    n_prof = 3
    times, prof = _timed_and_profiled(one_prefill, 3, max(3, args.steps // 8), n_prof, core, sync)
    tokens = args.batch_size * args.isl
    print(f"\n== prefill step, {args.batch_size} x {args.isl} = {tokens} new tokens, {card}")
    rate = tokens / statistics.median(times)
    print(f"  prefill + first token  {_ms(times):7.3f} ms   -> {rate:,.0f} prompt tok/s")
    _print_tables(prof, n_prof, "prefill")
    if args.sequence:
        print_sequence(prof, *_parse_sequence(args.sequence))


def _parse_mixed(spec: str) -> tuple[int, int, int, int]:
    try:
        decode, context, prompts, length = (int(v) for v in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--mixed takes D:C:P:L, four integers (150:2048:4:2000), got {spec!r}") from None
    if min(decode, context, prompts, length) < 1:
        raise SystemExit(f"--mixed values must be >= 1, got {spec!r}")
    return decode, context, prompts, length


def profile_mixed(
    core: EngineCore, mixed: tuple[int, int, int, int], steps: int, rng: np.random.Generator, sync, card: str
) -> None:
    """Time steps that carry ``decode`` decoding sequences (context ~``context``) and ``prompts`` fresh
    prompts of ``length`` tokens, each prompt finishing at its first token."""
    decode, context, prompts, length = mixed
    vocab = min(1000, core.engine.vocab_size)
    long_run = SamplingParams(temperature=0, max_tokens=3 * steps + 8, ignore_eos=True)
    step_tokens: list[int] = []  # the tokens each step carried
    forward = core.engine.forward

    def counted(batch, **kw):
        step_tokens.append(batch.num_tokens)
        return forward(batch, **kw)

    core.engine.forward = counted  # type: ignore[method-assign]
    for i in range(decode):
        core.add_request(Request(f"d{i}", rng.integers(1, vocab, context).tolist(), long_run))
    # their prefill (the last admitted may go on in chunks for a while), until a step is decode only
    while not step_tokens or step_tokens[-1] != decode:
        if len(step_tokens) > 4 * decode * context // max(core.engine.limits.max_num_tokens - decode, 1) + 64:
            raise SystemExit(f"the {decode} sequences never all reached decode; is the KV pool large enough?")
        core.step()
    one_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    counter = iter(range(1 << 30))

    def one_mixed() -> None:
        for _ in range(prompts):
            core.add_request(Request(f"p{next(counter)}", rng.integers(1, vocab, length).tolist(), one_token))
        core.step()
        while core._launched:  # finish the step (overlap scheduling keeps one in flight)
            core._apply(core._launched.popleft(), time.perf_counter())

    step_tokens.clear()
    n_prof = 3
    times, prof = _timed_and_profiled(one_mixed, 2, max(3, steps // 8), n_prof, core, sync)
    tokens, rate = decode + prompts * length, prompts * length / statistics.median(times)
    print(f"\n== mixed step, {decode} decode rows @~{context} + {prompts} x {length} fresh = {tokens} "
          f"tokens, {card}")  # fmt: skip
    print(f"  step  {_ms(times):7.3f} ms   -> {rate:,.0f} prompt tok/s   (steps carried {min(step_tokens)}-"
          f"{max(step_tokens)} tokens)")  # fmt: skip
    _print_tables(prof, n_prof, "step")


def start_decoding(
    core: EngineCore, batch_size: int, isl: int, max_tokens: int, rng: np.random.Generator
) -> None:
    """Admit ``batch_size`` greedy requests of ``isl`` random prompt tokens (EOS ignored, ``max_tokens``
    each) and step until every prompt is prefilled: the following steps decode only."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch_size):
        ids = rng.integers(1, min(1000, core.engine.vocab_size), isl).tolist()
        core.add_request(Request(f"r{i}", ids, sp))
    while core.scheduler.stats().num_waiting or core.stats.steps < 2:
        core.step()


def timed_steps(core: EngineCore, n: int) -> list[float]:
    """Seconds of each of ``n`` engine steps (with overlap scheduling: the pipeline's period)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t)
    return times


def drain(core: EngineCore) -> None:
    """Finish the steps in flight (overlap scheduling) and wait for the device."""
    while core._launched:
        core._apply(core._launched.popleft(), time.perf_counter())
    if core.engine.device.type == "cuda":
        torch.cuda.synchronize(core.engine.device)


def _timed_and_profiled(fn, warmups: int, reps: int, n_prof: int, core: EngineCore, sync):
    """``fn`` run ``warmups`` times (compiled code, kernel variants, graphs), then timed ``reps`` times
    with a device sync each, then ``n_prof`` times under torch.profiler: (seconds per rep, profile)."""
    for _ in range(warmups):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    prof = _profiled(lambda: [fn() for _ in range(n_prof)], core.engine.device.type == "cuda", sync)
    return times, prof


def _ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def _profiled(fn, on_gpu: bool, sync):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    return prof


def _parse_sequence(spec: str) -> tuple[int, int]:
    try:
        start, count = (int(v) for v in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--sequence takes START:COUNT, two integers (40:30), got {spec!r}") from None
    if start < 0 or count < 1:
        raise SystemExit(f"--sequence needs START >= 0 and COUNT >= 1, got {spec!r}")
    return start, count


def kernel_sequence(
    kernels: list[tuple[float, float, str]], start: int, count: int
) -> list[tuple[float, float, str]]:
    """(start, end, name) sorted by start -> (idle gap before, duration, name) of kernels start..start +
    count - 1; the gap runs from the latest end among the kernels before it (0 where they overlap)."""
    rows: list[tuple[float, float, str]] = []
    busy_end: float | None = None
    for i, (lo, hi, name) in enumerate(kernels[: start + count]):
        if i >= start:
            rows.append((max(0.0, lo - busy_end) if busy_end is not None else 0.0, hi - lo, name))
        busy_end = hi if busy_end is None else max(busy_end, hi)
    return rows


def print_sequence(prof, start: int, count: int) -> None:
    """The profile's kernels in device order (the first profiled step's, when START lies within it)."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == DeviceType.CUDA)  # fmt: skip
    print(f"\n== kernels {start}..{start + count - 1} in device order (gap before, duration; us)")
    for gap, dur, name in kernel_sequence(kernels, start, count):
        print(f"  {gap:7.1f} {dur:8.1f}  {name[:90]}")


def idle_gaps(kernels: list[tuple[float, float]]) -> tuple[list[tuple[float, float, float]], float]:
    """Sorted (start, end) kernel intervals -> ([(gap, from, to)] where no kernel ran, whole span)."""
    gaps, busy_end = [], kernels[0][1]
    for start, end in kernels[1:]:
        if start > busy_end:
            gaps.append((start - busy_end, busy_end, start))
        busy_end = max(busy_end, end)
    return gaps, busy_end - kernels[0][0]


def _print_gaps(prof, n: int, unit: str, top: int = 8) -> None:
    """Where the device sat idle between kernels, and what the host was running meanwhile.

    Kernel and host times come from one profiler timeline (us). A gap is the time from one kernel's
    end to the next kernel's start; the host ops shown are the shortest ones spanning the gap's
    midpoint (the innermost call the host was in)."""
    from torch.autograd import DeviceType

    events = prof.events()
    kernels = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA
    )
    if len(kernels) < 2:
        print("\n== device idle between kernels: no device kernels recorded")
        return
    host = [e for e in events if e.device_type == DeviceType.CPU]
    gaps, span = idle_gaps(kernels)
    idle = sum(g for g, _, _ in gaps)
    print(f"\n== device idle between kernels (per {unit}): {idle / n / 1e3:.3f} ms of {span / n / 1e3:.3f} "
          f"ms ({len(gaps) // max(n, 1)} gaps)")  # fmt: skip
    for g, lo, hi in sorted(gaps, reverse=True)[:top]:
        mid = (lo + hi) / 2
        spanning = sorted((e for e in host if e.time_range.start <= mid <= e.time_range.end),
                          key=lambda e: e.time_range.end - e.time_range.start)  # fmt: skip
        names = ", ".join(e.name[:40] for e in spanning[:3]) or "nothing profiled"
        print(f"  {g:8.1f} us   host in: {names}")


def _print_tables(prof, n: int, unit: str) -> None:
    from torch.autograd import DeviceType

    # device kernels only: a host op (aten::mm, a plugin's op such as kiln::linear, cudaGraphLaunch) also
    # reports the time of the kernels it launched and would count them twice
    kernel_names = {e.name for e in prof.events() if e.device_type == DeviceType.CUDA}
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.key in kernel_names]
    gpu_us = sum(e.self_device_time_total for e in events) / n
    print(f"  GPU kernels per {unit:<7} {gpu_us / 1e3:7.3f} ms   (torch.profiler, self device time)")
    print(f"\n== top kernels (per {unit})")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"  {e.self_device_time_total / n / 1e3:8.3f} ms  x{e.count // n:<4} {e.key[:90]}")
    print(f"\n== top host ops (self CPU time per {unit})")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {e.self_cpu_time_total / n / 1e3:8.3f} ms  x{e.count // n:<4} {e.key[:90]}")
    _print_gaps(prof, n, unit)


if __name__ == "__main__":
    main()
