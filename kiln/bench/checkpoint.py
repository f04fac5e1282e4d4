"""Random Hugging Face checkpoints: the tensor layout of a config, random weights, a byte tokenizer.

The tensor names and shapes are those of the published checkpoints of each architecture, so the
directory loads in kiln and in ``transformers`` alike. Weights are drawn on the target device (a GPU
draws 8B parameters in well under a second) and written shard by shard.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
SHARD_BYTES = 4 << 30


def _arch(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"random checkpoints support the architectures {', '.join(SUPPORTED_ARCHITECTURES)}; "
            f"got {archs!r}"
        )
    return str(archs[0])


def head_dim_of(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def weight_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the HF checkpoint of ``config``, in checkpoint order: (name, shape)."""
    arch = _arch(config)
    h, inter, v = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["vocab_size"])
    nh = int(config["num_attention_heads"])
    nkv = int(config.get("num_key_value_heads") or nh)
    hd = head_dim_of(config)
    attn_bias = bool(config.get("attention_bias", False))
    qkv_bias = arch == "Qwen2ForCausalLM" or attn_bias
    o_bias = attn_bias and arch != "Qwen2ForCausalLM"
    mlp_bias = bool(config.get("mlp_bias", False))
    qk_norm = arch == "Qwen3ForCausalLM"
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (h,)))
        for proj, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            out.append((p + f"self_attn.{proj}.weight", (rows, h)))
            if qkv_bias:
                out.append((p + f"self_attn.{proj}.bias", (rows,)))
        out.append((p + "self_attn.o_proj.weight", (h, nh * hd)))
        if o_bias:
            out.append((p + "self_attn.o_proj.bias", (h,)))
        if qk_norm:
            out += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            out.append((p + f"mlp.{proj}.weight", shape))
            if mlp_bias:
                out.append((p + f"mlp.{proj}.bias", (shape[0],)))
        out.append((p + "post_attention_layernorm.weight", (h,)))
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h)))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def num_parameters(config: dict[str, Any]) -> int:
    return sum(_numel(s) for _, s in weight_shapes(config))


def checkpoint_bytes(config: dict[str, Any], dtype: str) -> int:
    return num_parameters(config) * _DTYPE_BYTES[dtype]


def _shard_plan(
    shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(shapes):
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_random_checkpoint(
    out_dir: str,
    config: dict[str, Any],
    dtype: str = "bfloat16",
    device: str | None = None,
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    verbose: bool = False,
) -> list[str]:
    """Write random safetensors shards (+ index when more than one) for ``config``; returns the file names.

    Norm weights are ones and everything else N(0, 0.02²): activations stay finite through any
    number of layers, so sampling sees proper distributions.
    """
    import torch
    from safetensors.torch import save_file

    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    tdtype = getattr(torch, dtype)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=dev).manual_seed(seed)
    shapes = weight_shapes(config)
    plan = _shard_plan(shapes, _DTYPE_BYTES[dtype], shard_bytes)
    names = (
        ["model.safetensors"]
        if len(plan) == 1
        else [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    )
    weight_map: dict[str, str] = {}
    t0 = time.perf_counter()
    for fname, idx in zip(names, plan, strict=True):
        tensors = {}
        for i in idx:
            name, shape = shapes[i]
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=tdtype, device=dev)
            else:
                t = torch.randn(shape, generator=gen, dtype=tdtype, device=dev).mul_(0.02)
            tensors[name] = t.cpu()
            weight_map[name] = fname
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del tensors
        if verbose and len(plan) > 1:
            print(f"  wrote {fname} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": checkpoint_bytes(config, dtype)},
            "weight_map": weight_map,
        }
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # give the drawing memory back before an engine sizes its KV pool
    return names


def byte_to_char() -> list[str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2's convention).

    Printable Latin-1 bytes map to themselves; the others, in order, to code points from 256 up.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _letters(k: int) -> str:
    """k > 0 in base 26 with digits a-z."""
    out = ""
    while k:
        k, r = divmod(k, 26)
        out = chr(ord("a") + r) + out
    return out


def write_byte_tokenizer(
    out_dir: str,
    special_tokens: dict[str, int],
    bos_token: str | None,
    eos_token: str | None,
    model_max_length: int,
    vocab_size: int | None = None,
) -> None:
    """A byte-level tokenizer: the 256 bytes at the lowest ids not taken by special tokens, and the
    special tokens at the model's own ids (so EOS / BOS ids agree with config.json).

    With ``vocab_size``, every other id below it becomes a word-like token (" ab", " xyz": a space and
    two to four letters, no merges lead to it), so whatever a random model generates decodes to text
    of a real tokenizer's length and a server streams and detokenizes it as it would a real model's.
    Without it, ids the tokenizer does not know decode to nothing. Text still encodes byte by byte.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    taken = set(special_tokens.values())
    ids = [i for i in range(256 + len(taken)) if i not in taken][:256]
    vocab = {ch: i for ch, i in zip(byte_to_char(), ids, strict=True)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    data = json.loads(tok.to_str())
    if vocab_size is not None:
        used = taken | set(ids)
        words = iter(range(26, 26**5))  # distinct k, distinct words: k in base 26 has no leading 'a'
        space = byte_to_char()[ord(" ")]
        for tid in range(vocab_size):
            if tid not in used:
                data["model"]["vocab"][space + _letters(next(words))] = tid
    # Special tokens sit in the model vocabulary too, so their (sparse) ids are kept as written.
    for content, tid in special_tokens.items():
        data["model"]["vocab"][content] = tid
    data["added_tokens"] = [
        {
            "id": tid,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for content, tid in sorted(special_tokens.items(), key=lambda kv: kv[1])
    ]
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(data, f, ensure_ascii=False)
    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if bos_token:
        tcfg["bos_token"] = bos_token
    if eos_token:
        tcfg["eos_token"] = eos_token
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
