"""Model presets: published architectures (config.json values) to benchmark with random weights.

``preset:NAME`` names one of ``PRESETS``. Speed does not depend on weight values, so a preset is the
real config.json and generation_config.json of a published checkpoint, a byte-level tokenizer and
random bf16 weights made on the target device (see ``kiln.bench.checkpoint``), cached on disk.
The ``tiny-*`` presets are small versions of the same architectures, for tests on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

PRESET_PREFIX = "preset:"
# Bumped whenever the files a preset materialises change, so stale caches are not reused.
_LAYOUT_VERSION = 2

_LLAMA3_ROPE_8 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
_LLAMA3_INSTRUCT_EOS = [128001, 128008, 128009]


def _llama3(hidden: int, inter: int, layers: int, heads: int, rope: dict[str, Any], **extra: Any) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": _LLAMA3_INSTRUCT_EOS,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(rope),
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }
    cfg.update(extra)
    return cfg


_LLAMA3_GEN = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": _LLAMA3_INSTRUCT_EOS,
    "temperature": 0.6,
    "top_p": 0.9,
}

_QWEN_GEN = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
}


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # the published checkpoint whose config this is
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    # Special tokens the byte-level tokenizer places at the model's own ids: content -> id.
    special_tokens: dict[str, int] = field(default_factory=dict)
    bos_token: str | None = None
    eos_token: str | None = None


def _llama_specials() -> dict[str, int]:
    return {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
    }


def _qwen_specials() -> dict[str, int]:
    return {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def _build() -> dict[str, Preset]:
    presets = [
        Preset(
            "llama-3.1-8b",
            "meta-llama/Llama-3.1-8B-Instruct",
            _llama3(4096, 14336, 32, 32, _LLAMA3_ROPE_8),
            dict(_LLAMA3_GEN),
            _llama_specials(),
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        Preset(
            "llama-3.1-70b",
            "meta-llama/Llama-3.1-70B-Instruct",
            _llama3(8192, 28672, 80, 64, _LLAMA3_ROPE_8),
            dict(_LLAMA3_GEN),
            _llama_specials(),
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        Preset(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B-Instruct",
            _llama3(
                2048, 8192, 16, 32, {**_LLAMA3_ROPE_8, "factor": 32.0}, head_dim=64, tie_word_embeddings=True
            ),
            dict(_LLAMA3_GEN),
            _llama_specials(),
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        Preset(
            "qwen3-0.6b",
            "Qwen/Qwen3-0.6B",
            {
                "architectures": ["Qwen3ForCausalLM"],
                "attention_bias": False,
                "attention_dropout": 0.0,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "head_dim": 128,
                "hidden_act": "silu",
                "hidden_size": 1024,
                "initializer_range": 0.02,
                "intermediate_size": 3072,
                "max_position_embeddings": 40960,
                "max_window_layers": 28,
                "model_type": "qwen3",
                "num_attention_heads": 16,
                "num_hidden_layers": 28,
                "num_key_value_heads": 8,
                "rms_norm_eps": 1e-06,
                "rope_scaling": None,
                "rope_theta": 1000000,
                "sliding_window": None,
                "tie_word_embeddings": True,
                "torch_dtype": "bfloat16",
                "use_cache": True,
                "use_sliding_window": False,
                "vocab_size": 151936,
            },
            {**_QWEN_GEN, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
            _qwen_specials(),
            None,
            "<|im_end|>",
        ),
        Preset(
            "qwen2.5-7b",
            "Qwen/Qwen2.5-7B-Instruct",
            {
                "architectures": ["Qwen2ForCausalLM"],
                "attention_dropout": 0.0,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "hidden_act": "silu",
                "hidden_size": 3584,
                "initializer_range": 0.02,
                "intermediate_size": 18944,
                "max_position_embeddings": 32768,
                "max_window_layers": 28,
                "model_type": "qwen2",
                "num_attention_heads": 28,
                "num_hidden_layers": 28,
                "num_key_value_heads": 4,
                "rms_norm_eps": 1e-06,
                "rope_theta": 1000000.0,
                "sliding_window": 131072,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
                "use_cache": True,
                "use_sliding_window": False,
                "vocab_size": 152064,
            },
            {**_QWEN_GEN, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8},
            _qwen_specials(),
            None,
            "<|im_end|>",
        ),
        Preset(
            "mistral-7b",
            "mistralai/Mistral-7B-Instruct-v0.3",
            {
                "architectures": ["MistralForCausalLM"],
                "attention_dropout": 0.0,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "hidden_act": "silu",
                "hidden_size": 4096,
                "initializer_range": 0.02,
                "intermediate_size": 14336,
                "max_position_embeddings": 32768,
                "model_type": "mistral",
                "num_attention_heads": 32,
                "num_hidden_layers": 32,
                "num_key_value_heads": 8,
                "rms_norm_eps": 1e-05,
                "rope_theta": 1000000.0,
                "sliding_window": None,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
                "use_cache": True,
                "vocab_size": 32768,
            },
            {"bos_token_id": 1, "eos_token_id": 2},
            {"<unk>": 0, "<s>": 1, "</s>": 2},
            "<s>",
            "</s>",
        ),
    ]
    # Small versions of the same architectures (fp32, a few layers) for CPU tests.
    tiny_llama = _llama3(
        64,
        128,
        2,
        4,
        {**_LLAMA3_ROPE_8, "original_max_position_embeddings": 256},
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
        torch_dtype="float32",
        bos_token_id=1,
        eos_token_id=2,
    )
    tiny_qwen3 = copy.deepcopy(presets[3].config)
    tiny_qwen3.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=1024,
        max_window_layers=2,
        torch_dtype="float32",
        bos_token_id=1,
        eos_token_id=2,
    )
    tiny_qwen2 = copy.deepcopy(presets[4].config)
    tiny_qwen2.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
        sliding_window=1024,
        max_window_layers=2,
        torch_dtype="float32",
        bos_token_id=1,
        eos_token_id=2,
    )
    tiny_specials = {"<s>": 1, "</s>": 2}
    tiny_gen = {"bos_token_id": 1, "eos_token_id": 2}
    for name, cfg in (("tiny-llama", tiny_llama), ("tiny-qwen3", tiny_qwen3), ("tiny-qwen2", tiny_qwen2)):
        presets.append(Preset(name, "(test architecture)", cfg, dict(tiny_gen), tiny_specials, "<s>", "</s>"))
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _build()


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset ``name`` (with or without the ``preset:`` prefix); a deep copy, safe to change."""
    if name.startswith(PRESET_PREFIX):
        name = name[len(PRESET_PREFIX) :]
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return copy.deepcopy(PRESETS[name])


def is_preset(spec: str) -> bool:
    return spec.startswith(PRESET_PREFIX)


def default_cache_root() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "kiln", "presets")


def preset_key(preset: Preset, dtype: str, seed: int) -> str:
    """A short hash of everything that decides the materialised files."""
    blob = json.dumps(
        {
            "config": preset.config,
            "generation_config": preset.generation_config,
            "special_tokens": preset.special_tokens,
            "dtype": dtype,
            "seed": seed,
            "layout": _LAYOUT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def materialize_preset(
    name: str,
    cache_root: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> str:
    """Make (or reuse) the preset's model directory and return its path.

    ``dtype`` defaults to the config's ``torch_dtype``; ``device`` (where the random weights are drawn)
    to cuda when present. The directory is written under a temporary name and renamed when complete,
    so an interrupted run never leaves a half-written model that a later run would trust.
    """
    from kiln.bench.checkpoint import checkpoint_bytes, write_byte_tokenizer, write_random_checkpoint

    preset = get_preset(name)
    dtype = dtype or str(preset.config.get("torch_dtype", "bfloat16"))
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"preset weights dtype must be bfloat16, float16 or float32, got {dtype!r}")
    root = cache_root or default_cache_root()
    final = os.path.join(root, f"{preset.name}-{dtype}-{preset_key(preset, dtype, seed)}")
    if os.path.isfile(os.path.join(final, ".complete")):
        return final
    os.makedirs(root, exist_ok=True)
    need = checkpoint_bytes(preset.config, dtype)
    free = shutil.disk_usage(root).free
    if need > 0.98 * free:
        raise ValueError(
            f"preset {preset.name} needs {need / 1e9:.1f} GB of disk under {root} but only "
            f"{free / 1e9:.1f} GB is free; pass --preset-cache DIR on a larger disk or pick a smaller preset"
        )
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        config = dict(preset.config)
        config["torch_dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(preset.generation_config, f, indent=2, sort_keys=True)
        write_byte_tokenizer(
            tmp,
            preset.special_tokens,
            preset.bos_token,
            preset.eos_token,
            int(config.get("max_position_embeddings", 2048)),
            vocab_size=int(config["vocab_size"]),
        )
        write_random_checkpoint(tmp, config, dtype=dtype, device=device, seed=seed, verbose=verbose)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(preset.source + "\n")
        if os.path.isdir(final) and not os.path.isfile(os.path.join(final, ".complete")):
            shutil.rmtree(final)  # an incomplete leftover of an interrupted run
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, ".complete")):
                raise
            shutil.rmtree(tmp)  # another process finished the same preset first: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve_model(
    spec: str,
    cache_root: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    verbose: bool = True,
) -> tuple[str, str | None]:
    """``spec`` is a model directory or ``preset:NAME``; returns (directory, preset name or None)."""
    if is_preset(spec):
        name = get_preset(spec).name
        return materialize_preset(name, cache_root, device=device, dtype=dtype, verbose=verbose), name
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise ValueError(
            f"--model must be a model directory with config.json or preset:NAME "
            f"(presets: {', '.join(list_presets())}); got {spec!r}"
        )
    return spec, None
