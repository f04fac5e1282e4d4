"""Host cost of the scheduler in steady decode: ``schedule()`` and ``update()`` per step at a batch size.

    python3 scripts/bench_scheduler.py --batch-size 256 [--profile]

No model and no device: fake step outputs, the overlap pattern of the engine (step N+1 scheduled
before step N is applied). The figure is this machine's; compare runs on one machine only.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

from kiln.config import EngineLimits, SchedulerConfig
from kiln.executor.messages import Request, ScheduledBatch, StepOutput
from kiln.executor.scheduler import Scheduler
from kiln.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60, help="decode steps timed (default 60)")
    ap.add_argument("--profile", action="store_true", help="print the top functions (cProfile)")
    args = ap.parse_args()
    b = args.batch_size
    sched = Scheduler(
        SchedulerConfig(),
        EngineLimits(max_batch_size=b, max_num_tokens=max(8192, b), max_seq_len=args.isl + args.steps + 64),
        num_blocks=b * (-(-(args.isl + args.steps + 64) // 32)) + 1,
        tokens_per_block=32,
        free_delay_steps=1,
    )
    rng = np.random.default_rng(0)
    for i in range(b):
        params = SamplingParams(max_tokens=args.steps + 32, ignore_eos=True, temperature=0)
        sched.add_request(Request(f"r{i}", rng.integers(1, 1000, args.isl).tolist(), params, (2,), 0.0))
    times: dict[str, list[float]] = {"schedule": [], "update": []}
    prev: list[ScheduledBatch | None] = [None]

    def step() -> None:
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
        last = prev[0]
        if last is not None:
            r = len(last.sample_seq_ids)
            out = StepOutput(last.step_id, np.asarray(last.sample_seq_ids, np.int32),
                             rng.integers(1, 1000, r).astype(np.int32), np.zeros(r, np.float32))  # fmt: skip
            sched.update(last, out)
        t2 = time.perf_counter()
        prev[0] = batch
        if batch is not None and batch.num_decode == batch.num_seqs == b:
            times["schedule"].append(t1 - t0)
            times["update"].append(t2 - t1)

    while not times["schedule"]:  # prefill until every sequence decodes
        step()
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [step() for _ in range(args.steps)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    else:
        for _ in range(args.steps):
            step()
    sch, upd = (1e3 * float(np.median(times[k])) for k in ("schedule", "update"))
    n = len(times["update"])
    print(f"batch {b}: schedule {sch:.3f} ms + update {upd:.3f} ms per decode step (median of {n})")


if __name__ == "__main__":
    main()
