"""Shared fixtures: tiny random HF models (built once per session and cached by their arguments)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

# Without a GPU, Triton kernels run in its interpreter. That must be chosen before anything imports
# triton (kernels, and triton's own library functions, are made at import), whatever the test order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """``tiny_model(arch="LlamaForCausalLM", **kwargs)`` -> model directory (see tiny_models.make_tiny_model).

    Calls with the same arguments share one directory: treat it as read-only.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, str] = {}

    def make(arch: str = "LlamaForCausalLM", **kwargs) -> str:
        key = json.dumps([arch, kwargs], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = make_tiny_model(root, arch, **kwargs)
        return cache[key]

    return make
