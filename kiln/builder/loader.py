"""Load a Hugging Face checkpoint (one or many safetensors files), or a built engine, into a kiln model.

The model is built on the meta device, so no memory is spent on random initial weights. From a
checkpoint, ``runtime_state_dict`` reads tensors one at a time from the safetensors files, converts
them to the target dtype and device, and either keeps them as they are or copies them into their
slice of a fused projection (q|k|v, gate|up), which is allocated once at its final size.
``load_state_dict(assign=True)`` finally installs the tensors as the parameters: the weights exist
once in memory, plus one checkpoint tensor in flight.

``runtime_state_dict`` is the one place a checkpoint becomes the runtime's tensors: the Builder
(kiln/builder/build.py) saves its result, and an engine directory (plan.json) is then loaded as it
is, with no conversion or fusing (``load_engine_model``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from safetensors import safe_open

from kiln.builder.engine_dir import (
    ENGINE_DIR_ATTR,
    EnginePlan,
    EnginePlanError,
    device_kind,
    is_engine_dir,
    model_config_to_json,
)
from kiln.builder.model_config import (
    ModelConfig,
    ModelInfo,
    build_model_info,
    read_generation_config,
    read_hf_config,
    read_json,
    resolve_dtype,
)
from kiln.models.decoder import DecoderForCausalLM
from kiln.models.registry import get_model_spec, parse_model_config
from kiln.plugins import PluginSet

log = logging.getLogger(__name__)

# Checkpoint tensors that carry no weights kiln needs (RoPE tables are recomputed).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


INDEX_FILE = "model.safetensors.index.json"
# Weights kiln cannot read, named in the error when a checkpoint has no safetensors.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint: from model.safetensors.index.json when present."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        files = sorted(set(index_weight_map(index).values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise FileNotFoundError(f"{index} lists files that are not in {model_dir!r}: {missing}")
        return [os.path.join(model_dir, f) for f in files]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    # Some repositories also ship the original weights (e.g. consolidated.safetensors) beside HF's.
    hf_named = [f for f in files if f.startswith("model")]
    files = hf_named or files
    if not files:
        other = sorted(f for f in os.listdir(model_dir) if f.endswith(_OTHER_WEIGHTS))
        found = f" (it has {other[:3]})" if other else ""
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir!r}{found}; kiln loads safetensors checkpoints only. "
            "Convert the checkpoint with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR) writes safetensors; copy the tokenizer files beside them"
        )
    return [os.path.join(model_dir, f) for f in files]


def index_weight_map(index: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a safetensors index."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' object naming the shard of each tensor")
    bad = [
        f
        for f in weight_map.values()
        if not isinstance(f, str) or not f.endswith(".safetensors") or os.path.basename(f) != f
    ]
    if bad:
        raise ValueError(
            f"{index}: 'weight_map' names files that are not safetensors beside the index: "
            f"{sorted(set(map(str, bad)))[:5]}"
        )
    return weight_map


def load_model_config(model_dir: str) -> ModelConfig:
    return parse_model_config(read_hf_config(model_dir))


def read_model_info(model_dir: str, dtype: str | torch.dtype = "auto", device: str = "cpu") -> ModelInfo:
    """ModelInfo without loading any weight (for a front end that needs EOS ids or the context length)."""
    cfg = load_model_config(model_dir)
    if is_engine_dir(model_dir):
        target_dtype = EnginePlan.load(model_dir).resolve_dtype(dtype)
    else:
        target_dtype = resolve_dtype(dtype, cfg.checkpoint_dtype, torch.device(device))
    return build_model_info(cfg, read_generation_config(model_dir), target_dtype)


def build_meta_model(cfg: ModelConfig, plugins: PluginSet | None = None) -> DecoderForCausalLM:
    """The model of ``cfg`` with every parameter on the meta device (shapes only, no memory)."""
    spec = get_model_spec(cfg.architecture)
    with torch.device("meta"):
        return spec.model_cls(cfg, plugins or PluginSet("reference"))


def load_model(
    model_dir: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    plugins: PluginSet | None = None,
    max_positions: int | None = None,
) -> tuple[DecoderForCausalLM, ModelInfo]:
    """Build the model of ``model_dir`` with its weights on ``device`` in ``dtype``.

    ``model_dir`` is a Hugging Face checkpoint or an engine directory built by ``kiln build`` (it has
    a plan.json), whose prebuilt weights are loaded as they are. ``max_positions`` sizes the RoPE
    table (default: max_position_embeddings).
    """
    if is_engine_dir(model_dir):
        return load_engine_model(model_dir, dtype=dtype, device=device, plugins=plugins,
                                 max_positions=max_positions)  # fmt: skip
    device = torch.device(device)
    cfg = parse_model_config(read_hf_config(model_dir))
    target_dtype = resolve_dtype(dtype, cfg.checkpoint_dtype, device)
    model = build_meta_model(cfg, plugins)
    state = runtime_state_dict(model, checkpoint_files(model_dir), target_dtype, device)
    return _install(model, state, model_dir, target_dtype, device, max_positions)


def load_engine_model(
    engine_dir: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    plugins: PluginSet | None = None,
    max_positions: int | None = None,
) -> tuple[DecoderForCausalLM, ModelInfo]:
    """Load an engine directory: its weights are already converted and fused, so they are read
    straight onto ``device`` and assigned to a meta-device model (no copy, no conversion)."""
    from safetensors.torch import load_file

    device = torch.device(device)
    plan = EnginePlan.load(engine_dir)
    target_dtype = plan.resolve_dtype(dtype)
    cfg = parse_model_config(read_hf_config(engine_dir))
    if model_config_to_json(cfg) != plan.model_config:
        raise EnginePlanError(
            f"config.json in {engine_dir!r} no longer matches the model config the engine was built "
            f"from (plan.json); rebuild the engine with `kiln build {plan.source} --output {engine_dir}`"
        )
    here = device_kind(device)
    if here != plan.device and not (plan.device == "cuda" and device.type == "cuda"):
        log.warning("engine %s was built for %s and is loaded on %s", engine_dir, plan.device, here)
    model = build_meta_model(cfg, plugins)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name in plan.weight_files:
        path = os.path.join(engine_dir, name)
        try:
            part = load_file(path, device=str(device))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which one
            raise EnginePlanError(f"cannot read engine weights {path}: {e}; rebuild the engine") from e
        state.update(part)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{n}: {list(t.shape)} {t.dtype}"
        for n, t in state.items()
        if n in expected and (tuple(t.shape) != expected[n] or t.dtype != target_dtype)
    ]
    if missing or unexpected or wrong:
        raise EnginePlanError(
            f"engine weights in {engine_dir!r} do not match the {cfg.architecture} model of its plan "
            f"({plan.dtype}): missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape or dtype "
            f"{wrong[:5]}; rebuild the engine"
        )
    # read by the compile step (kiln/engine/compile.py): where the compile cache lives
    setattr(model, ENGINE_DIR_ATTR, os.path.abspath(engine_dir))
    return _install(model, state, engine_dir, target_dtype, device, max_positions)


def _install(
    model: DecoderForCausalLM,
    state: dict[str, torch.Tensor],
    model_dir: str,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int | None,
) -> tuple[DecoderForCausalLM, ModelInfo]:
    cfg = model.config
    bad = non_finite_tensors(state)
    if bad:
        where = f"{bad[:5]}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        message = f"weights in {model_dir!r} hold NaN or infinite values in {where}"
        if is_engine_dir(model_dir):
            raise EnginePlanError(f"{message}; rebuild the engine")
        raise ValueError(f"{message}; the checkpoint is damaged: fetch it again")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.materialize_rope(max_positions or cfg.max_position_embeddings, device)
    return model, build_model_info(cfg, read_generation_config(model_dir), dtype)


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors holding a NaN or an infinity: damaged bytes of a shard whose size
    is right (a trained model's weights are finite). A tensor's min and max carry any NaN or infinity
    it holds: one reduction a tensor on its device, no temporary, one read back at the end (isfinite
    would make a boolean copy, and runs ~45x slower on the CPU)."""
    names, ends = [], []
    for name, t in state.items():
        if t.is_floating_point() and t.numel() > 0:
            lo, hi = torch.aminmax(t)
            names.append(name)
            ends.append(torch.stack([lo.double(), hi.double()]))  # exact for every float dtype
    if not ends:
        return []
    finite = torch.stack(ends).isfinite().all(dim=1).tolist()  # the state lives on one device
    return [n for n, ok in zip(names, finite, strict=True) if not ok]


def runtime_state_dict(
    model: DecoderForCausalLM, files: list[str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """The checkpoint ``files`` as the runtime parameters of ``model`` (a meta-device model, for its
    names and shapes): converted to ``dtype`` on ``device``, q|k|v and gate|up fused."""
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
    seen: dict[str, str] = {}  # tensor name -> the file it came from
    tied = model.config.tie_word_embeddings
    for path in files:
        with _open_safetensors(path) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in seen:  # e.g. a stale single-file copy beside the shards: which one is right?
                    raise ValueError(
                        f"checkpoint tensor {name!r} is in both {os.path.basename(seen[name])} and "
                        f"{os.path.basename(path)}; remove the file that does not belong to the checkpoint"
                    )
                seen[name] = path
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue  # a tied checkpoint may still store the head; it equals the embedding
                if name in routes:
                    target, start, rows = routes[name]
                    tensor = _read_tensor(f, name, path)
                    _check_shape(name, tuple(tensor.shape), (rows, *expected[target][1:]), path)
                    if target not in state:  # the fused tensor, allocated once at its final size
                        state[target] = torch.empty(expected[target], dtype=dtype, device=device)
                    state[target][start : start + rows].copy_(tensor)
                    loaded_parts.add(name)
                elif name in expected:
                    tensor = _read_tensor(f, name, path)
                    _check_shape(name, tuple(tensor.shape), expected[name], path)
                    state[name] = tensor.to(device=device, dtype=dtype)
                else:
                    unexpected.append(name)
    fused_targets = {dst for dst, _, _ in routes.values()}
    missing = [n for n in expected if n not in state and n not in fused_targets]
    missing += sorted(src for src in routes if src not in loaded_parts)
    if missing or unexpected:
        raise ValueError(_mismatch_message(missing, unexpected, model.config) + _index_note(missing, files))
    return state


def _open_safetensors(path: str) -> Any:
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError is no ValueError: name the file
        with open(path, "rb") as raw:
            lfs = raw.read(64).startswith(b"version https://git-lfs")
        if lfs:  # a clone without git-lfs holds small text pointers in place of the weights
            raise ValueError(
                f"checkpoint file {path} is a Git LFS pointer; fetch the weights with `git lfs pull`"
            ) from e
        raise ValueError(
            f"checkpoint file {path} is not readable safetensors ({e}); fetch the checkpoint again"
        ) from e


def _read_tensor(f: Any, name: str, path: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - a truncated file fails here, as SafetensorError
        raise ValueError(
            f"cannot read tensor {name!r} from {path} ({e}); the file is damaged: fetch the checkpoint again"
        ) from e


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], path: str) -> None:
    if got != want:
        raise ValueError(
            f"checkpoint tensor {name!r} in {os.path.basename(path)} has shape {list(got)}, "
            f"but the model config implies {list(want)}; the checkpoint and config.json disagree"
        )


def _index_note(missing: list[str], files: list[str]) -> str:
    """Where the checkpoint's index says missing tensors are (a shard that lost them, or a wrong index)."""
    index = os.path.join(os.path.dirname(files[0]), INDEX_FILE) if files else ""
    if not missing or not os.path.isfile(index):
        return ""
    weight_map = index_weight_map(index)
    listed = {n: weight_map[n] for n in missing[:10] if n in weight_map}
    if not listed:
        return f"; {INDEX_FILE} does not list them either"
    where = ", ".join(f"{n!r} in {f}" for n, f in listed.items())
    return f"; {INDEX_FILE} lists {where}, but the tensors are not there"


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
