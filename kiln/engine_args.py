"""Engine arguments: every LLM(...) argument validated and resolved into one EngineCoreConfig.

A built engine directory (plan.json) supplies the defaults of the limits, dtype, KV block size and
plugins, and refuses limits above the built ones; a checkpoint gets the plain defaults.
"""

from __future__ import annotations

import os

from kiln.config import EngineLimits, KvCacheConfig, SchedulerConfig, check_device_name
from kiln.engine.token_budget import BASE_TOKENS
from kiln.executor.engine_core import EngineCoreConfig
from kiln.model_files import ModelFiles


def resolve_engine_config(
    model: str,
    files: ModelFiles,
    *,
    dtype: str,
    device: str | None,
    max_batch_size: int | None,
    max_num_tokens: int | None,
    max_seq_len: int | None,
    kv_cache_config: KvCacheConfig | None,
    scheduler_config: SchedulerConfig | None,
    seed: int,
    plugins: dict[str, str] | None,
    plugin_backend: str | None,
    executor: str,
    cuda_graphs: bool,
    piecewise_graphs: bool,
    compile: bool | None,
    overlap_scheduling: bool | None,
) -> tuple[EngineCoreConfig, bool]:
    """The worker's configuration and whether it runs in its own process; ValueError naming any bad value."""
    _check_type("kv_cache_config", kv_cache_config, KvCacheConfig)
    _check_type("scheduler_config", scheduler_config, SchedulerConfig)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None (on CUDA only), got {compile!r}")
    for name, flag in (("cuda_graphs", cuda_graphs), ("piecewise_graphs", piecewise_graphs)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if plugins is not None and not isinstance(plugins, dict):
        raise ValueError(f"plugins must be a dict of plugin kind -> plugin name, got {plugins!r}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    # checked before any comparison, so '8' or 2.5 is named here and not deep in the engine
    _check_limit("max_batch_size", max_batch_size, 1)
    _check_limit("max_num_tokens", max_num_tokens, 1)
    _check_limit("max_seq_len", max_seq_len, 2)
    device = resolve_device(device)
    if overlap_scheduling is not None and not isinstance(overlap_scheduling, bool):
        raise ValueError(
            f"overlap_scheduling must be True, False or None (on CUDA only), got {overlap_scheduling!r}"
        )
    overlap = device.startswith("cuda") if overlap_scheduling is None else overlap_scheduling
    if executor not in ("auto", "thread", "process"):
        raise ValueError(f"executor must be 'auto', 'thread' or 'process', got {executor!r}")
    if max_seq_len is not None and max_seq_len > files.max_position_embeddings:
        raise ValueError(
            f"max_seq_len ({max_seq_len}) exceeds the model's max_position_embeddings "
            f"({files.max_position_embeddings})"
        )
    plan_plugins = None
    if os.path.isfile(os.path.join(model, "plan.json")):  # a built engine: defaults and ceilings
        from kiln.builder.engine_dir import EnginePlan  # imports torch: only for an engine

        plan = EnginePlan.load(model)
        limits = plan.check_limits(max_batch_size, max_num_tokens, max_seq_len)
        if limits.max_seq_len > files.max_position_embeddings:  # an edited plan: kiln build refuses it
            raise ValueError(
                f"{os.path.join(model, 'plan.json')}: max_seq_len ({limits.max_seq_len}) exceeds the "
                f"model's max_position_embeddings ({files.max_position_embeddings}); rebuild the engine"
            )
        plan.resolve_dtype(dtype)
        dtype = plan.dtype
        kv_cache_config = kv_cache_config or KvCacheConfig(tokens_per_block=plan.tokens_per_block)
        if kv_cache_config.tokens_per_block != plan.tokens_per_block:
            raise ValueError(
                f"kv_cache_config.tokens_per_block ({kv_cache_config.tokens_per_block}) differs from the "
                f"engine's ({plan.tokens_per_block}); use {plan.tokens_per_block} or rebuild with "
                "kiln build --tokens-per-block"
            )
        plan_plugins = plan.plugins
        plugins = plan_plugins if plugins is None else plugins
        budget_from_device = False  # the plan's budget, chosen when it was built
    else:
        budget_from_device = max_num_tokens is None
        batch = 256 if max_batch_size is None else max_batch_size
        limits = EngineLimits(
            max_batch_size=batch,
            # no budget given: 8,192 stands in until the engine picks its card's (engine/token_budget.py)
            max_num_tokens=max(BASE_TOKENS, batch) if max_num_tokens is None else max_num_tokens,
            max_seq_len=files.max_position_embeddings if max_seq_len is None else max_seq_len,
        )
    if plugins:  # names and kinds checked here, before any engine is built
        from kiln.plugins import PluginSet

        try:
            PluginSet("reference", plugins)
        except ValueError as e:
            if plan_plugins is None or plugins is not plan_plugins:
                raise
            raise ValueError(f"{os.path.join(model, 'plan.json')}: {e}; rebuild the engine") from None
    cfg = EngineCoreConfig(
        model=model,
        dtype=dtype,
        device=device,
        limits=limits,
        kv_config=kv_cache_config or KvCacheConfig(),
        scheduler_config=scheduler_config or SchedulerConfig(),
        seed=seed,
        plugin_backend=plugin_backend or ("forward" if device.startswith("cuda") else "reference"),
        plugins=plugins,
        cuda_graphs=cuda_graphs,
        piecewise_graphs=piecewise_graphs,
        compile=compile,
        overlap_scheduling=overlap,
        budget_from_device=budget_from_device,
    )
    use_process = executor == "process" or (executor == "auto" and device.startswith("cuda"))
    return cfg, use_process


def _check_type(name: str, value: object, cls: type) -> None:
    if value is not None and not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__name__} (or None for the defaults), got {value!r}")


def _check_limit(name: str, value: object, minimum: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ValueError(f"{name} must be an int >= {minimum} (or None for the default), got {value!r}")


def resolve_device(device: object) -> str:
    """The device to run on: ``device`` checked to be present, or cuda when present, else cpu.

    A missing GPU is reported here, before a worker starts and fails inside torch."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = check_device_name(device)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} was requested but CUDA is not available "
                "(torch.cuda.is_available() is False); use device='cpu'"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} was requested but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return name
