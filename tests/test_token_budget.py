"""The default token budget: whole GEMM waves of the GPU (kiln/engine/token_budget.py), chosen by
`kiln build` beside the card and by the engine's own process for `LLM` on a checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.builder.build import build_engine
from kiln.engine.token_budget import default_max_num_tokens, whole_wave_budget
from kiln.executor import engine_core


@pytest.mark.parametrize(
    ("sm_count", "budget"),
    [(132, 8448), (114, 7296), (108, 6912), (78, 9984), (170, 10880), (1, 8192), (200, 12800)],
)
def test_whole_waves_near_8192(sm_count, budget):
    assert whole_wave_budget(sm_count) == budget
    assert budget % (64 * sm_count) == 0  # half a 128-row tile an SM: whole waves of row tiles


def _fake_gpu(monkeypatch, sm_count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = SimpleNamespace(multi_processor_count=sm_count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)


def test_a_gpu_gets_whole_waves_never_below_the_batch(monkeypatch):
    _fake_gpu(monkeypatch, 132)
    assert default_max_num_tokens(torch.device("cuda")) == 8448
    assert default_max_num_tokens(torch.device("cuda:0"), max_batch_size=8448) == 8448
    assert default_max_num_tokens(torch.device("cuda"), max_batch_size=9000) == 2 * 8448  # whole waves still


def test_without_a_gpu_8192(monkeypatch):
    assert default_max_num_tokens(torch.device("cpu")) == 8192
    assert default_max_num_tokens(torch.device("cpu"), max_batch_size=10_000) == 10_000
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # built for CUDA on a machine without one
    assert default_max_num_tokens(torch.device("cuda")) == 8192
    with pytest.raises(ValueError, match="sm_count must be >= 1"):
        whole_wave_budget(0)


def test_build_records_the_budget(tiny_model, tmp_path):
    src = tiny_model("LlamaForCausalLM", tokenizer=True)
    assert build_engine(src, str(tmp_path / "e"), device="cpu", max_seq_len=128).plan.max_num_tokens == 8192
    given = build_engine(src, str(tmp_path / "g"), device="cpu", max_seq_len=128, max_num_tokens=300).plan
    assert given.max_num_tokens == 300


def test_llm_on_a_checkpoint_takes_the_engines_budget(tiny_model, monkeypatch):
    """Without max_num_tokens the engine picks the budget in its own process and the front end learns
    it; a given one is kept."""
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with LLM(path, max_batch_size=4, max_seq_len=64, executor="thread") as llm:
        assert llm.limits.max_num_tokens == llm.engine_info["max_num_tokens"] == 8192
    picked = []
    monkeypatch.setattr(engine_core, "default_max_num_tokens", lambda dev, batch: picked.append(batch) or 96)
    with LLM(path, max_batch_size=4, max_seq_len=64, executor="thread") as llm:
        assert picked == [4] and llm.limits.max_num_tokens == 96
        assert ", 96 tokens a step; ready in " in llm.startup_summary()
        assert llm._executor._core.scheduler.limits.max_num_tokens == 96
        prompts = [list(range(1, 61)), list(range(1, 51))]  # 110 prompt tokens: two steps at 96
        out = llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    with LLM(path, max_batch_size=4, max_num_tokens=64, max_seq_len=64, executor="thread") as llm:
        assert llm.limits.max_num_tokens == 64 and len(picked) == 1
