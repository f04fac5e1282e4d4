"""Load a Hugging Face checkpoint (one or many safetensors files) into a kiln model.

The model is built on the meta device, so no memory is spent on random initial weights. Tensors are
then read one at a time from the safetensors files, converted to the target dtype and device, and
either kept as they are or copied into their slice of a fused projection (q|k|v, gate|up), which is
allocated once at its final size. ``load_state_dict(assign=True)`` finally installs the tensors as
the parameters: the weights exist once in memory, plus one checkpoint tensor in flight.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from kiln.builder.model_config import (
    ModelConfig,
    ModelInfo,
    architecture_of,
    build_model_info,
    read_generation_config,
    read_hf_config,
    read_json,
    resolve_dtype,
)
from kiln.models.decoder import DecoderForCausalLM
from kiln.models.registry import get_model_spec, parse_model_config
from kiln.plugins import PluginSet

# Checkpoint tensors that carry no weights kiln needs (RoPE tables are recomputed).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint: from model.safetensors.index.json when present."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise FileNotFoundError(f"{index} lists files that are not in {model_dir!r}: {missing}")
        return [os.path.join(model_dir, f) for f in files]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    # Some repositories also ship the original weights (e.g. consolidated.safetensors) beside HF's.
    hf_named = [f for f in files if f.startswith("model")]
    files = hf_named or files
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir!r}; kiln loads safetensors checkpoints only "
            "(convert .bin weights with transformers' save_pretrained(safe_serialization=True))"
        )
    return [os.path.join(model_dir, f) for f in files]


def load_model_config(model_dir: str) -> ModelConfig:
    return parse_model_config(read_hf_config(model_dir))


def read_model_info(model_dir: str, dtype: str | torch.dtype = "auto", device: str = "cpu") -> ModelInfo:
    """ModelInfo without loading any weight (for a front end that needs EOS ids or the context length)."""
    cfg = load_model_config(model_dir)
    target_dtype = resolve_dtype(dtype, cfg.checkpoint_dtype, torch.device(device))
    return build_model_info(cfg, read_generation_config(model_dir), target_dtype)


def load_model(
    model_dir: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    plugins: PluginSet | None = None,
    max_positions: int | None = None,
) -> tuple[DecoderForCausalLM, ModelInfo]:
    """Build the model of ``model_dir`` with its weights on ``device`` in ``dtype``.

    ``max_positions`` sizes the RoPE table (default: max_position_embeddings).
    """
    device = torch.device(device)
    hf = read_hf_config(model_dir)
    spec = get_model_spec(architecture_of(hf))
    cfg = spec.parse_config(hf)
    target_dtype = resolve_dtype(dtype, cfg.checkpoint_dtype, device)
    plugins = plugins or PluginSet("reference")
    with torch.device("meta"):
        model = spec.model_cls(cfg, plugins)
    state = _read_weights(model, checkpoint_files(model_dir), target_dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.materialize_rope(max_positions or cfg.max_position_embeddings, device)
    return model, build_model_info(cfg, read_generation_config(model_dir), target_dtype)


def _read_weights(
    model: DecoderForCausalLM, files: list[str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    fused = model.fused_parts()  # module prefix -> MergedLinear
    # checkpoint projection name -> (fused parameter name, first row, rows)
    routes: dict[str, tuple[str, int, int]] = {}
    for prefix, mod in fused.items():
        parent = prefix.rsplit(".", 1)[0]
        for part, _ in mod.parts:
            start, rows = mod.part_rows(part)
            for p in ("weight", "bias"):
                if f"{prefix}.{p}" in expected:
                    routes[f"{parent}.{part}.{p}"] = (f"{prefix}.{p}", start, rows)
    state: dict[str, torch.Tensor] = {}
    loaded_parts: set[str] = set()
    unexpected: list[str] = []
    tied = model.config.tie_word_embeddings
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue  # a tied checkpoint may still store the head; it equals the embedding
                if name in routes:
                    target, start, rows = routes[name]
                    tensor = f.get_tensor(name)
                    _check_shape(name, tuple(tensor.shape), (rows, *expected[target][1:]), path)
                    if target not in state:  # the fused tensor, allocated once at its final size
                        state[target] = torch.empty(expected[target], dtype=dtype, device=device)
                    state[target][start : start + rows].copy_(tensor)
                    loaded_parts.add(name)
                elif name in expected:
                    tensor = f.get_tensor(name)
                    _check_shape(name, tuple(tensor.shape), expected[name], path)
                    state[name] = tensor.to(device=device, dtype=dtype)
                else:
                    unexpected.append(name)
    fused_targets = {dst for dst, _, _ in routes.values()}
    missing = [n for n in expected if n not in state and n not in fused_targets]
    missing += sorted(src for src in routes if src not in loaded_parts)
    if missing or unexpected:
        raise ValueError(_mismatch_message(missing, unexpected, model.config))
    return state


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], path: str) -> None:
    if got != want:
        raise ValueError(
            f"checkpoint tensor {name!r} in {os.path.basename(path)} has shape {list(got)}, "
            f"but the model config implies {list(want)}; the checkpoint and config.json disagree"
        )


def _mismatch_message(missing: list[str], unexpected: list[str], cfg: ModelConfig) -> str:
    parts = [f"checkpoint does not match the {cfg.architecture} model built from config.json:"]
    if missing:
        parts.append(f"missing tensors ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        parts.append(
            f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}"
            + (" ..." if len(unexpected) > 10 else "")
        )
    return " ".join(parts)
