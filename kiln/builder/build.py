"""The Builder: a Hugging Face checkpoint directory -> an engine directory (kiln/builder/engine_dir.py).

The weights are converted once, here, exactly as the loader would convert them at start-up
(``loader.runtime_state_dict``: dtype conversion, q|k|v and gate|up fused) and saved as safetensors,
so starting an engine from the directory is a plain read of tensors onto the device.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from safetensors.torch import save_file

import kiln
from kiln.builder.engine_dir import (
    COMPILE_CACHE_FILE,
    FORMAT_VERSION,
    PLAN_FILE,
    EnginePlan,
    device_kind,
    dtype_name,
    environment_versions,
    is_engine_dir,
    model_config_to_json,
)
from kiln.builder.loader import build_meta_model, checkpoint_files, runtime_state_dict
from kiln.builder.model_config import read_hf_config, resolve_dtype
from kiln.config import EngineLimits, KvCacheConfig, check_device_name
from kiln.engine.token_budget import default_max_num_tokens
from kiln.models.registry import parse_model_config
from kiln.plugins import PluginSet

log = logging.getLogger(__name__)

# Shards stay below this size (safetensors files of a few GB load and mmap well everywhere).
MAX_SHARD_BYTES = 4 * 1024**3
# Copied next to the weights so the engine directory is a complete model directory for the front end.
_MODEL_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class BuildResult:
    engine_dir: str
    plan: EnginePlan
    seconds: float


def build_engine(
    model_dir: str,
    output_dir: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    max_batch_size: int = 256,
    max_num_tokens: int | None = None,
    max_seq_len: int | None = None,
    tokens_per_block: int = 32,
    plugins: dict[str, str] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> BuildResult:
    """Build the engine of checkpoint ``model_dir`` into ``output_dir``.

    ``device`` is the kind of device the engine is for ("cpu", "cuda"; default: cuda if present): it
    decides what dtype="auto" means (the checkpoint's dtype on a GPU, float32 on the CPU) and is
    recorded in the plan. The conversion itself runs on the CPU. ``max_num_tokens`` defaults to whole GEMM
    waves of the GPU present (``kiln/engine/token_budget.py``: 8,448 on an H100), else 8,192.
    """
    t0 = time.perf_counter()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # only the name is checked: an engine may be built for a GPU on a machine without one
    target = torch.device(check_device_name(device))
    if not os.path.isdir(model_dir):
        raise ValueError(f"model {model_dir!r} is not a directory; pass a Hugging Face checkpoint directory")
    if is_engine_dir(model_dir):
        raise ValueError(
            f"{model_dir!r} is already an engine directory (it has {PLAN_FILE}); load it with LLM"
        )
    if os.path.realpath(model_dir) == os.path.realpath(output_dir):
        raise ValueError("--output must be a new directory, not the checkpoint directory itself")
    cfg = parse_model_config(read_hf_config(model_dir))
    weights_dtype = resolve_dtype(dtype, cfg.checkpoint_dtype, target)
    if max_seq_len is None:
        max_seq_len = cfg.max_position_embeddings
    elif max_seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"max_seq_len ({max_seq_len}) exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    if max_num_tokens is None:
        max_num_tokens = default_max_num_tokens(target, max_batch_size)
    limits = EngineLimits(
        max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len
    )
    KvCacheConfig(tokens_per_block=tokens_per_block)  # validates it
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    # validates the names; the plan records the target's choice (a GPU's defaults include its fused kernels)
    chosen = PluginSet("forward" if target.type == "cuda" else "reference", plugins).choice
    files = checkpoint_files(model_dir)
    _prepare_output(output_dir, overwrite)

    model = build_meta_model(cfg)
    state = runtime_state_dict(model, files, weights_dtype, torch.device("cpu"))
    weight_files = _save_shards(state, output_dir, max_shard_bytes)
    copied = _copy_model_files(model_dir, output_dir)
    plan = EnginePlan(
        format_version=FORMAT_VERSION,
        kiln_version=kiln.__version__,
        build_date=datetime.now(UTC).isoformat(timespec="seconds"),
        source=os.path.abspath(model_dir),
        architecture=cfg.architecture,
        model_config=model_config_to_json(cfg),
        dtype=dtype_name(weights_dtype),
        max_batch_size=limits.max_batch_size,
        max_num_tokens=limits.max_num_tokens,
        max_seq_len=limits.max_seq_len,
        tokens_per_block=tokens_per_block,
        plugins={kind: name for kind, (name, _) in chosen.items()},
        weight_files=weight_files,
        weight_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        num_tensors=len(state),
        copied_files=copied,
        versions=environment_versions(),
        device=device_kind(target),
    )
    plan.save(output_dir)  # last: a build that stopped half-way leaves no plan.json
    return BuildResult(output_dir, plan, time.perf_counter() - t0)


def _prepare_output(output_dir: str, overwrite: bool) -> None:
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not overwrite:
            raise ValueError(
                f"output directory {output_dir!r} is not empty; pass --overwrite to replace an engine there"
            )
        if not is_engine_dir(output_dir):
            raise ValueError(
                f"output directory {output_dir!r} is not empty and holds no engine; refusing to overwrite"
            )
        # the plan goes first, so a failed rebuild never leaves a plan that names other weights
        os.unlink(os.path.join(output_dir, PLAN_FILE))
        stale = glob.glob(os.path.join(output_dir, "rank*.safetensors"))
        for path in [*stale, os.path.join(output_dir, COMPILE_CACHE_FILE)]:
            if os.path.exists(path):
                os.unlink(path)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output {output_dir!r} exists and is not a directory; pass a new or empty one")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:  # a missing or read-only parent: say which directory could not be made
        raise ValueError(f"cannot create the output directory {output_dir!r}: {e.strerror or e}") from e


def _save_shards(state: dict[str, torch.Tensor], output_dir: str, max_shard_bytes: int) -> dict[str, int]:
    """Save ``state`` as rank0.safetensors, or as shards below ``max_shard_bytes`` each (a tensor larger
    than the limit gets a shard of its own). Returns file name -> file size, in order."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    n = len(shards)
    names = (
        ["rank0.safetensors"] if n == 1 else [f"rank0-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    out: dict[str, int] = {}
    for name, shard in zip(names, shards, strict=True):
        path = os.path.join(output_dir, name)
        save_file(shard, path, metadata={"format": "pt", "kiln_format_version": str(FORMAT_VERSION)})
        out[name] = os.path.getsize(path)
    return out


def _copy_model_files(model_dir: str, output_dir: str) -> list[str]:
    copied = []
    for name in (*_MODEL_FILES, *_TOKENIZER_FILES):
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(output_dir, name))
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied and "vocab.json" not in copied:
        log.warning("%s has no tokenizer files; LLM on the engine will need tokenizer=...", model_dir)
    return copied
