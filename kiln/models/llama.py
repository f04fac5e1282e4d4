"""Llama (2, 3, 3.1, 3.2) and Mistral: config parsing onto the shared decoder."""

from __future__ import annotations

from typing import Any

from kiln.builder.model_config import ModelConfig, get, integer, parse_common
from kiln.models.decoder import DecoderForCausalLM


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    # attention_bias puts a bias on q, k, v and o alike; mlp_bias on gate, up and down.
    attention_bias = bool(get(hf, "attention_bias", False))
    return parse_common(
        hf, qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(get(hf, "mlp_bias", False))
    )


def mistral_config(hf: dict[str, Any]) -> ModelConfig:
    # Mistral applies its sliding window (when set) to every layer.
    window = integer(hf, "sliding_window", 0, minimum=0)
    num_layers = int(hf.get("num_hidden_layers") or 0)
    return parse_common(hf, sliding_windows=(window,) * num_layers)


class LlamaForCausalLM(DecoderForCausalLM):
    pass


class MistralForCausalLM(DecoderForCausalLM):
    pass
