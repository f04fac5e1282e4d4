"""scripts/bench_prefill_gemm.py on the CPU: the script itself (its figures count only on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_prefill_gemm_times_every_projection_at_every_row_count(tmp_path):
    report = tmp_path / "gemm.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_prefill_gemm.py"), "--preset", "tiny-llama",
           "--device", "cpu", "--rows", "16", "48", "--iters", "2", "--json", str(report)]  # fmt: skip
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(report.read_text())["rows"]
    assert [r["rows"] for r in rows] == [16, 48]
    assert all(set(r["us"]) == {"qkv", "o", "gate_up", "down"} and r["tflops"] > 0 for r in rows)


def test_residual_variant_times_o_and_down_both_ways(tmp_path):
    # --residual: o and down with the residual add and RMSNorm apart, and with the add in cuBLAS's
    # epilogue (addmm), the two checked equal before timing
    report = tmp_path / "residual.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_prefill_gemm.py"), "--preset", "tiny-llama",
           "--device", "cpu", "--rows", "16", "--iters", "2", "--rounds", "1", "--residual",
           "--json", str(report)]  # fmt: skip
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(report.read_text())["residual"]
    assert row["rows"] == 16 and set(row["us"]) == {"o", "o+addmm", "down", "down+addmm"}
    assert all(us > 0 for us in row["us"].values())


def test_blas_option_times_each_size_under_each_back_end(tmp_path):
    # --blas: every size once per back end (on the CPU the setting is left alone: the rows still come)
    report = tmp_path / "blas.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_prefill_gemm.py"), "--preset", "tiny-llama",
           "--device", "cpu", "--rows", "16", "--iters", "1", "--rounds", "1", "--blas", "cublas", "cublaslt",
           "--json", str(report)]  # fmt: skip
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(report.read_text())["rows"]
    assert [(r["rows"], r["blas"]) for r in rows] == [(16, "cublas"), (16, "cublaslt")]
