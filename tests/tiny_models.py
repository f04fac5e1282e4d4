"""Tiny random Hugging Face models of the supported architectures, saved like real checkpoints.

``make_tiny_model(tmp_path, "LlamaForCausalLM", num_key_value_heads=4)`` writes config.json,
generation_config.json and safetensors into a fresh directory under ``tmp_path`` and returns its
path. Weights are drawn so that logits are far from uniform (weights ~ N(0, 1/fan_in), norm weights
around 1, non-zero biases), which makes comparisons with transformers meaningful.
``hf_logits(path, token_ids)`` is the transformers reference for one sequence.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import torch

# Small shapes shared by every architecture; GQA (4 query heads, 2 KV heads) unless overridden.
COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=0,
    tie_word_embeddings=False,
)

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_counter = itertools.count()


def tiny_config(arch: str, **overrides: Any):
    """A transformers config object of ``arch`` with tiny shapes; ``overrides`` replace any field."""
    from transformers import AutoConfig

    if arch not in MODEL_TYPES:
        raise ValueError(f"no tiny config for {arch!r}; known: {sorted(MODEL_TYPES)}")
    fields = {**COMMON, **overrides}
    if arch == "MistralForCausalLM":
        fields.setdefault("sliding_window", None)
    cfg = AutoConfig.for_model(MODEL_TYPES[arch], **fields)
    cfg.architectures = [arch]
    return cfg


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), 1-D norm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def make_tiny_model(
    tmp_path: str | os.PathLike,
    arch: str = "LlamaForCausalLM",
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    generation_config: dict[str, Any] | None = None,
    tokenizer: bool = False,
    name: str | None = None,
    **overrides: Any,
) -> str:
    """Save a tiny random ``arch`` model under ``tmp_path`` and return its directory.

    ``dtype`` is the checkpoint dtype; ``max_shard_size`` (e.g. "20KB") makes a sharded checkpoint
    with model.safetensors.index.json; ``generation_config`` entries are merged into
    generation_config.json; ``tokenizer=True`` also saves the tiny byte-level tokenizer of
    tests/tiny_tokenizer.py (its ids fit the default vocab_size).
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed)
    if cfg.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model = model.to(_DTYPES[dtype])
    path = os.path.join(os.fspath(tmp_path), name or f"{MODEL_TYPES[arch]}-{os.getpid()}-{next(_counter)}")
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    _patch_json(os.path.join(path, "config.json"), {"torch_dtype": dtype, "dtype": dtype})
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **(generation_config or {})}
    _patch_json(os.path.join(path, "generation_config.json"), gen)
    if tokenizer:
        from tiny_tokenizer import save_tiny_tokenizer  # tests/ is on sys.path under pytest

        size = save_tiny_tokenizer(path)
        assert size <= cfg.vocab_size, f"tokenizer has {size} ids but vocab_size is {cfg.vocab_size}"
    return path


def _patch_json(path: str, values: dict[str, Any]) -> None:
    data: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data.update(values)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def load_hf_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


@torch.no_grad()
def hf_logits(path_or_model: Any, token_ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' float32 logits [len(token_ids), V] for one sequence (one forward, no cache)."""
    model = load_hf_model(path_or_model, dtype) if isinstance(path_or_model, str) else path_or_model
    out = model(torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation of ``prompt`` (EOS not special: one full forward per token)
    and the float32 log-softmax at each generated position (on the CPU)."""
    ids, toks, lps = list(prompt), [], []
    device = next(model.parameters()).device
    for _ in range(n):
        logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0, -1].float()
        lps.append(torch.log_softmax(logits, -1).cpu())
        toks.append(int(logits.argmax()))
        ids.append(toks[-1])
    return toks, lps
