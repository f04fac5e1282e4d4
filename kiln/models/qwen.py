"""Qwen2 / Qwen2.5 (bias on q, k, v) and Qwen3 (per-head q/k RMSNorm) on the shared decoder."""

from __future__ import annotations

from typing import Any

from kiln.builder.model_config import ModelConfig, get, integer, parse_common
from kiln.models.decoder import DecoderForCausalLM


def qwen_sliding_windows(hf: dict[str, Any]) -> tuple[int, ...]:
    """Per-layer windows as transformers derives them: only with use_sliding_window, and only on layers
    marked "sliding_attention" in layer_types (by default the layers from max_window_layers on)."""
    num_layers = int(hf.get("num_hidden_layers") or 0)
    window = integer(hf, "sliding_window", 0, minimum=0)
    if not hf.get("use_sliding_window") or not window:
        return (0,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = int(get(hf, "max_window_layers", 28))
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" else 0 for t in layer_types)


def qwen2_config(hf: dict[str, Any]) -> ModelConfig:
    return parse_common(hf, qkv_bias=True, sliding_windows=qwen_sliding_windows(hf))


def qwen3_config(hf: dict[str, Any]) -> ModelConfig:
    attention_bias = bool(get(hf, "attention_bias", False))
    return parse_common(
        hf,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=True,
        sliding_windows=qwen_sliding_windows(hf),
    )


class Qwen2ForCausalLM(DecoderForCausalLM):
    pass


class Qwen3ForCausalLM(DecoderForCausalLM):
    pass
