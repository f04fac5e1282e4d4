"""The Builder and the engine directory: kiln build -> plan.json + prebuilt weights -> LLM(DIR)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import pytest
import torch

from kiln import LLM, KvCacheConfig, SamplingParams
from kiln.builder import loader
from kiln.builder.build import build_engine
from kiln.builder.engine_dir import (
    COMPILE_CACHE_FILE,
    ENGINE_DIR_ATTR,
    PLAN_FILE,
    EnginePlan,
    EnginePlanError,
)
from kiln.builder.loader import load_model, read_model_info
from kiln.cli import main as cli_main
from kiln.engine import compile as compile_mod
from kiln.layers.linear import MergedLinear

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8, logprobs=4)
SMALL = dict(max_batch_size=8, max_num_tokens=128, max_seq_len=128)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def _run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[dict[int, float]]]]:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory) -> tuple[str, str]:
    """(checkpoint, engine directory) of a tiny Llama, built once for the read-only tests."""
    src = tiny_model("LlamaForCausalLM", tokenizer=True)
    out = str(tmp_path_factory.mktemp("engines") / "llama")
    build_engine(src, out, device="cpu", **SMALL)
    return src, out


@pytest.fixture
def engine_copy(engine, tmp_path) -> str:
    """A private copy of the module's engine directory, free to break."""
    dst = str(tmp_path / "copy")
    shutil.copytree(engine[1], dst)
    return dst


ARCHS = [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    ("Qwen2ForCausalLM", {}),  # q/k/v biases
    ("Qwen3ForCausalLM", {"head_dim": 32}),  # q/k norms
]


@pytest.mark.parametrize("arch, overrides", ARCHS, ids=["llama", "llama-tied", "qwen2", "qwen3"])
def test_engine_gives_the_checkpoint_outputs(tiny_model, tmp_path, arch, overrides):
    src = tiny_model(arch, tokenizer=True, **overrides)
    out = str(tmp_path / "engine")
    # Qwen2 goes through shards to cover a multi-file engine
    shard = 40_000 if arch == "Qwen2ForCausalLM" else None
    result = build_engine(src, out, device="cpu", **SMALL, **({"max_shard_bytes": shard} if shard else {}))
    plan = EnginePlan.load(out)
    assert plan == result.plan and plan.architecture == arch and plan.dtype == "float32"
    assert (len(plan.weight_files) > 1) == (shard is not None)
    prompts = _prompts(4, seed=len(arch))
    with LLM(src, **SMALL) as ref_llm:
        ref = _run(ref_llm, prompts)
        ref_text = ref_llm.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0].text
    with LLM(out) as llm:
        assert _run(llm, prompts) == ref  # tokens and logprobs, exactly
        assert llm.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0].text == ref_text


def test_bfloat16_build_matches_bfloat16_load(tiny_model, tmp_path):
    src = tiny_model("Qwen3ForCausalLM", tokenizer=True, head_dim=32)  # a float32 checkpoint
    out = str(tmp_path / "bf16")
    plan = build_engine(src, out, dtype="bfloat16", device="cpu", **SMALL).plan
    assert plan.dtype == "bfloat16"
    assert plan.weight_bytes == sum(
        t.numel() * 2 for t in load_model(src, max_positions=8)[0].state_dict().values()
    )
    model, info = load_model(out, max_positions=8)
    assert info.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert read_model_info(out).dtype == torch.bfloat16
    prompts = _prompts(3, seed=7)
    with LLM(src, dtype="bfloat16", **SMALL) as ref_llm:
        ref = _run(ref_llm, prompts)
    with LLM(out, dtype="bfloat16") as llm:
        assert llm.engine_info["dtype"] == "bfloat16"
        assert _run(llm, prompts) == ref
    with pytest.raises(ValueError, match=r"built for bfloat16.*kiln build --dtype float32"):
        LLM(out, dtype="float32")


def test_loading_an_engine_does_no_conversion(engine, monkeypatch):
    src, out = engine

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint conversion ran while loading an engine")

    calls = {"part_rows": 0}
    part_rows = MergedLinear.part_rows

    def counting(self, part):
        calls["part_rows"] += 1
        return part_rows(self, part)

    monkeypatch.setattr(loader, "runtime_state_dict", forbidden)
    monkeypatch.setattr(MergedLinear, "part_rows", counting)
    model, _ = load_model(out, max_positions=16)
    assert getattr(model, ENGINE_DIR_ATTR) == os.path.abspath(out)
    with LLM(out) as llm:
        assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8
    assert calls["part_rows"] == 0
    with pytest.raises(AssertionError, match="conversion ran"):  # the checkpoint path does convert
        load_model(src, max_positions=16)


def test_limits_come_from_the_plan_and_cap_overrides(engine):
    _, out = engine
    with LLM(out) as llm:
        assert (llm.limits.max_batch_size, llm.limits.max_num_tokens, llm.limits.max_seq_len) == (8, 128, 128)
        assert llm.max_seq_len == 128
    with LLM(out, max_batch_size=4, max_num_tokens=64, max_seq_len=64) as llm:
        assert (llm.limits.max_batch_size, llm.limits.max_num_tokens, llm.limits.max_seq_len) == (4, 64, 64)
    for name, value in (("max_batch_size", 512), ("max_num_tokens", 129), ("max_seq_len", 200)):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(
            ValueError, match=f"{name} {value} exceeds the engine's built limit .*{flag} {value}"
        ):
            LLM(out, **{name: value})


def test_plan_defaults_for_kv_blocks_and_plugins(tiny_model, tmp_path):
    src = tiny_model("LlamaForCausalLM", tokenizer=True)
    out = str(tmp_path / "e16")
    plan = build_engine(src, out, device="cpu", tokens_per_block=16, **SMALL).plan
    assert plan.tokens_per_block == 16 and plan.plugins["attention"] == "paged_attention_sdpa"
    with LLM(out) as llm:  # 80 shared tokens: 5 blocks of 16 reused (blocks of 32 would reuse 64)
        shared = list(range(1, 81))
        llm.generate(shared + [5], GREEDY, use_tqdm=False)
        second = llm.generate(shared + [6], GREEDY, use_tqdm=False)[0]
        assert second.num_cached_tokens == 80
    with pytest.raises(ValueError, match=r"tokens_per_block \(32\) differs from the engine's \(16\)"):
        LLM(out, kv_cache_config=KvCacheConfig(tokens_per_block=32))
    with pytest.raises(ValueError, match="tokens_per_block must be one of"):
        build_engine(src, str(tmp_path / "bad"), device="cpu", tokens_per_block=12)
    with pytest.raises(ValueError, match="max_seq_len .* exceeds the model's max_position_embeddings"):
        build_engine(src, str(tmp_path / "bad"), device="cpu", max_seq_len=10_000)
    assert not os.path.exists(str(tmp_path / "bad"))  # nothing written for a refused build


def _edit_plan(engine_dir: str, **changes) -> None:
    path = os.path.join(engine_dir, PLAN_FILE)
    with open(path) as f:
        data = json.load(f)
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    with open(path, "w") as f:
        json.dump(data, f)


def test_broken_engine_directories_fail_clearly(engine, tmp_path):
    d = str(tmp_path / "broken")
    plan_path = os.path.join(d, PLAN_FILE)
    weights = os.path.join(d, "rank0.safetensors")
    cases = [
        (lambda: _truncate_half(plan_path), r"corrupted \(not valid JSON"),
        (lambda: _edit_plan(d, format_version=99), r"format version 99, which this kiln does not read"),
        (lambda: _edit_plan(d, dtype=None), r"lacks the fields \['dtype'\]"),
        (lambda: _edit_plan(d, max_batch_size="8"), r"field 'max_batch_size' must be int"),
        (lambda: _edit_plan(d, dtype="int4"), r"plan dtype 'int4' is not one of"),
        (lambda: _edit_plan(d, extra=1), r"unknown fields \['extra'\]"),
        (lambda: os.unlink(weights), r"rank0.safetensors is missing"),
        (lambda: os.truncate(weights, 1000), r"rank0.safetensors has 1000 bytes, the plan says"),
        (lambda: os.unlink(os.path.join(d, "tokenizer.json")), r"tokenizer.json is missing"),
    ]
    for breaks, message in cases:
        shutil.copytree(engine[1], d)
        breaks()
        with pytest.raises(EnginePlanError, match=message) as err:
            EnginePlan.load(d)
        assert "rebuild" in str(err.value)
        with pytest.raises(ValueError, match=message):  # LLM refuses it before starting anything
            LLM(d)
        shutil.rmtree(d)


def test_an_edited_plan_beyond_the_model_or_with_unknown_plugins_names_the_plan(engine_copy):
    d = engine_copy
    _edit_plan(d, max_seq_len=1_000_000)
    with pytest.raises(ValueError, match=r"plan.json: max_seq_len \(1000000\) exceeds the model.*rebuild"):
        LLM(d)
    _edit_plan(d, max_seq_len=SMALL["max_seq_len"], plugins={"attention": "nosuch"})
    with pytest.raises(ValueError, match=r"plan.json: no plugin named 'nosuch'.*; rebuild the engine"):
        LLM(d)
    with pytest.raises(ValueError, match=r"no plugin named 'nosuch2'") as err:  # the caller's own choice
        LLM(d, plugins={"attention": "nosuch2"})
    assert "plan.json" not in str(err.value)


def _truncate_half(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def test_edited_config_and_foreign_weights_are_refused(engine_copy, tiny_model):
    d = engine_copy
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "rms_norm_eps": 1e-3}, open(cfg_path, "w"))
    with pytest.raises(EnginePlanError, match="config.json .* no longer matches .* rebuild"):
        load_model(d)
    json.dump(cfg, open(cfg_path, "w"))
    # weights of another model, with the file size the plan records
    other = build_engine(tiny_model("Qwen2ForCausalLM"), d + "-other", device="cpu", **SMALL)
    shutil.copyfile(os.path.join(other.engine_dir, "rank0.safetensors"), os.path.join(d, "rank0.safetensors"))
    _edit_plan(d, weight_files={"rank0.safetensors": os.path.getsize(os.path.join(d, "rank0.safetensors"))})
    with pytest.raises(EnginePlanError, match="do not match the LlamaForCausalLM model .* unexpected"):
        load_model(d)


def _damage(path: str, at: int = 256) -> None:
    """Overwrite 64 bytes of a safetensors file's data (past its header) with 0xFF: NaNs, size kept."""
    with open(path, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header + at)
        f.write(b"\xff" * 64)


def test_damaged_weights_of_the_right_size_are_refused_by_name(engine_copy, tiny_model, tmp_path):
    # a shard whose size the plan (or nothing) checks, with damaged bytes: a clear error naming the
    # tensor, where it used to load and decode its NaN logits as EOS
    _damage(os.path.join(engine_copy, "rank0.safetensors"))
    named = r"NaN or infinite values in \['[a-z_.0-9]+'\]; rebuild the engine"
    with pytest.raises(EnginePlanError, match=named):
        load_model(engine_copy)
    with pytest.raises(ValueError, match=r"NaN or infinite values .* rebuild the engine"):
        LLM(engine_copy)
    checkpoint = str(tmp_path / "checkpoint")
    shutil.copytree(tiny_model(), checkpoint)
    (shard,) = [f for f in os.listdir(checkpoint) if f.endswith(".safetensors")]
    _damage(os.path.join(checkpoint, shard))
    with pytest.raises(ValueError, match=r"NaN or infinite values in .*the checkpoint is damaged"):
        load_model(checkpoint)


def test_finiteness_check_finds_nan_and_both_infinities_and_skips_integer_tensors():
    late = torch.zeros(50)
    late[-1] = float("inf")
    state = {"ok": torch.ones(3, 5), "late": late, "ids": torch.arange(4), "empty": torch.empty(0),
             "nan": torch.tensor([[1.0, float("nan")]], dtype=torch.bfloat16),
             "low": torch.tensor([float("-inf"), 0.0], dtype=torch.float16),
             "scalar": torch.tensor(2.0), "wide": torch.tensor([1e300], dtype=torch.float64)}  # fmt: skip
    assert loader.non_finite_tensors(state) == ["late", "nan", "low"]  # 1e300 is finite in float64
    assert loader.non_finite_tensors({"ids": torch.arange(3)}) == []


def test_build_refuses_bad_outputs(engine, tmp_path):
    src, out = engine
    with pytest.raises(ValueError, match="already an engine directory"):
        build_engine(out, str(tmp_path / "x"), device="cpu")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        build_engine(src, out, device="cpu")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no engine; refusing"):
        build_engine(src, str(junk), device="cpu", overwrite=True)
    with pytest.raises(ValueError, match="not the checkpoint directory"):
        build_engine(src, src, device="cpu")


def test_plan_for_another_device_still_loads(tiny_model, tmp_path, caplog):
    src = tiny_model("LlamaForCausalLM", tokenizer=True, dtype="bfloat16")
    out = str(tmp_path / "gpu")
    plan = build_engine(src, out, device="cuda", **SMALL).plan  # auto on a GPU: the checkpoint's dtype
    assert plan.dtype == "bfloat16" and plan.device != "cpu"
    with caplog.at_level(logging.WARNING, logger="kiln.builder.loader"):
        model, info = load_model(out, device="cpu", max_positions=16)
    assert info.dtype == torch.bfloat16
    assert any(
        "was built for" in r.getMessage() and "loaded on cpu" in r.getMessage() for r in caplog.records
    )


def test_kiln_build_cli(tiny_model, tmp_path, capsys):
    src = tiny_model("Qwen2ForCausalLM", tokenizer=True)
    out = str(tmp_path / "cli")
    with pytest.raises(SystemExit) as done:
        cli_main(["build", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--output",
        "--dtype",
        "--max-batch-size",
        "--max-num-tokens",
        "--max-seq-len",
        "--tokens-per-block",
    ):
        assert flag in help_text
    args = ["build", src, "--output", out, "--dtype", "bfloat16", "--device", "cpu", "--max-batch-size", "4",
            "--max-num-tokens", "64", "--max-seq-len", "96", "--tokens-per-block", "16"]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert f"from {os.path.abspath(src)}" in printed and "dtype      bfloat16" in printed
    assert "max_batch_size=4 max_num_tokens=64 max_seq_len=96 tokens_per_block=16" in printed
    assert "MiB in rank0.safetensors" in printed and " s\n" in printed
    plan = EnginePlan.load(out)
    limits = (plan.max_batch_size, plan.max_num_tokens, plan.max_seq_len, plan.tokens_per_block)
    assert plan.dtype == "bfloat16" and limits == (4, 64, 96, 16)
    assert cli_main(args) == 2 and "not empty; pass --overwrite" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert cli_main(["generate", "--model", out, "hello", "--max-tokens", "4", "--temperature", "0"]) == 0
    assert "(length, 4 tokens)" in capsys.readouterr().out
    assert cli_main(["generate", "--model", out, "hi", "--max-batch-size", "16"]) == 2
    assert "exceeds the engine's built limit 4" in capsys.readouterr().err


def test_compile_cache_is_cuda_only_and_never_breaks_start_up(engine_copy, monkeypatch, caplog):
    d = engine_copy
    model, _ = load_model(d, max_positions=16)
    assert compile_mod._compile_cache_path(model, torch.device("cpu")) is None  # a no-op on the CPU
    path = compile_mod._compile_cache_path(model, torch.device("cuda"))
    assert path == os.path.join(os.path.abspath(d), COMPILE_CACHE_FILE)
    # the CUDA side, without a GPU: the device name and torch.compiler's artifacts stand in
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    compile_mod._save_compile_cache(path, torch.device("cuda", 0))
    assert open(path, "rb").read() == b"artifacts"
    made_with = EnginePlan.load(d).compile_cache
    assert (
        made_with is not None
        and made_with["device"] == "Test GPU"
        and made_with["torch"] == torch.__version__
    )
    compile_mod._load_compile_cache(path, torch.device("cuda", 0))
    assert loaded == [b"artifacts"]
    # made elsewhere: skipped
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Other GPU")
    compile_mod._load_compile_cache(path, torch.device("cuda", 0))
    assert loaded == [b"artifacts"]

    # a cache torch cannot read: logged, start-up goes on
    def bad(data: bytes) -> None:
        raise RuntimeError("incompatible artifacts")

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", bad)
    with caplog.at_level(logging.WARNING, logger="kiln.engine.compile"):
        compile_mod._load_compile_cache(path, torch.device("cuda", 0))
    assert any("ignoring the compile cache" in r.getMessage() for r in caplog.records)
    assert EnginePlan.load(d).compile_cache == made_with  # the engine stays loadable


def test_serve_takes_an_engines_limits_and_block_size(tiny_model, tmp_path):
    import argparse

    from kiln.serve.cli_args import add_serve_arguments
    from kiln.serve.server import _build_engine

    src = tiny_model("LlamaForCausalLM", tokenizer=True)
    out = str(tmp_path / "served")
    build_engine(src, out, device="cpu", tokens_per_block=16, **SMALL)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    llm = _build_engine(parser.parse_args([out, "--device", "cpu"]))
    try:
        assert llm.limits.max_batch_size == SMALL["max_batch_size"]
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].finished
    finally:
        llm.shutdown()
