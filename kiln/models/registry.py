"""Model registry, keyed by the Hugging Face ``architectures[0]`` of config.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.builder.model_config import ModelConfig, architecture_of
from kiln.layers.rotary import inverse_frequencies
from kiln.models.decoder import DecoderForCausalLM
from kiln.models.llama import LlamaForCausalLM, MistralForCausalLM, llama_config, mistral_config
from kiln.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM, qwen2_config, qwen3_config


@dataclass(frozen=True)
class ModelSpec:
    model_cls: type[DecoderForCausalLM]
    parse_config: Callable[[dict[str, Any]], ModelConfig]


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "LlamaForCausalLM": ModelSpec(LlamaForCausalLM, llama_config),
    "MistralForCausalLM": ModelSpec(MistralForCausalLM, mistral_config),
    "Qwen2ForCausalLM": ModelSpec(Qwen2ForCausalLM, qwen2_config),
    "Qwen3ForCausalLM": ModelSpec(Qwen3ForCausalLM, qwen3_config),
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_spec(architecture: str) -> ModelSpec:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported: {supported_architectures()}"
        )
    return MODEL_REGISTRY[architecture]


def parse_model_config(hf: dict[str, Any]) -> ModelConfig:
    """config.json (as a dict) -> ModelConfig, through the family's parser."""
    cfg = get_model_spec(architecture_of(hf)).parse_config(hf)
    # The RoPE table is made only when weights are installed: check its parameters now, so that neither
    # `kiln build` nor a load reads the weights of a model it cannot run.
    try:
        inverse_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, cfg.max_position_embeddings)
    except ValueError as e:
        field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        raise ValueError(f"config.json {field}: {e}") from e
    return cfg
