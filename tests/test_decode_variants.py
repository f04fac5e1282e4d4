"""scripts/decode_variants.py on the CPU: the script itself (its figures count only on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_variants_are_timed_in_turn_from_one_engine(tmp_path):
    script = str(ROOT / "scripts" / "decode_variants.py")
    report = tmp_path / "variants.json"
    cmd = [sys.executable, script, "--model", "preset:tiny-llama", "--device", "cpu", "--preset-cache",
           str(tmp_path), "--rounds", "2", "--steps", "3", "--warmup-steps", "1", "--variant", "base=",
           "--variant", "nopdl=KILN_PDL=0,KILN_GEMV_PREFETCH_K=4096", "--json", str(report)]  # fmt: skip
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("round 2 ") == 2  # both variants in each round
    order = [line.split()[2] for line in done.stdout.splitlines() if line.strip().startswith("round ")]
    assert order == ["base", "nopdl", "nopdl", "base"]  # the second round in reverse: drift cancels
    assert "1.000x vs base" in done.stdout and "KILN_PDL=0,KILN_GEMV_PREFETCH_K=4096" in done.stdout
    timings = json.loads(report.read_text())["step_s"]
    assert sorted(timings) == ["base", "nopdl"] and all(len(t) == 2 and min(t) > 0 for t in timings.values())


def test_variant_specs_are_checked():
    from decode_variants import parse_variant

    assert parse_variant("base=") == ("base", {})
    assert parse_variant("x=KILN_PDL=0,KILN_GEMV_PLAN=1:1024:8") == (
        "x",
        {"KILN_PDL": "0", "KILN_GEMV_PLAN": "1:1024:8"},
    )
    for bad in ("nameonly", "=KILN_PDL=0", "x=KILN_PDL"):
        with pytest.raises(ValueError, match="variant"):
            parse_variant(bad)
