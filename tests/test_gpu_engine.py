"""The engine on a GPU: Triton plugins, CUDA graphs, worker process, against transformers.

Run on the GPU machine through scripts/gpu_check.sh (pytest -m gpu); skipped without CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import hf_greedy, load_hf_model

from kiln import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GREEDY = dict(temperature=0.0, ignore_eos=True)
# The Triton attention kernel takes head dims 32/64/96/128/256: hidden 128 over 4 heads.
SHAPE = dict(hidden_size=128, intermediate_size=256)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(1, 90))] for _ in range(n)]


def _llm(path: str, **kw) -> LLM:
    kw.setdefault("max_batch_size", 16)
    kw.setdefault("max_num_tokens", 256)
    kw.setdefault("max_seq_len", 256)
    kw.setdefault("device", "cuda")
    return LLM(path, **kw)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM"])
def test_fp32_greedy_identical_to_transformers_with_graphs(tiny_model, arch):
    path = tiny_model(arch, tokenizer=True, **SHAPE)
    hf = load_hf_model(path).cuda()
    prompts = _prompts(12, seed=7)
    with _llm(path, dtype="float32", executor="process") as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)[0]


def test_graphs_and_eager_give_same_tokens_bf16(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True, **SHAPE)
    prompts = _prompts(20, seed=8)
    sp = SamplingParams(max_tokens=16, **GREEDY)
    with _llm(path, dtype="bfloat16", cuda_graphs=False, executor="process") as eager:
        ref = [o.outputs[0].token_ids for o in eager.generate(prompts, sp, use_tqdm=False)]
    with _llm(path, dtype="bfloat16", executor="process") as graphed:
        assert graphed.engine_info["cuda_graph_capture_seconds"] > 0
        got = [o.outputs[0].token_ids for o in graphed.generate(prompts, sp, use_tqdm=False)]
    assert got == ref


def test_bf16_top1_or_top5_agreement(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True, **SHAPE)
    hf = load_hf_model(path, dtype=torch.bfloat16).cuda()
    prompts = _prompts(6, seed=9)
    with _llm(path, dtype="bfloat16") as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, logprobs=5, **GREEDY), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ref, ref_lp = hf_greedy(hf, prompt, 10)
        got = out.outputs[0]
        for i, (a, b) in enumerate(zip(got.token_ids, ref, strict=True)):
            if a != b:  # first divergence: each side's token is in the other's top-5
                assert a in torch.topk(ref_lp[i], 5).indices.tolist()
                assert b in got.logprobs[i]
                break


def test_overlap_and_compile_give_same_tokens_as_plain_eager(tiny_model):
    path = tiny_model("Qwen3ForCausalLM", tokenizer=True, **SHAPE)
    prompts = _prompts(24, seed=10)
    sp = SamplingParams(max_tokens=20, **GREEDY)
    seeded = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    plain = dict(cuda_graphs=False, compile=False, overlap_scheduling=False, executor="process")
    with _llm(path, dtype="float32", **plain) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        ref_s = [o.outputs[0].token_ids for o in llm.generate(prompts, seeded, use_tqdm=False)]
    with _llm(path, dtype="float32", executor="process") as fast:  # graphs, compile, overlap: the defaults
        info = fast.engine_info
        got = [o.outputs[0].token_ids for o in fast.generate(prompts, sp, use_tqdm=False)]
        got_s = [o.outputs[0].token_ids for o in fast.generate(prompts, seeded, use_tqdm=False)]
    assert info["cuda_graph_capture_seconds"] > 0
    assert got == ref and got_s == ref_s
