"""Checkpoints as users bring them: broken shard indexes, unreadable or non-safetensors weights, config.json
fields kiln cannot run, and config variants whose greedy tokens must equal transformers'."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models import PROMPT, run_single_prefill
from tiny_models import hf_greedy, load_hf_model

from kiln.builder.build import build_engine
from kiln.builder.loader import index_weight_map, load_model
from kiln.cli import main
from kiln.model_files import ModelFiles
from kiln.models.registry import parse_model_config

INDEX = "model.safetensors.index.json"


def _copy(path: str, tmp_path, name: str) -> str:
    dst = os.path.join(tmp_path, name)
    shutil.copytree(path, dst)
    return dst


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _weight_map(path: str) -> dict[str, str]:
    with open(os.path.join(path, INDEX)) as f:
        return json.load(f)["weight_map"]


@pytest.fixture(scope="module")
def sharded(tiny_model) -> str:
    path = tiny_model("LlamaForCausalLM", max_shard_size="40KB")
    assert len(set(_weight_map(path).values())) > 2
    return path


# ---------------------------------------------------------------- sharded checkpoints


def test_index_naming_a_missing_shard_names_it(sharded, tmp_path):
    path = _copy(sharded, tmp_path, "lost_shard")
    shard = sorted(set(_weight_map(path).values()))[0]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=f"{INDEX} lists files that are not in .*{shard}"):
        load_model(path)

    path = _copy(sharded, tmp_path, "unknown_shard")
    _edit_json(
        os.path.join(path, INDEX), lambda d: d["weight_map"].update({"lm_head.weight": "model-x.safetensors"})
    )
    with pytest.raises(FileNotFoundError, match="model-x.safetensors"):
        load_model(path)


def test_tensor_missing_from_its_shard_names_tensor_and_shard(sharded, tmp_path):
    path = _copy(sharded, tmp_path, "lost_tensor")
    shard = _weight_map(path)["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(os.path.join(path, shard))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, os.path.join(path, shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing tensors.*'model.layers.1.mlp.up_proj.weight' in {shard}"):
        load_model(path)


@pytest.mark.parametrize("weight_map", [None, {}, ["model.norm.weight"], {"model.norm.weight": "x.bin"}])
def test_index_without_a_usable_weight_map_is_named(sharded, tmp_path, weight_map):
    path = _copy(sharded, tmp_path, "bad_index")
    _edit_json(os.path.join(path, INDEX), lambda d: d.update(weight_map=weight_map))
    with pytest.raises(ValueError, match=f"{INDEX}.*'weight_map'"):
        load_model(path)


def test_extra_files_beside_an_index_are_ignored(sharded, tmp_path):
    path = _copy(sharded, tmp_path, "extra")
    save_file({"lm_head.weight": torch.zeros(3)}, os.path.join(path, "model-old.safetensors"))
    model, _ = load_model(path, max_positions=64)
    ref, _ = load_model(sharded, max_positions=64)
    torch.testing.assert_close(run_single_prefill(model, PROMPT), run_single_prefill(ref, PROMPT))


def test_a_tensor_stored_twice_is_refused_by_file(sharded, tmp_path):
    # shards and a single-file copy without an index: two sources for every tensor
    path = _copy(sharded, tmp_path, "twice")
    os.remove(os.path.join(path, INDEX))
    save_file({"model.norm.weight": torch.ones(64)}, os.path.join(path, "model.safetensors"))
    shard = _weight_map(sharded)["model.norm.weight"]
    with pytest.raises(ValueError, match=rf"'model.norm.weight' is in both {shard} and model.safetensors"):
        load_model(path)


# ---------------------------------------------------------------- unreadable or unsupported weights


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_unreadable_weight_files_are_one_line_errors(tiny_model, tmp_path, capsys):
    path = _copy(tiny_model("LlamaForCausalLM"), tmp_path, "lfs")
    _write(os.path.join(path, "model.safetensors"), b"version https://git-lfs.github.com/spec/v1\noid x\n")
    with pytest.raises(ValueError, match="Git LFS pointer.*git lfs pull"):
        load_model(path)

    path = _copy(tiny_model("LlamaForCausalLM"), tmp_path, "truncated")
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    _write(file, data[: len(data) // 2])
    capsys.readouterr()  # the model's saving progress
    assert main(["build", path, "--output", str(tmp_path / "engine"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.safetensors is not readable safetensors" in err


def test_pytorch_bin_checkpoint_says_how_to_convert(tiny_model, tmp_path):
    path = _copy(tiny_model("LlamaForCausalLM"), tmp_path, "bin")
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save({}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*safetensors.*save_pretrained"):
        build_engine(path, str(tmp_path / "engine"), device="cpu")


# ---------------------------------------------------------------- config.json


def _config(tiny_model, arch: str = "LlamaForCausalLM") -> dict:
    with open(os.path.join(tiny_model(arch), "config.json")) as f:
        return json.load(f)


BAD_FIELDS = [
    (
        {"num_key_value_heads": 3},
        "num_attention_heads \\(4\\) must be a multiple of num_key_value_heads \\(3\\)",
    ),
    ({"num_key_value_heads": 0}, "'num_key_value_heads' must be an integer >= 1, got 0"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be an integer >= 1"),
    ({"hidden_size": "64"}, "'hidden_size' must be an integer"),
    ({"hidden_size": [64]}, "'hidden_size' must be an integer"),
    ({"num_hidden_layers": -1}, "'num_hidden_layers' must be an integer >= 1"),
    ({"hidden_size": 66, "head_dim": None}, "hidden_size \\(66\\) is not a multiple of num_attention_heads"),
    ({"max_position_embeddings": 0}, "'max_position_embeddings' must be an integer >= 1"),
    ({"rms_norm_eps": "tiny"}, "'rms_norm_eps' must be a positive number"),
    ({"rope_scaling": "linear"}, "'rope_scaling' must be an object"),
    ({"architectures": "LlamaForCausalLM"}, "'architectures' must be a list"),
    ({"eos_token_id": ["</s>"]}, "eos_token_id must be an integer or a list of integers"),
    (
        {"rope_parameters": {"rope_type": "longrope", "factor": 2.0}},
        "rope_parameters: rope type 'longrope'.*yarn",
    ),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters: .*original_max_position"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
]


@pytest.mark.parametrize("values, message", BAD_FIELDS, ids=[str(v) for v, _ in BAD_FIELDS])
def test_bad_config_fields_are_named(tiny_model, values, message):
    with pytest.raises(ValueError, match=message):
        parse_model_config({**_config(tiny_model), **values})


def test_bad_sliding_window_is_named(tiny_model):
    for arch in ("MistralForCausalLM", "Qwen2ForCausalLM"):
        hf = {**_config(tiny_model, arch), "sliding_window": "4k", "use_sliding_window": True}
        with pytest.raises(ValueError, match="'sliding_window' must be an integer >= 0"):
            parse_model_config(hf)


def test_front_end_names_a_bad_context_length():
    files = ModelFiles("m", config={"max_position_embeddings": "4k"})
    with pytest.raises(ValueError, match="'max_position_embeddings' must be an integer >= 1, got '4k'"):
        _ = files.max_position_embeddings
    assert ModelFiles("m", config={}).max_position_embeddings == 2048


def test_unsupported_rope_fails_before_the_build_reads_weights(tiny_model, tmp_path):
    path = _copy(tiny_model("LlamaForCausalLM"), tmp_path, "longrope")
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [1.0] * 8,
    }
    _edit_json(os.path.join(path, "config.json"), lambda d: d.update(rope_parameters=rope))
    with pytest.raises(ValueError, match="rope_parameters: rope type 'longrope' is not supported"):
        build_engine(path, str(tmp_path / "engine"), device="cpu")
    assert not os.path.exists(tmp_path / "engine")


# ---------------------------------------------------------------- variants that load: greedy as transformers


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(run_single_prefill(model, ids)[-1].float().argmax()))
    return ids[len(prompt) :]


GREEDY_CASES = [
    ("Qwen2ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}, "float32", "float32"),
    ("MistralForCausalLM", {"head_dim": 32}, "float32", "float32"),
    ("LlamaForCausalLM", {}, "float16", "float32"),
    ("Qwen2ForCausalLM", {}, "float16", "bfloat16"),
]


@pytest.mark.parametrize("arch, overrides, stored, loaded", GREEDY_CASES)
def test_variants_greedy_tokens_match_transformers(tiny_model, arch, overrides, stored, loaded):
    path = tiny_model(arch, dtype=stored, **overrides)
    dtype = getattr(torch, loaded)
    model, info = load_model(path, dtype=loaded, max_positions=64)
    assert info.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    prompt = PROMPT[:16]
    assert _greedy(model, prompt, 8) == hf_greedy(load_hf_model(path, dtype), prompt, 8)[0]


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, r"rope_scaling field 'factor' must be"),
        ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 8192.5}},
         r"'original_max_position_embeddings' must be an integer"),
        ({"rope_theta": True}, r"field 'rope_theta' must be a number"),
        ({"head_dim": 7}, r"head_dim \(7\) must be even"),
        ({"hidden_act": "gelu"}, r"field 'hidden_act' 'gelu' is not supported; supported: 'silu'"),
    ],
)  # fmt: skip
def test_rope_and_head_fields_are_named_in_their_errors(tiny_model, edit, message):
    hf = json.load(open(os.path.join(tiny_model(), "config.json")))
    hf.pop("rope_parameters", None)
    with pytest.raises(ValueError, match=message):
        parse_model_config({**hf, **edit})


def test_an_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match=r"not safetensors beside the index: \['../elsewhere.safetensors'\]"):
        index_weight_map(str(index))
