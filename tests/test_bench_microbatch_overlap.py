"""scripts/bench_microbatch_overlap.py on the CPU: the script and its split's check (its times count only
on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = str(ROOT / "scripts" / "bench_microbatch_overlap.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_two_micro_batches_compute_what_the_one_batch_does():
    # 3 decode rows at a context of 40 (pages of 16, in shuffled order), 2 prompts of 16
    sizes = ["--decode-rows", "3", "--context", "40", "--prompts", "2", "--prompt-len", "16", "--layers", "2"]
    done = _run(*sizes)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 decode rows @40 + 2 x 16 prompt tokens, 2 layers, hidden 64, on cpu" in done.stdout
    assert "no CUDA device: outputs checked, nothing timed" in done.stdout


def test_sizes_are_checked():
    done = _run("--prompts", "0")
    assert done.returncode != 0 and "must be >= 1" in done.stderr
