"""The engine on a GPU: Triton plugins, CUDA graphs, worker process, against transformers.

Run on the GPU machine through scripts/gpu_check.sh (pytest -m gpu); skipped without CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import hf_greedy, load_hf_model

from kiln import LLM, KvCacheConfig, SamplingParams

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
    # a small pool, not 90% of the card: the GPU suite runs several test processes on one device
    kw.setdefault("kv_cache_config", KvCacheConfig(max_tokens=16384))
    # torch.compile is tested where it is the subject (the overlap test below, test_compile.py):
    # elsewhere it would only add its start-up time to every engine.
    kw.setdefault("compile", False)
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


def test_graphs_and_eager_agree_bf16(tiny_model):
    # bf16 GEMMs are not batch-invariant: a graph pads the batch to a captured size, and cuBLAS may
    # pick another kernel for the padded shape, so near-ties can break the other way. Exact tokens
    # are checked in float32 (above); here each side's token must be in the other's top-5 at the
    # first divergence, and most sequences must not diverge at all.
    path = tiny_model("LlamaForCausalLM", tokenizer=True, **SHAPE)
    prompts = _prompts(20, seed=8)
    sp = SamplingParams(max_tokens=16, logprobs=5, **GREEDY)
    with _llm(path, dtype="bfloat16", cuda_graphs=False, executor="process") as eager:
        ref = [o.outputs[0] for o in eager.generate(prompts, sp, use_tqdm=False)]
    with _llm(path, dtype="bfloat16", executor="process") as graphed:
        assert graphed.engine_info["cuda_graph_capture_seconds"] > 0
        got = [o.outputs[0] for o in graphed.generate(prompts, sp, use_tqdm=False)]
    same = 0
    for a, b in zip(got, ref, strict=True):
        assert len(a.token_ids) == len(b.token_ids) == 16
        diverged = next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y), None
        )
        if diverged is None:
            same += 1
            continue
        x, y = a.token_ids[diverged], b.token_ids[diverged]
        assert x in b.logprobs[diverged] and y in a.logprobs[diverged], (diverged, x, y)
    assert same >= len(prompts) // 2, f"only {same} of {len(prompts)} sequences are identical"


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
    with _llm(path, dtype="float32", compile=True, executor="process") as fast:  # graphs, compile, overlap
        info = fast.engine_info
        got = [o.outputs[0].token_ids for o in fast.generate(prompts, sp, use_tqdm=False)]
        got_s = [o.outputs[0].token_ids for o in fast.generate(prompts, seeded, use_tqdm=False)]
        late = fast.stats().late_kernel_compiles  # start-up's warm-up compiled every variant used
    assert info["cuda_graph_capture_seconds"] > 0 and info["warm_up_seconds"] > 0 and late == 0
    assert got == ref and got_s == ref_s


class _CountedGraph:
    """A captured graph whose replays are recorded (by size)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, size: int, replays: list[int]) -> None:
        self.graph, self.size, self.replays = graph, size, replays

    def replay(self) -> None:
        self.replays.append(self.size)
        self.graph.replay()


def _count_prompt_graph_replays(llm: LLM) -> list[int]:
    pieces = llm._executor._core.engine.pieces
    assert pieces is not None and pieces.prompt_sizes, "no prompt graphs"
    assert sorted(pieces._prompt_graphs) == pieces.prompt_sizes  # every size captured
    replays: list[int] = []
    for size, graph in list(pieces._prompt_graphs.items()):
        pieces._prompt_graphs[size] = _CountedGraph(graph, size, replays)
    return replays


def test_prompt_graphs_are_exact_in_fp32(tiny_model):
    # A lone fresh prompt's whole prefill replays as one graph, its attention (SDPA) inside: greedy
    # tokens equal transformers' for lengths that pad to several sizes, short and long.
    path = tiny_model("LlamaForCausalLM", tokenizer=True, **SHAPE)
    hf = load_hf_model(path).cuda()
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 300) for _ in range(n)] for n in (1, 7, 16, 17, 90, 200, 240)]
    with _llm(path, dtype="float32", executor="thread") as llm:
        replays = _count_prompt_graph_replays(llm)
        pieces = llm._executor._core.engine.pieces
        for prompt in prompts:  # one at a time: each is a lone fresh prompt
            out = llm.generate([prompt], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)[0]
            assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 8)[0], len(prompt)
    assert replays == [pieces.padded_size(len(p)) for p in prompts]


def test_prompt_graphs_give_the_pieces_tokens_bf16(tiny_model, monkeypatch):
    # In bf16 the prompt graph runs the pieces' kernels at the same padded size, SDPA included (these
    # lengths pad to the same SDPA length both ways), so tokens and logprobs match the engine without
    # prompt graphs (KILN_PROMPT_GRAPHS=0) exactly.
    path = tiny_model("Qwen3ForCausalLM", tokenizer=True, **SHAPE)
    rng = random.Random(6)
    prompts = [[rng.randrange(1, 300) for _ in range(n)] for n in (90, 128, 200)]
    sp = SamplingParams(max_tokens=10, logprobs=2, **GREEDY)

    def run() -> list:
        with _llm(path, dtype="bfloat16", executor="thread") as llm:
            on = llm._executor._core.engine.pieces.prompt_sizes
            outs = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0] for p in prompts]
        return [bool(on), [(o.token_ids, o.logprobs) for o in outs]]

    with_graphs = run()
    monkeypatch.setenv("KILN_PROMPT_GRAPHS", "0")
    without = run()
    assert with_graphs[0] and not without[0]
    assert with_graphs[1] == without[1]


def test_piecewise_graphs_give_the_eager_tokens(tiny_model):
    # Prefill and mixed steps through the captured pieces (padded to a captured token count, the
    # attention launched between pieces) against the same engine running them eagerly.
    path = tiny_model("Qwen3ForCausalLM", tokenizer=True, num_hidden_layers=4, **SHAPE)
    prompts = _prompts(24, seed=11)
    sp = SamplingParams(max_tokens=12, logprobs=3, **GREEDY)
    kw = dict(dtype="float32", max_num_tokens=128, executor="thread")
    with _llm(path, piecewise_graphs=False, **kw) as llm:
        assert llm._executor._core.engine.pieces is None
        ref = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
    with _llm(path, **kw) as llm:
        pieces = llm._executor._core.engine.pieces
        assert pieces is not None and pieces.sizes[-1] == 128 and pieces.capture_seconds > 0
        runs: list[int] = []
        run = pieces.run

        def counted(input_ids, positions, attn):
            runs.append(int(input_ids.shape[0]))
            return run(input_ids, positions, attn)

        pieces.run = counted
        got = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
        late = llm.stats().late_kernel_compiles
    assert len(runs) >= 4 and max(runs) > 64 and late == 0
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got, ref, strict=True):
        for lp_a, lp_b in zip(a.logprobs, b.logprobs, strict=True):
            assert all(abs(lp_a[t] - lp_b[t]) < 1e-4 for t in lp_a.keys() & lp_b.keys())


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "piecewise-graphs"])
def test_launching_a_step_that_admits_requests_does_not_wait_for_the_device(tiny_model, graphs):
    # A step is launched while the previous one runs (overlap scheduling). Anything in the launch that
    # waits for the device (a copy from pageable memory, .item(), nonzero) serialises host and device.
    from kiln.config import EngineLimits, KvCacheConfig
    from kiln.engine.decoder import Decoder
    from kiln.engine.model_engine import ModelEngine
    from kiln.engine.synthetic_batches import synthetic_batch
    from kiln.executor.messages import SlotInit
    from kiln.plugins.registry import PluginSet

    path = tiny_model("LlamaForCausalLM", tokenizer=True, **SHAPE)
    limits = EngineLimits(max_batch_size=8, max_num_tokens=256, max_seq_len=256)
    with torch.inference_mode():
        engine = ModelEngine(path, dtype="bfloat16", device="cuda", limits=limits,
                             kv_config=KvCacheConfig(max_tokens=4096), cuda_graphs=graphs,
                             plugins=PluginSet("forward"))  # the GPU kernels, as LLM on CUDA  # fmt: skip
        assert (engine.pieces is not None) == graphs
        decoder = Decoder(limits.max_batch_size, engine.vocab_size, engine.device)
        batch, _ = synthetic_batch([40, 0, 0], [1, 30, 50], engine.tokens_per_block)
        kinds = [
            SamplingParams(temperature=0),
            SamplingParams(temperature=0.7, top_p=0.9, seed=1),
            SamplingParams(temperature=1.0, presence_penalty=0.5, logit_bias={5: 2.0}, min_tokens=2),
        ]
        batch.slot_inits = [SlotInit(s, sp, [1, 2, 3], [], s, 0, stop_ids=(7,)) for s, sp in enumerate(kinds)]
        engine.forward(batch)  # first use (compilation, allocation) outside the check
        decoder.sample_async(engine.forward(batch).logits, batch).result()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fwd = engine.forward(batch)
            step = decoder.sample_async(fwd.logits, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert step.result().token_ids.shape == (3,)
        engine.close()


def test_the_default_fused_gate_up_gemm_is_exact_in_fp32(tiny_model, monkeypatch):
    # On the GPU the gated MLP's gate|up projection and SiLU-and-mul default to gemm_silu_mul, which
    # runs the fused Triton GEMM from 4,096 rows at hidden sizes from 2,048 on Hopper: four prompts of
    # 1,100 tokens make one such step. Greedy tokens equal transformers'.
    from kiln.plugins.triton import gemm_silu_mul as gemm_mod

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the fused GEMM is the default on Hopper only")
    rows: list[int] = []
    real = gemm_mod.gemm_silu_mul
    monkeypatch.setattr(gemm_mod, "gemm_silu_mul", lambda x, w, *a: rows.append(x.shape[0]) or real(x, w, *a))
    shape = dict(hidden_size=2048, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4)
    shape["max_position_embeddings"] = 2048  # the tiny models' 256 is shorter than these prompts
    path = tiny_model("LlamaForCausalLM", tokenizer=True, num_hidden_layers=2, **shape)
    hf = load_hf_model(path).cuda()
    rng = random.Random(9)
    prompts = [[rng.randrange(1, 300) for _ in range(1100)] for _ in range(4)]
    kw = dict(max_num_tokens=8192, max_seq_len=1200, piecewise_graphs=False)  # eager: every step calls it
    with _llm(path, dtype="float32", executor="thread", **kw) as llm:
        assert llm._executor._core.engine.plugins.choice["linear_silu_mul"][0] == "gemm_silu_mul"
        rows.clear()  # the KV-sizing warm-up's calls
        outs = llm.generate(prompts, SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)
    assert rows and min(rows) >= 4096  # the 4,400-token step, once a layer; smaller steps run apart
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 6)[0]
