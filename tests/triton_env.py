"""Where the tests' Triton kernels run: compiled on a GPU, else in Triton's interpreter.

Import this before triton: the interpreter must be chosen before kernels are decorated at import.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Triton 3.6's interpreter fails in its loops with numpy >= 2.4
INTERPRETER_UNUSABLE = not ON_GPU and tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4)
INTERPRETER_SKIP_REASON = "Triton's interpreter needs numpy < 2.4 (its loops fail)"


def skip_module_without_triton() -> None:
    """At a test module's top: skip the whole module when triton is missing or its interpreter unusable."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'kiln[test]')")
    if INTERPRETER_UNUSABLE:
        pytest.skip(INTERPRETER_SKIP_REASON, allow_module_level=True)
