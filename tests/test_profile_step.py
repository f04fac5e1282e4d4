"""scripts/profile_step.py on the CPU: the script itself (its figures count only on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _profile(tmp_path, *args: str) -> subprocess.CompletedProcess:
    script = str(ROOT / "scripts" / "profile_step.py")
    cmd = [sys.executable, script, "--model", "preset:tiny-llama", "--device", "cpu", "--preset-cache",
           str(tmp_path), "--steps", "8", *args]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_mixed_steps_carry_the_decode_rows_and_the_fresh_prompts(tmp_path):
    done = _profile(tmp_path, "--mixed", "4:64:2:32")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== mixed step, 4 decode rows @~64 + 2 x 32 fresh = 68 tokens, cpu" in done.stdout
    assert "(steps carried 68-68 tokens)" in done.stdout  # every timed step had all of them


def test_mixed_spec_is_checked(tmp_path):
    done = _profile(tmp_path, "--mixed", "4:64:2")
    assert done.returncode != 0 and "--mixed takes D:C:P:L, four integers" in done.stderr


def test_kernel_sequence_lists_each_kernel_with_the_idle_gap_before_it():
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "scripts" / "profile_step.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernels = [(0.0, 10.0, "a"), (12.0, 20.0, "b"), (15.0, 30.0, "c"), (29.0, 31.0, "d"), (40.0, 41.0, "e")]
    # c overlaps b (no gap), d starts before c ends, e waits 9 us after the latest end (31)
    assert mod.kernel_sequence(kernels, 1, 4) == [(2.0, 8.0, "b"), (0.0, 15.0, "c"), (0.0, 2.0, "d"),
                                                  (9.0, 1.0, "e")]  # fmt: skip
    assert mod.kernel_sequence(kernels, 0, 1) == [(0.0, 10.0, "a")]


def test_sequence_spec_is_checked(tmp_path):
    done = _profile(tmp_path, "--prefill", "--sequence", "5")
    assert done.returncode != 0 and "--sequence takes START:COUNT" in done.stderr
