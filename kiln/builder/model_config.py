"""What kiln needs to know about a checkpoint, read from its config.json and generation_config.json.

``ModelConfig`` is the architecture (shapes, flags, RoPE); ``ModelInfo`` is the small public summary
the rest of kiln uses (EOS ids, context length, generation defaults, the dtype weights run in).
config.json is read as plain JSON (no transformers classes), so both the transformers 4 layout
(``rope_theta`` + ``rope_scaling``) and the 5 layout (``rope_parameters``) are accepted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

# Keys of generation_config.json used as per-model sampling defaults (when present).
GENERATION_DEFAULT_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
    "do_sample",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. ``rope_type`` is one of ``rotary.SUPPORTED_ROPE_TYPES``."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3 / yarn: the context length the model was pre-trained with
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, as every supported family needs it."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 with attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 with attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    # Per layer: attention window in tokens, 0 = full attention.
    sliding_windows: tuple[int, ...] = ()
    checkpoint_dtype: torch.dtype = torch.float32
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class ModelInfo:
    """Public summary of a loaded (or about to be loaded) model."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # Sampling defaults of the checkpoint (generation_config.json), keys from GENERATION_DEFAULT_KEYS.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # Largest attention window of any layer, 0 when every layer attends to the whole context.
    sliding_window: int = 0
    config: ModelConfig | None = None


# ---------------------------------------------------------------- reading files


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # the bare message would not name the file
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_hf_config(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no config.json in {model_dir!r}: expected a Hugging Face model directory "
            "(config.json + *.safetensors)"
        )
    return read_json(path)


def read_generation_config(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "generation_config.json")
    return read_json(path) if os.path.isfile(path) else {}


def architecture_of(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        raise ValueError("config.json has no 'architectures' entry; cannot tell which model class to build")
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ValueError(f"config.json 'architectures' must be a list of names, got {archs!r}")
    return archs[0]


def as_id_tuple(value: Any) -> tuple[int, ...]:
    """eos_token_id may be absent, an int or a list of ints."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"eos_token_id must be an integer or a list of integers, got {value!r}")


def merge_ids(*groups: tuple[int, ...]) -> tuple[int, ...]:
    out: list[int] = []
    for g in groups:
        out.extend(i for i in g if i not in out)
    return tuple(out)


# ---------------------------------------------------------------- parsing config.json


def get(hf: dict[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key)
    return default if value is None else value


def require(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config.json lacks the required field {key!r}")
    return hf[key]


def integer(hf: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer field (``default`` when absent; required when ``default`` is None), at least ``minimum``."""
    value = require(hf, key) if default is None else get(hf, key, default)
    # bool is an int to Python, and a float like 64.0 can come from a hand-edited config
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config.json field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def number(hf: dict[str, Any], key: str, default: float) -> float:
    value = get(hf, key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json field {key!r} must be a positive number, got {value!r}")
    return float(value)


def checkpoint_dtype_of(hf: dict[str, Any]) -> torch.dtype:
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"config.json dtype {name!r} is not supported; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


def parse_rope(hf: dict[str, Any]) -> RopeConfig:
    """Accept the transformers 5 ``rope_parameters`` dict or the older ``rope_theta`` + ``rope_scaling``."""
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key) or {}, dict):
            raise ValueError(f"config.json field {key!r} must be an object, got {hf[key]!r}")
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    field = "rope_parameters" if params else "rope_scaling"

    def num(key: str, default: float | None, fallback: Any = None) -> float | None:
        value = merged.get(key, fallback)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"config.json {field} field {key!r} must be a number, got {value!r}")
        return float(value)

    original = num("original_max_position_embeddings", None)
    if original is not None and not original.is_integer():
        raise ValueError(
            f"config.json {field} field 'original_max_position_embeddings' must be an integer, got {original}"
        )
    return RopeConfig(
        theta=num("rope_theta", 10000.0, hf.get("rope_theta")) or 10000.0,
        rope_type=str(merged.get("rope_type") or merged.get("type") or "default"),
        factor=num("factor", 1.0) or 1.0,
        low_freq_factor=num("low_freq_factor", 1.0) or 1.0,
        high_freq_factor=num("high_freq_factor", 4.0) or 4.0,
        original_max_position_embeddings=None if original is None else int(original),
        beta_fast=num("beta_fast", 32.0) or 32.0,
        beta_slow=num("beta_slow", 1.0) or 1.0,
        mscale=num("mscale", None),
        mscale_all_dim=num("mscale_all_dim", None),
        attention_factor=num("attention_factor", None),
        truncate=bool(merged.get("truncate", True)),
        partial_rotary_factor=num("partial_rotary_factor", 1.0, hf.get("partial_rotary_factor")) or 1.0,
    )


def parse_common(hf: dict[str, Any], **flags: Any) -> ModelConfig:
    """The fields every Llama-style family shares; ``flags`` sets the family-specific ones."""
    if get(hf, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json field 'hidden_act' {hf.get('hidden_act')!r} is not supported; supported: 'silu'"
        )
    hidden = integer(hf, "hidden_size")
    heads = integer(hf, "num_attention_heads")
    num_layers = integer(hf, "num_hidden_layers")
    kv_heads = integer(hf, "num_key_value_heads", heads)
    if heads % kv_heads != 0:
        raise ValueError(
            f"config.json: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    if hf.get("head_dim") is None and hidden % heads != 0:
        raise ValueError(
            f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
            "and there is no head_dim"
        )
    head_dim = integer(hf, "head_dim", hidden // heads)
    if head_dim % 2:
        raise ValueError(f"config.json: head_dim ({head_dim}) must be even for rotary position embeddings")
    flags.setdefault("sliding_windows", (0,) * num_layers)
    return ModelConfig(
        architecture=architecture_of(hf),
        model_type=str(hf.get("model_type", "")),
        vocab_size=integer(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=integer(hf, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=integer(hf, "max_position_embeddings", 2048),
        rms_norm_eps=number(hf, "rms_norm_eps", 1e-6),
        rope=parse_rope(hf),
        tie_word_embeddings=bool(get(hf, "tie_word_embeddings", False)),
        checkpoint_dtype=checkpoint_dtype_of(hf),
        bos_token_id=hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else None,
        eos_token_ids=as_id_tuple(hf.get("eos_token_id")),
        **flags,
    )


# ---------------------------------------------------------------- dtype and info


def resolve_dtype(
    dtype: str | torch.dtype, checkpoint_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """ "auto" is the checkpoint's dtype on a GPU and float32 on the CPU."""
    allowed = "use 'auto', 'float32', 'bfloat16' or 'float16'"
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; {allowed}")
        return dtype
    name = str(dtype).replace("torch.", "")
    if name == "auto":
        return checkpoint_dtype if device.type != "cpu" else torch.float32
    name = _ALIASES.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; {allowed}")
    return _DTYPES[name]


def build_model_info(cfg: ModelConfig, gen: dict[str, Any], dtype: torch.dtype) -> ModelInfo:
    defaults = {k: gen[k] for k in GENERATION_DEFAULT_KEYS if gen.get(k) is not None}
    return ModelInfo(
        architecture=cfg.architecture,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        dtype=dtype,
        eos_token_ids=merge_ids(cfg.eos_token_ids, as_id_tuple(gen.get("eos_token_id"))),
        bos_token_id=cfg.bos_token_id if cfg.bos_token_id is not None else gen.get("bos_token_id"),
        generation_defaults=defaults,
        sliding_window=max(cfg.sliding_windows, default=0),
        config=cfg,
    )
