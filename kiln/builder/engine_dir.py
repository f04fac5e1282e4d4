"""The engine directory: what ``kiln build`` writes once and ``LLM(DIR)`` loads many times.

Layout (docs/builder.md)::

    DIR/plan.json               EnginePlan: versions, source, model config, dtype, limits, plugins, files
    DIR/rank0.safetensors       the runtime weights, converted and fused (or rank0-0000i-of-0000n.* shards)
    DIR/config.json, generation_config.json, tokenizer files   copied from the checkpoint
    DIR/compile_cache.bin       torch.compile artifacts, written by the first compiling start-up (CUDA)

``EnginePlan.load`` validates the whole directory (format version, fields and types, the files it
lists and their sizes) so that a broken engine fails at start-up with a message that says what to
rebuild, never later inside the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from kiln.builder.model_config import ModelConfig
from kiln.config import EngineLimits

PLAN_FILE = "plan.json"
COMPILE_CACHE_FILE = "compile_cache.bin"
# Bumped whenever a reader of an older kiln could misread the directory.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
# Attribute set on a model loaded from an engine directory: the directory (for the compile cache).
ENGINE_DIR_ATTR = "kiln_engine_dir"

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


class EnginePlanError(ValueError):
    """An engine directory that cannot be used as it is; the message says what to rebuild."""


def is_engine_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PLAN_FILE))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def model_config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    """``cfg`` as plain JSON values (tuples as lists, the dtype by name), comparable with a loaded plan."""
    out = dataclasses.asdict(cfg)
    out["checkpoint_dtype"] = dtype_name(cfg.checkpoint_dtype)
    return json.loads(json.dumps(out))


def environment_versions() -> dict[str, str]:
    """Versions of what shapes the weights and the compiled code: recorded at build time."""
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "none"
    return versions


def device_kind(device: torch.device) -> str:
    """ "cpu", or the GPU's name (what a plan or a compile cache was built for)."""
    if device.type == "cpu":
        return "cpu"
    # an engine may be built for a GPU on a machine without one: then only the kind is known
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else device.type


# field -> the JSON type(s) it must have in plan.json
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "kiln_version": (str,),
    "build_date": (str,),
    "source": (str,),
    "architecture": (str,),
    "model_config": (dict,),
    "dtype": (str,),
    "max_batch_size": (int,),
    "max_num_tokens": (int,),
    "max_seq_len": (int,),
    "tokens_per_block": (int,),
    "plugins": (dict,),
    "weight_files": (dict,),
    "weight_bytes": (int,),
    "num_tensors": (int,),
    "copied_files": (list,),
    "versions": (dict,),
    "device": (str,),
    "compile_cache": (dict, type(None)),
}


@dataclass(frozen=True)
class EnginePlan:
    """Everything ``plan.json`` records about a built engine."""

    format_version: int
    kiln_version: str
    build_date: str  # ISO 8601, UTC
    source: str  # the checkpoint directory it was built from
    architecture: str
    model_config: dict[str, Any]  # model_config_to_json of the ModelConfig it was built from
    dtype: str  # the weights' dtype: float32 | bfloat16 | float16
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    tokens_per_block: int
    plugins: dict[str, str]  # plugin kind -> plugin name
    weight_files: dict[str, int]  # file name -> size in bytes, in load order
    weight_bytes: int  # bytes of tensor data (all files)
    num_tensors: int
    copied_files: list[str]  # config, generation config, tokenizer files
    versions: dict[str, str]  # torch, transformers, triton at build time
    device: str  # "cpu" or the GPU name it was built on
    # What compile_cache.bin was made with ({"torch", "triton", "device", "created"}); None: no cache yet.
    compile_cache: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_NAMES:
            raise EnginePlanError(f"plan dtype {self.dtype!r} is not one of {_DTYPE_NAMES}")
        try:
            self.limits()
        except ValueError as e:
            raise EnginePlanError(f"plan limits are invalid: {e}") from e
        if self.tokens_per_block not in (8, 16, 32, 64, 128):
            raise EnginePlanError(
                f"plan tokens_per_block must be 8, 16, 32, 64 or 128, got {self.tokens_per_block}"
            )
        if not self.weight_files:
            raise EnginePlanError("plan lists no weight files")

    # ------------------------------------------------------------------ limits and dtype

    def limits(self) -> EngineLimits:
        return EngineLimits(self.max_batch_size, self.max_num_tokens, self.max_seq_len)

    def check_limits(
        self, max_batch_size: int | None, max_num_tokens: int | None, max_seq_len: int | None
    ) -> EngineLimits:
        """The run-time limits: the plan's, or smaller ones asked for; larger ones are refused."""
        asked = {
            "max_batch_size": max_batch_size,
            "max_num_tokens": max_num_tokens,
            "max_seq_len": max_seq_len,
        }
        chosen: dict[str, int] = {}
        for name, value in asked.items():
            built = getattr(self, name)
            if value is not None and value > built:
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{name} {value} exceeds the engine's built limit {built}; "
                    f"rebuild with kiln build {flag} {value} (or pass {name} <= {built})"
                )
            chosen[name] = built if value is None else value
        return EngineLimits(**chosen)

    def resolve_dtype(self, dtype: str | torch.dtype) -> torch.dtype:
        """The plan's dtype; ``dtype`` must be "auto" or the same one (weights are stored converted)."""
        name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
        if name not in ("auto", self.dtype):
            raise ValueError(
                f"dtype {name!r} does not match the engine, which was built for {self.dtype}; "
                f"pass dtype='auto' or {self.dtype!r}, or rebuild with kiln build --dtype {name}"
            )
        return getattr(torch, self.dtype)

    # ------------------------------------------------------------------ files

    def save(self, engine_dir: str) -> None:
        """Write plan.json atomically (a reader sees the old plan or the new one, never half of one)."""
        os.makedirs(engine_dir, exist_ok=True)
        data = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".json", dir=engine_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, os.path.join(engine_dir, PLAN_FILE))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, engine_dir: str) -> EnginePlan:
        """Read and validate plan.json and the files it lists."""
        path = os.path.join(engine_dir, PLAN_FILE)
        if not os.path.isfile(path):
            raise EnginePlanError(
                f"no {PLAN_FILE} in {engine_dir!r}: not an engine directory (build one with kiln build)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EnginePlanError(
                f"{path} is corrupted (not valid JSON: {e}); rebuild the engine with kiln build"
            ) from e
        if not isinstance(data, dict):
            raise EnginePlanError(f"{path} must hold a JSON object; rebuild the engine with kiln build")
        version = data.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise EnginePlanError(
                f"{path} has format version {version!r}, which this kiln does not read (it reads "
                f"{list(SUPPORTED_FORMAT_VERSIONS)}); rebuild the engine with this kiln's `kiln build`"
            )
        missing = [k for k in _FIELD_TYPES if k not in data and k != "compile_cache"]
        if missing:
            raise EnginePlanError(f"{path} lacks the fields {missing}; rebuild the engine with kiln build")
        for key, types in _FIELD_TYPES.items():
            value = data.get(key)
            bad_bool = isinstance(value, bool) and int in types
            if not isinstance(value, types) or bad_bool:
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise EnginePlanError(
                    f"{path}: field {key!r} must be {want}, got {value!r}; rebuild the engine with kiln build"
                )
        unknown = sorted(set(data) - set(_FIELD_TYPES))
        if unknown:
            raise EnginePlanError(f"{path} has unknown fields {unknown}; rebuild the engine with kiln build")
        try:
            plan = cls(**data)
        except EnginePlanError as e:
            raise EnginePlanError(f"{path}: {e}; rebuild the engine with kiln build") from e
        plan.check_files(engine_dir)
        return plan

    def check_files(self, engine_dir: str) -> None:
        """Every file the plan lists is present; weight files have the size they were written with."""
        problems = []
        for name in self.copied_files:
            if not os.path.isfile(os.path.join(engine_dir, name)):
                problems.append(f"{name} is missing")
        for name, size in self.weight_files.items():
            path = os.path.join(engine_dir, name)
            if not os.path.isfile(path):
                problems.append(f"{name} is missing")
            elif os.path.getsize(path) != size:
                problems.append(
                    f"{name} has {os.path.getsize(path)} bytes, the plan says {size} (truncated?)"
                )
        if problems:
            raise EnginePlanError(
                f"engine directory {engine_dir!r} is incomplete: {'; '.join(problems)}; "
                f"rebuild it with `kiln build {self.source} --output {engine_dir}`"
            )
