"""Model definitions and the checkpoint loader vs transformers, on tiny random models (CPU, fp32)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import hf_logits, load_hf_model, make_tiny_model

from kiln.builder.loader import load_model, read_model_info
from kiln.builder.model_config import parse_rope, resolve_dtype
from kiln.engine.attention_metadata import AttentionMetadata
from kiln.engine.kv_cache import KvCache, KvCacheSpec
from kiln.layers.rotary import build_cos_sin_cache
from kiln.models.registry import supported_architectures

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (architecture, config overrides); shared with test_model_engine.py
ARCH_CASES: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("LlamaForCausalLM", {}),
    "llama_tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama_mha": ("LlamaForCausalLM", {"num_key_value_heads": 4}),
    "llama_rope_llama3": ("LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE}),
    "llama_rope_linear": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama_head_dim_bias": (
        "LlamaForCausalLM",
        {"head_dim": 32, "attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1},
    ),
    "mistral_sliding": ("MistralForCausalLM", {"sliding_window": 6}),
    "qwen2_bias": ("Qwen2ForCausalLM", {}),
    "qwen2_yarn": (
        "Qwen2ForCausalLM",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    ),
    "qwen3_qk_norm": ("Qwen3ForCausalLM", {"head_dim": 24}),
    "qwen3_sliding_layers": (
        "Qwen3ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    ),
}

PROMPT = torch.randint(0, 320, (37,), generator=torch.Generator().manual_seed(7)).tolist()


def run_single_prefill(model, token_ids: list[int], block_size: int = 8) -> torch.Tensor:
    """Logits [T, V] of every position of one sequence computed in one prefill through the paged cache."""
    cfg = model.config
    num_tokens = len(token_ids)
    num_blocks = -(-num_tokens // block_size)
    spec = KvCacheSpec(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, next(model.parameters()).dtype
    )
    cache = KvCache(spec, num_blocks + 1, torch.device("cpu"))
    # blocks in reverse order, so a wrong block lookup cannot pass by accident
    blocks = torch.arange(num_blocks, 0, -1, dtype=torch.int32)
    positions = torch.arange(num_tokens)
    attn = AttentionMetadata(
        slot_mapping=blocks[positions // block_size].long() * block_size + positions % block_size,
        block_tables=blocks[None, :],
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        num_decode_seqs=0,
        num_decode_tokens=0,
    )
    with torch.no_grad():
        hidden = model(torch.tensor(token_ids), positions, attn, cache.layers)
        return model.compute_logits(hidden)


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_prefill_logits_match_transformers(tiny_model, case):
    arch, overrides = ARCH_CASES[case]
    path = tiny_model(arch, **overrides)
    model, info = load_model(path, dtype="float32", max_positions=64)
    assert info.architecture == arch
    ours = run_single_prefill(model, PROMPT)
    ref = hf_logits(path, PROMPT)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (len(PROMPT), 320)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_windows_and_biases_matter(tiny_model):
    """The flags the cases above exercise change the result (so matching transformers means something)."""
    hf = load_hf_model(tiny_model("MistralForCausalLM", sliding_window=6))
    windowed = hf_logits(hf, PROMPT)
    hf.config.sliding_window = None
    full = hf_logits(hf, PROMPT)
    assert torch.allclose(windowed[:6], full[:6], atol=1e-5)
    assert (windowed[10:] - full[10:]).abs().max() > 1e-2
    model, _ = load_model(tiny_model("Qwen2ForCausalLM"), dtype="float32", max_positions=64)
    with_bias = run_single_prefill(model, PROMPT)
    model.model.layers[0].self_attn.qkv_proj.bias.zero_()
    assert (run_single_prefill(model, PROMPT) - with_bias).abs().max() > 1e-2


def test_dynamic_rope_fixed_table(tiny_model):
    """dynamic NTK: the table is stretched for max_positions, as transformers does for that length;
    within the pre-trained context it is the plain table."""
    path = tiny_model(
        "LlamaForCausalLM", max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    long_prompt = (PROMPT * 2)[:48]
    model, _ = load_model(path, dtype="float32", max_positions=48)
    torch.testing.assert_close(
        run_single_prefill(model, long_prompt), hf_logits(path, long_prompt), atol=1e-4, rtol=1e-4
    )
    model, _ = load_model(path, dtype="float32", max_positions=32)
    torch.testing.assert_close(
        run_single_prefill(model, PROMPT[:30]), hf_logits(path, PROMPT[:30]), atol=1e-4, rtol=1e-4
    )
    stretched = build_cos_sin_cache(
        parse_rope({"rope_scaling": {"type": "dynamic", "factor": 2.0}}), 16, 32, 48
    )
    plain = build_cos_sin_cache(parse_rope({}), 16, 32, 48)
    assert (stretched - plain).abs().max() > 1e-3


def test_rope_config_formats():
    old = parse_rope({"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (old.theta, old.rope_type, old.factor) == (500000.0, "linear", 4.0)
    new = parse_rope({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert (new.theta, new.rope_type) == (1e6, "default")
    with pytest.raises(ValueError, match="supported"):
        build_cos_sin_cache(parse_rope({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}), 16, 32, 8)


# ---------------------------------------------------------------- loader


def test_sharded_checkpoint(tiny_model):
    path = tiny_model("Qwen3ForCausalLM", head_dim=24, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    model, _ = load_model(path, dtype="float32", max_positions=64)
    torch.testing.assert_close(
        run_single_prefill(model, PROMPT), hf_logits(path, PROMPT), atol=1e-4, rtol=1e-4
    )


def test_bf16_checkpoint_loads_as_float32(tiny_model):
    path = tiny_model("LlamaForCausalLM", dtype="bfloat16")
    info = read_model_info(path)
    assert info.dtype == torch.float32  # "auto" on the CPU
    model, info = load_model(path, dtype="auto", max_positions=64)
    assert info.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    ckpt = load_file(os.path.join(path, "model.safetensors"))
    assert ckpt["model.norm.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(model.model.norm.weight, ckpt["model.norm.weight"].float(), atol=0, rtol=0)
    torch.testing.assert_close(
        run_single_prefill(model, PROMPT), hf_logits(path, PROMPT), atol=1e-4, rtol=1e-4
    )


def test_fp32_checkpoint_loads_as_bfloat16(tiny_model):
    path = tiny_model("Qwen2ForCausalLM")
    model, info = load_model(path, dtype="bfloat16", max_positions=64)
    assert info.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    ckpt = load_file(os.path.join(path, "model.safetensors"))
    qkv = model.model.layers[1].self_attn.qkv_proj
    q_rows = ckpt["model.layers.1.self_attn.q_proj.weight"].shape[0]
    k_rows = ckpt["model.layers.1.self_attn.k_proj.weight"].shape[0]
    torch.testing.assert_close(
        qkv.weight[q_rows : q_rows + k_rows],
        ckpt["model.layers.1.self_attn.k_proj.weight"].bfloat16(),
        atol=0,
        rtol=0,
    )
    torch.testing.assert_close(
        qkv.bias[-k_rows:], ckpt["model.layers.1.self_attn.v_proj.bias"].bfloat16(), atol=0, rtol=0
    )
    ours = run_single_prefill(model, PROMPT)
    ref = hf_logits(path, PROMPT, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16  # logits in the model dtype; consumers upcast exactly
    ours = ours.float()
    assert (ours - ref).abs().max() < 0.25 and (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_resolve_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert resolve_dtype("auto", torch.bfloat16, cpu) == torch.float32
    assert resolve_dtype("float16", torch.float32, cpu) == torch.float16
    assert resolve_dtype(torch.bfloat16, torch.float32, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="'auto', 'float32', 'bfloat16' or 'float16'"):
        resolve_dtype("int8", torch.float32, cpu)


def _copy(path: str, tmp_path, name: str) -> str:
    dst = os.path.join(tmp_path, name)
    shutil.copytree(path, dst)
    return dst


def _edit_weights(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(path: str, **values) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(values)
    with open(file, "w") as f:
        json.dump(cfg, f)


def test_missing_and_unexpected_tensors(tiny_model, tmp_path):
    base = tiny_model("LlamaForCausalLM")
    missing = _copy(base, tmp_path, "missing")
    _edit_weights(
        missing, lambda t: (t.pop("model.layers.1.self_attn.k_proj.weight"), t.pop("model.norm.weight"))
    )
    with pytest.raises(ValueError, match="missing tensors") as err:
        load_model(missing)
    assert "model.layers.1.self_attn.k_proj.weight" in str(err.value) and "model.norm.weight" in str(
        err.value
    )

    extra = _copy(base, tmp_path, "extra")
    _edit_weights(extra, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*mystery"):
        load_model(extra)

    wrong_shape = _copy(base, tmp_path, "wrong_shape")
    _edit_config(wrong_shape, intermediate_size=96)
    with pytest.raises(
        ValueError, match=r"mlp\.\w+_proj\.weight.*has shape \[\d+, \d+\], but the model config implies"
    ):
        load_model(wrong_shape)


def test_tied_checkpoint_with_stored_head(tiny_model, tmp_path):
    path = _copy(tiny_model("LlamaForCausalLM", tie_word_embeddings=True), tmp_path, "tied_with_head")
    _edit_weights(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model, _ = load_model(path, max_positions=64)
    assert model.lm_head.weight is None and model.lm_head.head_weight() is model.model.embed_tokens.weight


def test_unsupported_architecture(tiny_model, tmp_path):
    path = _copy(tiny_model("LlamaForCausalLM"), tmp_path, "gpt2")
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        load_model(path)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(err.value)
    assert set(supported_architectures()) >= {"LlamaForCausalLM", "Qwen3ForCausalLM"}


def test_generation_config_eos_and_defaults(tmp_path):
    path = make_tiny_model(
        tmp_path,
        "Qwen2ForCausalLM",
        eos_token_id=3,
        generation_config={"eos_token_id": [5, 3, 9], "temperature": 0.7, "top_p": 0.8, "top_k": 20},
    )
    info = read_model_info(path)
    assert info.eos_token_ids == (3, 5, 9)
    assert info.generation_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (2, 4, 2, 16)
    assert info.vocab_size == 320 and info.max_position_embeddings == 256
    os.remove(os.path.join(path, "generation_config.json"))
    assert read_model_info(path).eos_token_ids == (3,)


def test_original_weights_beside_hf_files_are_ignored(tiny_model, tmp_path):
    path = _copy(tiny_model("MistralForCausalLM", sliding_window=6), tmp_path, "with_consolidated")
    save_file({"tok_embeddings.weight": torch.zeros(4, 4)}, os.path.join(path, "consolidated.safetensors"))
    model, _ = load_model(path, max_positions=64)
    torch.testing.assert_close(
        run_single_prefill(model, PROMPT), hf_logits(path, PROMPT), atol=1e-4, rtol=1e-4
    )
