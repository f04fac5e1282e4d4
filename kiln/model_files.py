"""The front end's view of a model directory: its config files, read without building anything.

The JSON readers and the EOS-id rules are the builder's (kiln/builder/model_config.py); this adds
what the front end needs from them: the served name, the context limit, the EOS ids and the
SamplingParams defaults of generation_config.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kiln.builder.model_config import (
    as_id_tuple,
    integer,
    merge_ids,
    read_generation_config,
    read_hf_config,
)

# The generation-config keys that are SamplingParams fields of the same meaning (do_sample is
# handled apart; the output length stays the caller's choice).
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


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
        return integer(self.config, "max_position_embeddings", 2048)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return merge_ids(
            as_id_tuple(self.config.get("eos_token_id")),
            as_id_tuple(self.generation_config.get("eos_token_id")),
        )

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        g = self.generation_config
        if g.get("do_sample") is False:
            return {"temperature": 0.0}
        return {k: g[k] for k in _SAMPLING_FIELDS if g.get(k) is not None}


def read_model_files(path: str) -> ModelFiles:
    if not os.path.isdir(path):
        raise ValueError(
            f"model must be a directory with config.json and safetensors weights; {path!r} is not a directory"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model directory {path!r} has no config.json")
    return ModelFiles(path=path, config=read_hf_config(path), generation_config=read_generation_config(path))
