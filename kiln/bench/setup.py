"""What every benchmark does first: resolve the model, read its config, settle device, dtype and peaks."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from kiln.bench.presets import resolve_model
from kiln.bench.report import card_name
from kiln.bench.roofline import DevicePeaks, ModelCost, device_peaks
from kiln.builder.model_config import read_hf_config


@dataclass
class BenchModel:
    spec: str  # what the user passed: a directory or preset:NAME
    path: str
    preset: str | None
    config: dict[str, Any]
    device: str
    dtype: str  # resolved: bfloat16 / float16 / float32
    cost: ModelCost
    peaks: DevicePeaks

    @property
    def name(self) -> str:
        return self.preset or os.path.basename(os.path.normpath(self.path))

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.config.get("max_position_embeddings") or 2048)

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": self.name,
            "spec": self.spec,
            "path": self.path,
            "preset": self.preset,
            "architecture": (c.get("architectures") or ["?"])[0],
            "dtype": self.dtype,
            "parameters": self.cost.dense_params
            + self.cost.embed_params
            + (self.cost.lm_head_params if not c.get("tie_word_embeddings") else 0),
            "weight_bytes_per_step": self.cost.step_weight_bytes,
            "kv_bytes_per_token": self.cost.kv_bytes_per_token,
            "layers": c.get("num_hidden_layers"),
            "hidden_size": c.get("hidden_size"),
            "heads": [c.get("num_attention_heads"), c.get("num_key_value_heads")],
            "vocab_size": c.get("vocab_size"),
        }


def resolve_dtype(dtype: str, config: dict[str, Any], device: str) -> str:
    """kiln's rule: "auto" is the checkpoint's dtype on a GPU and float32 on the CPU."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")


def prepare_model(
    spec: str,
    dtype: str = "auto",
    device: str | None = None,
    preset_cache: str | None = None,
    roofline: str = "auto",
    hbm_bandwidth: float | None = None,
    peak_flops: float | None = None,
) -> BenchModel:
    if spec is None:
        raise ValueError("--model is required: a model directory or preset:NAME")
    from kiln.engine_args import resolve_device

    device = resolve_device(device)  # a missing GPU is named now, not inside a preset's draw or the engine
    # A preset's weights are stored in the dtype it will run in, so nothing is converted at load.
    preset_dtype = None if dtype == "auto" or not device.startswith("cuda") else dtype
    path, preset = resolve_model(spec, preset_cache, device=device, dtype=preset_dtype)
    if preset is not None:
        print(f"kiln bench: preset {preset} at {path}", file=sys.stderr, flush=True)
    config = read_hf_config(path)  # names the file when it is missing or not valid JSON
    resolved = resolve_dtype(dtype, config, device)
    cost = ModelCost.from_config(config, resolved)
    peaks = device_peaks(roofline, card_name(device), hbm_bandwidth, peak_flops)
    return BenchModel(spec, path, preset, config, device, resolved, cost, peaks)


def roofline_summary(model: BenchModel, bound: float, unit: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "bound": bound,
        "bound_unit": unit,
        "hbm_bytes_per_s": model.peaks.hbm_bytes_per_s,
        "flops_per_s": model.peaks.flops_per_s,
        "peaks_source": model.peaks.source,
        **extra,
    }
