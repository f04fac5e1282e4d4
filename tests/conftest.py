"""Shared fixtures: tiny random HF models (built once per session and cached by their arguments)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from tiny_models import make_tiny_model


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
