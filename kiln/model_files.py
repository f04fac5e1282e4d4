"""Reading a model directory's JSON files (config, generation config) without building anything."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# generation_config.json keys that become SamplingParams defaults when the caller gives none.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class ModelFiles:
    path: str
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def max_position_embeddings(self) -> int:
        return int(self.config.get("max_position_embeddings") or 2048)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        for src in (self.config, self.generation_config):
            v = src.get("eos_token_id")
            for t in v if isinstance(v, list) else [v]:
                if isinstance(t, int) and t not in ids:
                    ids.append(t)
        return tuple(ids)

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        g = self.generation_config
        if g.get("do_sample") is False:
            return {"temperature": 0.0}
        return {k: g[k] for k in _SAMPLING_KEYS if g.get(k) is not None}


def read_model_files(path: str) -> ModelFiles:
    if not os.path.isdir(path):
        raise ValueError(
            f"model must be a directory with config.json and safetensors weights; {path!r} is not a directory"
        )
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"model directory {path!r} has no config.json")
    with open(cfg_path) as f:
        config = json.load(f)
    gen: dict[str, Any] = {}
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
    return ModelFiles(path=path, config=config, generation_config=gen)
