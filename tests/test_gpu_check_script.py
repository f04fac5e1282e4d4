"""scripts/gpu_check.sh, checked on the CPU: it only runs on the GPU machine, where a broken group costs
device time."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_group_runs_a_function_defined_once():
    text = SCRIPT.read_text()
    defined = Counter(re.findall(r"^([a-z_]+)\(\) \{", text, flags=re.M))
    assert [name for name, n in defined.items() if n > 1] == []
    dispatch = text[text.rindex('for g in "${groups[@]}"; do') :]
    calls = re.findall(r"^\s+[a-z]+\) ([a-z_; ]+);;", dispatch, flags=re.M)
    called = {name.strip() for call in calls for name in call.split(";") if name.strip()}
    assert "gsilu" in called and "pgemm" in called
    assert called - set(defined) == set()
    accepted = re.search(r"^\s+(env \| tiny[a-z |]+)\) ;;", text, flags=re.M)
    assert accepted is not None
    groups = {g.strip() for g in accepted.group(1).split("|")}
    dispatched = set(re.findall(r"^\s+([a-z]+)\) ", dispatch, flags=re.M))
    assert groups == dispatched
