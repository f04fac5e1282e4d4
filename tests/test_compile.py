"""torch.compile of the decoder layers: same results as eager, a graph count fixed by the model's kinds
of layers (never by the number of layers or by a step's shape), nothing kept alive."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch
from step_builder import Chunk, StepBuilder

from kiln import LLM, SamplingParams
from kiln.config import EngineLimits, KvCacheConfig
from kiln.engine import compile as kiln_compile
from kiln.engine.model_engine import ModelEngine
from kiln.engine.piecewise_graphs import PiecewiseGraphRunner

GREEDY = dict(temperature=0.0, ignore_eos=True)
BLOCK = 8
LIMITS = EngineLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=64)
KV = KvCacheConfig(tokens_per_block=BLOCK, max_tokens=256)


def _prompts(n: int, seed: int, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(1, hi))] for _ in range(n)]


def _generate(path: str, prompts: list[list[int]], **kw) -> tuple[list, dict, int | None]:
    """Greedy outputs, engine info and the number of compiled graphs after generating."""
    # a small token budget: long prompts are chunked and share steps with decodes
    for key, value in dict(dtype="float32", max_batch_size=6, max_num_tokens=24, max_seq_len=128).items():
        kw.setdefault(key, value)
    sp = SamplingParams(max_tokens=8, logprobs=3, **GREEDY)
    with LLM(path, executor="thread", **kw) as llm:
        outs = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
        compiled = llm._executor._core.engine.compiled
        return outs, dict(llm.engine_info), None if compiled is None else compiled.num_graphs


def _engine(path: str, compile: bool) -> ModelEngine:
    return ModelEngine(path, dtype="float32", device="cpu", limits=LIMITS, kv_config=KV, compile=compile)


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_compiled_llm_gives_the_eager_tokens_and_reports_compile_time(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True, num_hidden_layers=3)
    prompts = _prompts(9, seed=3)
    eager, eager_info, _ = _generate(path, prompts)
    compiled, info, num_graphs = _generate(path, prompts, compile=True)
    assert num_graphs == 2
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    for a, b in zip(compiled, eager, strict=True):
        for lp_a, lp_b in zip(a.logprobs, b.logprobs, strict=True):
            assert lp_a.keys() == lp_b.keys()
            assert all(abs(lp_a[t] - lp_b[t]) < 1e-5 for t in lp_a)
    assert eager_info["compile_seconds"] == 0.0 and info["compile_seconds"] > 0.0
    assert info["cuda_graph_capture_seconds"] == eager_info["cuda_graph_capture_seconds"] == 0.0


def _steps() -> list[list[Chunk]]:
    """Steps of every shape: two prefills, decode + chunk, two decodes, one decode (T = S = 1), a
    one-token prompt (max_seq_len = 1), then three sequences at once."""
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(1, 300, (n,), generator=g).tolist() for n in (14, 16, 9))
    return [
        [Chunk(0, 0, 0, a[:10]), Chunk(1, 1, 0, b[:5])],
        [Chunk(0, 0, 10, a[10:11], decode=True), Chunk(1, 1, 5, b[5:13])],
        [Chunk(0, 0, 11, a[11:12], decode=True), Chunk(1, 1, 13, b[13:14], decode=True)],
        [Chunk(1, 1, 14, b[14:15], decode=True)],
        [Chunk(2, 2, 0, c[:1])],
        [Chunk(0, 0, 12, a[12:13], decode=True), Chunk(2, 2, 1, c[1:9]), Chunk(3, 3, 0, a[:3])],
    ]


@pytest.mark.parametrize("num_layers", [2, 4])
def test_one_compile_for_all_layers_and_step_shapes(tiny_model, num_layers):
    path = tiny_model("LlamaForCausalLM", num_hidden_layers=num_layers)
    eager, compiled = _engine(path, compile=False), _engine(path, compile=True)
    assert eager.compiled is None and eager.compile_seconds == 0.0
    assert compiled.compiled is not None and compiled.compile_seconds > 0.0
    # warm-up done at start-up: the first layer (no residual yet) and one graph for all the others
    assert compiled.compiled.num_graphs == 2
    before = _unique_graphs()
    builders = StepBuilder(BLOCK), StepBuilder(BLOCK)
    for chunks in _steps():
        want = eager.forward(builders[0].batch(chunks)).logits
        got = compiled.forward(builders[1].batch(chunks)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert compiled.compiled.num_graphs == 2
    assert _unique_graphs() == before  # no recompilation by any compiled function
    assert not kiln_compile._KV_BY_HANDLE  # KV views are held only during a layer's call


@pytest.mark.gpu  # and on the CPU through Triton's interpreter
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_compiled_layers_with_the_triton_plugins_take_one_row_and_many(tiny_model, monkeypatch):
    # The default linear's GEMV for one row: the compiled graph (token dimension unbacked) cannot branch
    # on the row count, so every projection goes through the op, which picks the GEMV or cuBLAS at run
    # time. Triton plugins: compiled on a GPU, else Triton's interpreter.
    pytest.importorskip("triton")
    from kiln.plugins import PluginSet
    from kiln.plugins.triton import gemv

    gemv_rows: list[int] = []
    real_launch = gemv._launch
    monkeypatch.setattr(gemv, "_launch", lambda x, w, *a, **kw: gemv_rows.append(x.shape[0])
                        or real_launch(x, w, *a, **kw))  # fmt: skip
    path = tiny_model("LlamaForCausalLM", num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager, compiled = (ModelEngine(path, dtype="float32", device=device, limits=LIMITS, kv_config=KV,
                                   compile=c, cuda_graphs=False, plugins=PluginSet("forward"))
                       for c in (False, True))  # fmt: skip
    assert compiled.compiled is not None and compiled.compiled.num_graphs == 2
    builders = StepBuilder(BLOCK), StepBuilder(BLOCK)
    for chunks in _steps():
        gemv_rows.clear()
        want = eager.forward(builders[0].batch(chunks)).logits
        got = compiled.forward(builders[1].batch(chunks)).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        one_token = sum(len(c.tokens) for c in chunks) == 1  # 4 projections a layer, twice, + LM heads
        assert gemv_rows == [1] * (2 * (4 * 2 + 1) if one_token else len(gemv_rows))
    assert compiled.compiled.num_graphs == 2


def test_piecewise_pieces_of_compiled_layers_run_their_plugins(tiny_model):
    # The pieces between attentions call a compiled model's layers outside their compiled forward:
    # the routed KV-cache ops then get the KV views and run the plugins themselves.
    path = tiny_model("LlamaForCausalLM", num_hidden_layers=2)
    eager, compiled = _engine(path, compile=False), _engine(path, compile=True)
    assert compiled.kv_cache is not None
    kv = compiled.kv_cache.layers
    compiled.pieces = PiecewiseGraphRunner(compiled.model.model, kv, [16], compiled.device, capture=False)
    builders = StepBuilder(BLOCK), StepBuilder(BLOCK)
    for chunks in _steps():
        want = eager.forward(builders[0].batch(chunks)).logits
        got = compiled.forward(builders[1].batch(chunks)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not kiln_compile._KV_BY_HANDLE


def test_graph_per_kind_of_layer_with_windows_and_qk_norm(tiny_model):
    # Qwen3 (q/k norms) with windows on the last layer only: layer 0, full layer 1, windowed layer 2
    overrides = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    path = tiny_model("Qwen3ForCausalLM", tokenizer=True, **overrides)
    prompts = _prompts(5, seed=4, hi=30)
    eager, _, _ = _generate(path, prompts)
    got, _, num_graphs = _generate(path, prompts, compile=True)
    assert num_graphs == 3
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]


def test_dropped_compiled_engine_frees_its_layers(tiny_model):
    gc.disable()  # freed by reference counting alone: no cycle through the compiled forward
    try:
        engine = _engine(tiny_model("LlamaForCausalLM"), compile=True)
        engine.forward(StepBuilder(BLOCK).batch([Chunk(0, 0, 0, [1, 2, 3])]))
        layer = weakref.ref(engine.model.model.layers[1])
        engine.close()
        del engine
        assert layer() is None
    finally:
        gc.enable()


def test_failed_compile_leaves_the_model_eager(tiny_model, monkeypatch):
    path = tiny_model("LlamaForCausalLM")
    eager, engine = _engine(path, compile=False), _engine(path, compile=False)

    def fail(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kiln_compile, "_warm_up", fail)
    args = engine.model, engine.kv_spec, engine.max_blocks_per_seq
    with pytest.raises(RuntimeError, match="no compiler"):
        kiln_compile.compile_decoder_layers(*args)
    assert kiln_compile.compile_decoder_layers(*args, strict=False) is None
    layer = engine.model.model.layers[0]
    assert "forward" not in vars(layer)
    assert layer.self_attn.attn.attention_op is eager.plugins.attention
    assert layer.self_attn.attn.rope_kv_write_op is eager.plugins.rope_kv_write
    builders = StepBuilder(BLOCK), StepBuilder(BLOCK)
    for chunks in _steps()[:3]:  # layers and KV ops back to the plugins' own: the same logits
        want = eager.forward(builders[0].batch(chunks)).logits
        assert torch.equal(engine.forward(builders[1].batch(chunks)).logits, want)


def test_compile_option_is_checked(tiny_model):
    with pytest.raises(ValueError, match="compile must be True, False or None"):
        LLM(tiny_model("LlamaForCausalLM", tokenizer=True), compile="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_and_graphs_give_the_eager_tokens_on_gpu(tiny_model):
    # The Triton attention kernel takes head dims 32/64/96/128/256: hidden 128 over 4 heads.
    path = tiny_model("LlamaForCausalLM", tokenizer=True, hidden_size=128, intermediate_size=256)
    prompts = _prompts(12, seed=6, hi=90)
    # a small pool, not 90% of the card: the GPU suite runs several test processes on one device
    common = dict(
        device="cuda", max_num_tokens=64, max_batch_size=16, kv_cache_config=KvCacheConfig(max_tokens=8192)
    )
    eager, eager_info, _ = _generate(path, prompts, compile=False, cuda_graphs=False, **common)
    got, info, num_graphs = _generate(path, prompts, **common)  # compile and CUDA graphs by default
    assert num_graphs == 2  # compiled at start-up; no step (nor the graph capture) added one
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
    assert eager_info["compile_seconds"] == 0.0 and eager_info["cuda_graph_capture_seconds"] == 0.0
    assert info["compile_seconds"] > 0.0 and info["cuda_graph_capture_seconds"] > 0.0
