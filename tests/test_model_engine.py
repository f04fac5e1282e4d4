"""ModelEngine: paged, chunked, mixed steps against transformers; prompt logprobs; block bookkeeping."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from step_builder import Chunk, StepBuilder
from test_models import ARCH_CASES
from tiny_models import hf_logits

# the Triton plugins run compiled on a GPU, else in Triton's interpreter (tests/triton_env.py)
from triton_env import INTERPRETER_SKIP_REASON, INTERPRETER_UNUSABLE, ON_GPU

from kiln.config import EngineLimits, KvCacheConfig
from kiln.engine.cuda_graphs import DecodeGraphRunner
from kiln.engine.kv_cache import CPU_DEFAULT_CAP_BYTES, KvCacheSpec, cpu_default_num_blocks
from kiln.engine.model_engine import ModelEngine
from kiln.engine.piecewise_graphs import PiecewiseGraphRunner, default_piecewise_sizes, prompt_graph_sizes
from kiln.engine.sampling_math import greedy_sample_reference
from kiln.engine.synthetic_batches import covering_shapes, synthetic_batch, warm_up_shapes
from kiln.executor.messages import SlotInit
from kiln.plugins import PluginSet
from kiln.sampling_params import SamplingParams

BLOCK = 8
LIMITS = EngineLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=64)
KV = KvCacheConfig(tokens_per_block=BLOCK, max_tokens=256)
TOL = dict(atol=1e-4, rtol=1e-4)

_gen = torch.Generator().manual_seed(11)
SEQ_A = torch.randint(0, 320, (30,), generator=_gen).tolist()  # prompt 19 tokens, then 11 "generated"
SEQ_B = torch.randint(0, 320, (28,), generator=_gen).tolist()  # prompt 23 tokens, then 5 "generated"
PROMPT_A, PROMPT_B = 19, 23


def make_engine(path: str, **kwargs) -> ModelEngine:
    kwargs.setdefault("limits", LIMITS)
    kwargs.setdefault("kv_config", KV)
    return ModelEngine(path, dtype="float32", device="cpu", **kwargs)


@functools.lru_cache(maxsize=32)
def reference(path: str, tokens: tuple[int, ...]) -> torch.Tensor:
    return hf_logits(path, list(tokens))


def slot_init(slot: int, prompt: list[int], k: int | None) -> SlotInit:
    return SlotInit(slot, SamplingParams(prompt_logprobs=k), prompt, [], seed=0, seq_index=0)


def schedule() -> list[list[Chunk]]:
    """A (slot 1, seq 0) and B (slot 2, seq 1): chunks of odd sizes across block boundaries, then A decodes
    while B still prefills, then both decode. Every prompt chunk asks for prompt logprobs (top-3)."""
    a, b = SEQ_A, SEQ_B
    steps = [
        [Chunk(0, 1, 0, a[0:5], prompt_logprobs_k=3)],
        [Chunk(0, 1, 5, a[5:12], prompt_logprobs_k=3), Chunk(1, 2, 0, b[0:7], prompt_logprobs_k=3)],
        [Chunk(0, 1, 12, a[12:19], prompt_logprobs_k=3), Chunk(1, 2, 7, b[7:16], prompt_logprobs_k=3)],
        [Chunk(0, 1, 19, a[19:20], decode=True), Chunk(1, 2, 16, b[16:23], prompt_logprobs_k=3)],
    ]
    for i in range(5):
        steps.append(
            [
                Chunk(0, 1, 20 + i, a[20 + i : 21 + i], decode=True),
                Chunk(1, 2, 23 + i, b[23 + i : 24 + i], decode=True),
            ]
        )
    steps += [[Chunk(0, 1, p, a[p : p + 1], decode=True)] for p in range(25, 30)]
    return steps


# Tests that count a kernel's Python calls run it on every step: on a GPU that means no decode graphs
# (their replays skip Python) and no torch.compile (which traces a spy once); the kernels still compile.
SPIED_PATHS = {"cuda_graphs": False, "compile": False}


def use_piecewise(engine: ModelEngine, sizes: list[int], prompt_graphs: bool = False) -> list[int]:
    """Route the engine's steps through a piecewise runner replayed eagerly (the CPU stand-in for the
    captured pieces), with prompt graphs for every size if asked (their SDPA attention, as the engine
    gives them with paged_attention_sdpa); returns a list that records each run's token count."""
    assert engine.kv_cache is not None
    prompt_attention = None
    if prompt_graphs:
        from kiln.layers.attention import PagedAttention
        from kiln.plugins.sdpa_prefill import lone_prompt_attention

        scales = [m.scale for m in engine.model.modules() if isinstance(m, PagedAttention)]
        prompt_attention = lone_prompt_attention(scales, engine.kv_cache.layers)
    engine.pieces = PiecewiseGraphRunner(engine.model.model, engine.kv_cache.layers, sizes, engine.device,
                                         capture=False, prompt_attention=prompt_attention,
                                         prompt_sizes=sizes)  # fmt: skip
    runs: list[int] = []
    run = engine.pieces.run

    def counted(input_ids, positions, attn):
        runs.append(int(input_ids.shape[0]))
        return run(input_ids, positions, attn)

    engine.pieces.run = counted  # type: ignore[method-assign]
    return runs


@pytest.mark.parametrize("path_kind", ["eager", "piecewise", "prompt-graphs"])
@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_paged_chunked_mixed_run_matches_transformers(tiny_model, case, path_kind, monkeypatch):
    # "piecewise": every step through the pieces between attentions, padded to 8 or 16 tokens (the
    # padded rows write no KV, so later steps still match). "prompt-graphs": the same, with the first
    # step (A's first chunk, a lone fresh prompt) run whole with SDPA attention as a prompt graph holds
    # it; its padded rows write K/V into the rest of A's page, which A's next chunk overwrites.
    arch, overrides = ARCH_CASES[case]
    if path_kind == "prompt-graphs" and "sliding" in case:
        pytest.skip("the engine gives no prompt graphs to windowed layers")
    path = tiny_model(arch, **overrides)
    ref = {0: reference(path, tuple(SEQ_A)), 1: reference(path, tuple(SEQ_B))}
    prompts = {0: SEQ_A[:PROMPT_A], 1: SEQ_B[:PROMPT_B]}
    engine = make_engine(path)
    runs = use_piecewise(engine, [8, 16], path_kind == "prompt-graphs") if path_kind != "eager" else []
    whole: list[int] = []
    if path_kind == "prompt-graphs":
        assert engine.pieces is not None
        real_whole = engine.pieces._prompt_forward
        monkeypatch.setattr(
            engine.pieces, "_prompt_forward", lambda size: whole.append(size) or real_whole(size)
        )
    builder = StepBuilder(BLOCK)
    inits = [slot_init(1, prompts[0], 3), slot_init(2, prompts[1], 3)]
    scored: dict[int, list[float]] = {0: [], 1: []}
    for i, chunks in enumerate(schedule()):
        out = engine.forward(builder.batch(chunks, slot_inits=inits if i == 0 else None))
        assert out.logits.shape == (len(chunks), 320) and out.logits.dtype == engine.dtype
        for row, c in enumerate(chunks):  # every chunk samples: logits of its last position
            torch.testing.assert_close(out.logits[row], ref[c.seq_id][c.start + len(c.tokens) - 1], **TOL)
        for lp in out.prompt_logprobs:
            c = next(c for c in chunks if c.seq_id == lp.seq_id)
            assert lp.start == c.start
            assert len(scored[lp.seq_id]) == c.start  # chunks concatenate with no gap or overlap
            logprobs = torch.log_softmax(ref[lp.seq_id], dim=-1)
            n = len(lp.token_logprobs)
            targets = torch.tensor(SEQ_A if lp.seq_id == 0 else SEQ_B)[c.start + 1 : c.start + 1 + n]
            expect = logprobs[c.start : c.start + n].gather(1, targets[:, None]).squeeze(1)
            torch.testing.assert_close(torch.from_numpy(lp.token_logprobs), expect, **TOL)
            top = logprobs[c.start : c.start + n].topk(3, dim=-1)
            assert np.array_equal(lp.top_ids, top.indices.numpy())
            torch.testing.assert_close(torch.from_numpy(lp.top_logprobs), top.values, **TOL)
            scored[lp.seq_id] += lp.token_logprobs.tolist()
    # one logprob per prompt token 1 .. P-1, in order
    assert len(scored[0]) == PROMPT_A - 1 and len(scored[1]) == PROMPT_B - 1
    if path_kind == "piecewise":
        assert runs == [len(sum((c.tokens for c in chunks), [])) for chunks in schedule()]
        assert (
            engine.pieces is not None and engine.pieces.tokens[2, 5:8] == -1
        ).all()  # padding: no KV write
    assert whole == ([8] if path_kind == "prompt-graphs" else [])  # the lone fresh prompt alone


@pytest.mark.parametrize("length", [5, 8, 9, 16])  # pages of 8 in a size of 16: tail + null, null, tail, none
def test_a_prompt_graph_reads_no_stale_key_past_its_prompt(tiny_model, length):
    # A prompt graph attends over its whole padded size: the keys past the prompt (the rest of its last
    # page, then the null block) are written by its padding rows in the same step. With every block of
    # the pool holding NaN before, the prompt's logits and the next decode step's still match.
    path = tiny_model("LlamaForCausalLM")
    ref = reference(path, tuple(SEQ_A))
    engine = make_engine(path)
    use_piecewise(engine, [16], prompt_graphs=True)
    assert engine.kv_cache is not None
    engine.kv_cache.pool.fill_(float("nan"))
    builder = StepBuilder(BLOCK)
    out = engine.forward(builder.batch([Chunk(0, 1, 0, SEQ_A[:length])]))
    torch.testing.assert_close(out.logits[0], ref[length - 1], **TOL)
    out = engine.forward(builder.batch([Chunk(0, 1, length, SEQ_A[length : length + 1], decode=True)]))
    torch.testing.assert_close(out.logits[0], ref[length], **TOL)


def test_only_a_step_that_is_one_fresh_prompt_takes_a_prompt_graph(tiny_model, monkeypatch):
    # A's first chunk takes its size's prompt graph; A's next chunk, alone in its step but after 5 cached
    # tokens, and the decode step go through the pieces. Every row matches transformers.
    path = tiny_model("Qwen3ForCausalLM", head_dim=24)
    ref = reference(path, tuple(SEQ_A))
    engine = make_engine(path)
    use_piecewise(engine, [8, 16], prompt_graphs=True)
    assert engine.kv_cache is not None and engine.pieces is not None
    assert prompt_graph_sizes([16, 8, 32, 64], 20) == [8, 16, 32]  # up to the size a 19-token prompt pads to
    whole: list[int] = []
    real_whole = engine.pieces._prompt_forward
    monkeypatch.setattr(engine.pieces, "_prompt_forward", lambda size: whole.append(size) or real_whole(size))
    builder = StepBuilder(BLOCK)
    steps = [
        [Chunk(0, 1, 0, SEQ_A[:5])],
        [Chunk(0, 1, 5, SEQ_A[5:11])],
        [Chunk(0, 1, 11, SEQ_A[11:12], decode=True)],
    ]
    for chunks in steps:
        out = engine.forward(builder.batch(chunks))
        c = chunks[0]
        torch.testing.assert_close(out.logits[0], ref[c.start + len(c.tokens) - 1], **TOL)
    assert whole == [8]


def test_prompt_logprobs_sliced_and_unannounced_slot(tiny_model):
    path = tiny_model("Qwen3ForCausalLM", head_dim=24)
    ref = torch.log_softmax(reference(path, tuple(SEQ_A)), dim=-1)
    engine = make_engine(path)
    engine._prompt_logprobs.rows_per_slice = 3  # force several slices per chunk
    builder = StepBuilder(BLOCK)
    # slot 0 announced: 17 + 13 tokens; the first chunk also scores the next chunk's first token
    init = slot_init(0, SEQ_A, 5)
    first = engine.forward(
        builder.batch([Chunk(0, 0, 0, SEQ_A[:17], prompt_logprobs_k=5)], slot_inits=[init])
    )
    second = engine.forward(builder.batch([Chunk(0, 0, 17, SEQ_A[17:], prompt_logprobs_k=0)]))
    (p1,), (p2,) = first.prompt_logprobs, second.prompt_logprobs
    assert (p1.start, len(p1.token_logprobs), p1.top_ids.shape) == (0, 17, (17, 5))
    assert (p2.start, len(p2.token_logprobs), p2.top_ids.shape) == (17, 12, (12, 0))
    got = np.concatenate([p1.token_logprobs, p2.token_logprobs])
    expect = ref[:-1].gather(1, torch.tensor(SEQ_A[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.from_numpy(got), expect, **TOL)
    torch.testing.assert_close(torch.from_numpy(p1.top_logprobs), ref[:17].topk(5, dim=-1).values, **TOL)
    # slot 3 never announced: a chunk scores only the tokens inside it
    (p3,) = engine.forward(builder.batch([Chunk(5, 3, 0, SEQ_A[:10], prompt_logprobs_k=1)])).prompt_logprobs
    assert (p3.seq_id, p3.start, len(p3.token_logprobs)) == (5, 0, 9)
    torch.testing.assert_close(torch.from_numpy(p3.token_logprobs), expect[:9], **TOL)


def test_forked_rows_share_logits(tiny_model):
    path = tiny_model("LlamaForCausalLM")
    engine = make_engine(path)
    builder = StepBuilder(BLOCK)
    chunks = [Chunk(0, 0, 0, SEQ_A[:9]), Chunk(1, 1, 0, SEQ_B[:4])]
    out = engine.forward(builder.batch(chunks, sample=[1, 0, 0, 1, 0]))
    assert out.logits.shape == (5, 320)
    ref_a, ref_b = reference(path, tuple(SEQ_A))[8], reference(path, tuple(SEQ_B))[3]
    for row, seq in enumerate([1, 0, 0, 1, 0]):
        torch.testing.assert_close(out.logits[row], ref_b if seq else ref_a, **TOL)
    empty = engine.forward(builder.batch([Chunk(0, 0, 9, SEQ_A[9:12])], sample=[]))
    assert empty.logits.shape == (0, 320)


def test_copy_blocks_then_continue_in_another_slot(tiny_model):
    """Copy-on-write of a prefix: slot 1 gets copies of slot 0's blocks and decodes from there."""
    path = tiny_model("MistralForCausalLM", sliding_window=6)
    ref = reference(path, tuple(SEQ_A))
    engine = make_engine(path)
    builder = StepBuilder(BLOCK)
    engine.forward(builder.batch([Chunk(0, 0, 0, SEQ_A[:20])]))  # blocks 1, 2, 3 in slot 0
    src = builder.blocks[0]
    dst = [builder.next_block + i for i in range(3)]  # 4, 5, 6
    builder.blocks[1] = list(dst)
    builder.next_block += 3
    batch = builder.batch(
        [Chunk(1, 1, 20, SEQ_A[20:21], decode=True)], copy_blocks=list(zip(src, dst, strict=True))
    )
    batch.block_updates = np.array([(1, i, b) for i, b in enumerate(dst)], np.int32)
    out = engine.forward(batch)
    torch.testing.assert_close(out.logits[0], ref[20], **TOL)
    pool = engine.kv_cache.pool  # [L, 2, blocks, block, Hkv, D]
    assert torch.equal(pool[:, :, dst[:2]], pool[:, :, src[:2]])  # full blocks copied in every layer, K and V
    assert torch.equal(pool[:, :, dst[2], :4], pool[:, :, src[2], :4])  # the shared tail before the new token
    assert not torch.equal(pool[:, :, dst[2], 4], pool[:, :, src[2], 4])  # only slot 1 wrote position 20
    # and slot 0's own continuation is unaffected
    out0 = engine.forward(builder.batch([Chunk(0, 0, 20, SEQ_A[20:21], decode=True)]))
    torch.testing.assert_close(out0.logits[0], ref[20], **TOL)


def test_block_updates_append_to_rows(tiny_model):
    engine = make_engine(tiny_model("LlamaForCausalLM"))
    builder = StepBuilder(BLOCK, first_block=7)
    engine.forward(builder.batch([Chunk(0, 2, 0, SEQ_A[:10]), Chunk(1, 0, 0, SEQ_B[:3])]))
    table = engine.block_table.numpy()
    assert table.shape == (LIMITS.max_batch_size, math.ceil(LIMITS.max_seq_len / BLOCK))
    assert table[2, :3].tolist() == [7, 8, 0] and table[0, :2].tolist() == [9, 0]
    assert not table[[1, 3]].any()
    engine.forward(builder.batch([Chunk(0, 2, 10, SEQ_A[10:17])]))  # crosses into a third block
    assert engine.block_table[2, :4].tolist() == [7, 8, 10, 0] and engine.block_table[0, :2].tolist() == [
        9,
        0,
    ]


def test_batch_validation(tiny_model):
    engine = make_engine(tiny_model("LlamaForCausalLM"))
    builder = StepBuilder(BLOCK)
    with pytest.raises(ValueError, match="max_num_tokens=64"):
        engine.forward(builder.batch([Chunk(0, 0, 0, list(range(65)))]))
    with pytest.raises(ValueError, match="slots must be in"):
        engine.forward(builder.batch([Chunk(0, 4, 0, [1, 2])]))
    bad = builder.batch([Chunk(0, 0, 0, [1, 2])])
    bad.block_updates = np.array([[0, 0, engine.num_blocks]], np.int32)
    with pytest.raises(ValueError, match="block update out of range"):
        engine.forward(bad)


def test_kv_cache_sizing(tiny_model):
    path = tiny_model("LlamaForCausalLM")
    engine = make_engine(path, kv_config=KvCacheConfig(tokens_per_block=16, max_tokens=100))
    assert engine.num_blocks == math.ceil(100 / 16) + 1
    k_cache, v_cache = engine.kv_cache.layers[1]
    assert k_cache.shape == v_cache.shape == (engine.num_blocks, 16, 2, 16) and k_cache.is_contiguous()
    engine.close()
    assert engine.kv_cache is None
    with pytest.raises(AssertionError):
        engine.forward(StepBuilder(16).batch([Chunk(0, 0, 0, [1])]))
    # CPU default: two full batches of min(max_seq_len, 2048)-token sequences, capped by what all slots
    # can use and by CPU_DEFAULT_CAP_BYTES
    small = KvCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, tokens_per_block=16, dtype=torch.float32)
    assert cpu_default_num_blocks(small, EngineLimits(8, 64, 4096)) == 2 * 8 * 2048 // 16 + 1
    assert cpu_default_num_blocks(small, EngineLimits(8, 64, 64)) == 8 * 64 // 16 + 1
    big = KvCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, tokens_per_block=16, dtype=torch.bfloat16)
    assert (
        cpu_default_num_blocks(big, EngineLimits(256, 8192, 4096))
        == CPU_DEFAULT_CAP_BYTES // big.bytes_per_block
    )
    engine = make_engine(path, kv_config=KvCacheConfig(tokens_per_block=16))
    assert engine.num_blocks == LIMITS.max_batch_size * math.ceil(LIMITS.max_seq_len / 16) + 1
    assert engine.info.dtype == torch.float32 and engine.vocab_size == 320 and engine.dtype == torch.float32


def _linear_choice(linear: str) -> dict[str, str]:
    if linear == "gemm_silu_mul":  # gate|up with SiLU-and-mul in the GEMM's epilogue
        return {"linear_silu_mul": linear}
    if not linear.endswith("_fused"):
        return {"linear": linear}
    kernel = linear.removesuffix("_fused")  # skinny or gemv, with the norm and SiLU-and-mul as prologues
    fused = {
        "add_rms_norm_linear": f"{kernel}_add_rms_norm_linear",
        "silu_mul_linear": f"{kernel}_silu_mul_linear",
    }
    return fused | ({"linear": "skinny_linear"} if kernel == "skinny" else {})  # the default has the GEMV


@pytest.mark.gpu  # and on the CPU through Triton's interpreter
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize(
    "linear,attention,path_kind",
    [
        ("linear", "paged_attention", "eager"),
        ("skinny_linear", "paged_attention", "eager"),
        ("skinny_fused", "paged_attention", "eager"),  # + the norm and SiLU-and-mul as GEMM prologues
        ("gemv_fused", "paged_attention", "eager"),  # all 14 steps: the last five decode one row
        ("gemm_silu_mul", "paged_attention", "eager"),  # from 2 rows here (4,096 and hidden 2,048 by default)
        ("linear", "paged_attention_sdpa", "eager"),
        ("linear", "paged_attention", "piecewise"),
        ("linear", "paged_attention_sdpa", "piecewise"),
        ("linear", "paged_attention_sdpa", "piecewise-split"),
        ("linear", "paged_attention_sdpa", "prompt-graphs"),
    ],
)
def test_triton_backend_end_to_end(tiny_model, monkeypatch, linear, attention, path_kind):
    """The same paged schedule through the Triton plugins: compiled on a GPU, else Triton's interpreter.
    (The schedule starts with a lone fresh prompt: paged_attention_sdpa's SDPA path.) "piecewise": the
    attention writes straight into the pieces' static output rows (its plugin's forward_into).
    "piecewise-split": with no work floor on the fresh prompts SDPA takes, chunks with nothing or little
    cached go to SDPA (the second step's A chunk after 5 cached tokens and B's first; the third step's B
    chunk after 7) while A's third chunk (12 cached, more than 1.25x its 7) goes to the Triton kernel
    with the decode row, in one call. "prompt-graphs": the first step (a lone fresh prompt) runs whole
    with SDPA over its padded 16 rows, the Triton KV write taking the padding rows' slots from its page
    row."""
    pytest.importorskip("triton")
    from kiln.plugins import sdpa_prefill

    sdpa_calls: list[int] = []
    real_sdpa = sdpa_prefill.fresh_prompt_attention
    monkeypatch.setattr(sdpa_prefill, "fresh_prompt_attention",
                        lambda q, *a: sdpa_calls.append(a[3]) or real_sdpa(q, *a))  # fmt: skip
    if path_kind == "piecewise-split":
        monkeypatch.setattr(sdpa_prefill, "MIN_SPLIT_WORK", 1)
    if INTERPRETER_UNUSABLE:
        pytest.skip(INTERPRETER_SKIP_REASON)
    # two layers where the projections are fused: the second layer's input norm is the first to fuse
    from kiln.plugins.triton import gemv

    gemv_prologues: list[int] = []
    real_launch = gemv._launch
    monkeypatch.setattr(gemv, "_launch", lambda x, w, prologue, **kw: gemv_prologues.append(prologue)
                        or real_launch(x, w, prologue, **kw))  # fmt: skip
    gemm_rows: list[int] = []
    if linear == "gemm_silu_mul":
        from kiln.plugins import linear as linear_mod
        from kiln.plugins.triton import gemm_silu_mul as gemm_mod

        monkeypatch.setattr(linear_mod, "GEMM_SILU_MUL_MIN_ROWS", 2)
        monkeypatch.setattr(linear_mod, "GEMM_SILU_MUL_MIN_HIDDEN", 0)
        real_gemm = gemm_mod.gemm_silu_mul
        monkeypatch.setattr(gemm_mod, "gemm_silu_mul", lambda x, w, *a: gemm_rows.append(x.shape[0])
                            or real_gemm(x, w, *a))  # fmt: skip
    layers = 2 if linear.endswith("_fused") else 1
    path = tiny_model("Qwen3ForCausalLM", head_dim=32, num_hidden_layers=layers)
    ref = {0: reference(path, tuple(SEQ_A)), 1: reference(path, tuple(SEQ_B))}
    engine = ModelEngine(
        path,
        dtype="float32",
        device="cuda" if ON_GPU else "cpu",
        limits=LIMITS,
        kv_config=KV,
        plugins=PluginSet("forward", _linear_choice(linear) | {"attention": attention}),
        **SPIED_PATHS,
    )
    for spied in (sdpa_calls, gemv_prologues, gemm_rows):  # the KV-sizing warm-up's calls
        spied.clear()
    runs = use_piecewise(engine, [16], path_kind == "prompt-graphs") if path_kind != "eager" else []
    builder = StepBuilder(BLOCK)
    steps = schedule() if linear == "gemv_fused" else schedule()[:6]
    for chunks in steps:
        out = engine.forward(builder.batch(chunks))
        for row, c in enumerate(chunks):
            expect = ref[c.seq_id][c.start + len(c.tokens) - 1]
            torch.testing.assert_close(out.logits[row].cpu(), expect, atol=2e-4, rtol=2e-4)
    assert len(runs) == (0 if path_kind == "eager" else 6)
    # the last five steps decode one row: per layer q|k|v (the first layer's input norm has no residual
    # to add: plain), o, gate|up after the residual add and norm, down after SiLU-and-mul; then the LM
    # head. Earlier steps may have a one-row LM head (the default linear's GEMV).
    if linear == "gemv_fused":
        assert gemv_prologues[-45:] == ([0, 0, 1, 2] + [1, 0, 1, 2] + [0]) * 5
    else:
        assert set(gemv_prologues) <= {0}
    if linear == "gemm_silu_mul":  # every step of 2+ rows (all six here), once a layer
        assert len(gemm_rows) == 6 and min(gemm_rows) >= 2
    if attention == "paged_attention_sdpa":  # keys of each SDPA call: A's first chunk, then as above
        expected = {"piecewise-split": [5, 12, 7, 16], "prompt-graphs": [16]}.get(path_kind, [5])
        assert sdpa_calls == expected


@pytest.mark.gpu  # and on the CPU through Triton's interpreter
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize("layout", ["in-place", "gathered"])
def test_sdpa_batches_fresh_prompts_of_one_length_end_to_end(tiny_model, monkeypatch, layout):
    """Two fresh prompts of one length (whole PAD_TOKENS, here made 8) in a step go to SDPA as one
    batched call through the piecewise path, their K/V read where they lie when their blocks are one
    run of ids ("in-place"), else gathered; in the next step B's chunk (its prefix and chunk more than
    the step's tokens) and A's decode row go to the Triton kernel. Every row's logits match transformers."""
    pytest.importorskip("triton")
    from kiln.plugins import sdpa_prefill

    if INTERPRETER_UNUSABLE:
        pytest.skip(INTERPRETER_SKIP_REASON)
    monkeypatch.setattr(sdpa_prefill, "PAD_TOKENS", 8)
    monkeypatch.setattr(sdpa_prefill, "MIN_SPLIT_WORK", 1)
    calls: list[tuple[int, int, int]] = []  # length, prompts, first block read in place (-1: gathered)
    real = sdpa_prefill.fresh_prompt_attention
    monkeypatch.setattr(sdpa_prefill, "fresh_prompt_attention",
                        lambda q, *a: calls.append((a[3], len(a[2]), a[5])) or real(q, *a))  # fmt: skip
    path = tiny_model("Qwen3ForCausalLM", head_dim=32, num_hidden_layers=1)
    ref = {0: reference(path, tuple(SEQ_A)), 1: reference(path, tuple(SEQ_B))}
    plugins = PluginSet("forward", {"attention": "paged_attention_sdpa"})
    device = "cuda" if ON_GPU else "cpu"
    engine = ModelEngine(path, dtype="float32", device=device, limits=LIMITS, kv_config=KV, plugins=plugins,
                         **SPIED_PATHS)  # fmt: skip
    calls.clear()  # the KV-sizing warm-up's calls
    use_piecewise(engine, [32])
    a, b = SEQ_A, SEQ_B
    steps = [
        [Chunk(0, 1, 0, a[0:8]), Chunk(1, 2, 0, b[0:8])],
        [Chunk(0, 1, 8, a[8:9], decode=True), Chunk(1, 2, 8, b[8:16])],
    ]
    builder = StepBuilder(BLOCK)
    if layout == "gathered":  # a block left out after each allocation: B's page does not follow A's
        allocate = builder.allocate

        def spaced(slot: int, num_tokens: int) -> list[tuple[int, int, int]]:
            updates = allocate(slot, num_tokens)
            builder.next_block += 1
            return updates

        monkeypatch.setattr(builder, "allocate", spaced)
    for chunks in steps:
        out = engine.forward(builder.batch(chunks))
        for row, c in enumerate(chunks):
            expect = ref[c.seq_id][c.start + len(c.tokens) - 1]
            torch.testing.assert_close(out.logits[row].cpu(), expect, atol=2e-4, rtol=2e-4)
    assert calls == [(8, 2, 1 if layout == "in-place" else -1)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 512), st.integers(0, 16384), st.integers(2, 32768))
def test_warm_up_shapes_stay_within_the_limits(max_batch, extra_tokens, max_len):
    max_tokens = max_batch + extra_tokens  # the engine requires max_num_tokens >= max_batch_size
    limits = EngineLimits(max_batch_size=max_batch, max_num_tokens=max_tokens, max_seq_len=max_len)
    for computed, new in warm_up_shapes(limits):
        assert len(new) <= max_batch and sum(new) <= max_tokens
        assert all(c + n <= max_len for c, n in zip(computed, new, strict=True))
        batch, blocks = synthetic_batch(computed, new, 16)
        assert batch.num_tokens == sum(new) and blocks == 1 + sum(
            -(-(c + n) // 16) for c, n in zip(computed, new, strict=True)
        )


def _attention_variants_8b(monkeypatch, plugin="paged_attention"):
    """Llama-3.1-8B's attention geometry in bf16 on a 132-SM card: step shape -> Triton variants
    (with ``paged_attention_sdpa``, a lone fresh prompt launches none: SDPA takes it)."""
    from kiln.plugins.sdpa_prefill import without_fresh_prompts
    from kiln.plugins.triton import attention_plan

    monkeypatch.setattr(attention_plan, "num_sms", lambda device: 132)
    variants_of = attention_plan.step_variants(8, 4, 128, torch.bfloat16, torch.device("cpu"))
    if plugin == "paged_attention_sdpa":
        return without_fresh_prompts(variants_of, 32 * 128, 8192)
    return variants_of


def _random_step(rng: np.random.Generator, limits: EngineLimits) -> tuple[list[int], list[int]]:
    """A step in-flight batching could make: decode rows first, then chunks within the budget."""
    seqs = int(rng.integers(1, limits.max_batch_size + 1))
    decode = int(rng.integers(0, seqs + 1))
    chunks = seqs - decode
    room = limits.max_num_tokens - decode
    if chunks > room:
        chunks = room
    lens = rng.multinomial(room - chunks, np.ones(chunks) / chunks) + 1 if chunks else np.zeros(0, np.int64)
    lens = np.minimum(lens, limits.max_seq_len - 1)
    starts = [int(rng.integers(0, limits.max_seq_len - n)) if rng.random() < 0.3 else 0 for n in lens]
    ctx = rng.integers(1, limits.max_seq_len - 1, decode)
    return [int(c) for c in ctx] + starts, [1] * decode + [int(n) for n in lens]


@pytest.mark.parametrize(
    "limits",
    [EngineLimits(512, 8192, 131072), EngineLimits(256, 8192, 4096), EngineLimits(16, 256, 256)],
    ids=["8k-budget-128k-context", "4k-context", "small"],
)
@pytest.mark.parametrize("plugin", ["paged_attention", "paged_attention_sdpa"])
def test_start_up_steps_reach_every_attention_variant_real_steps_do(monkeypatch, limits, plugin):
    # A variant first met mid-run compiles there (0.1-1 s on the GPU; 2.5 s in a served request when
    # the lone-prompt warm-up steps stopped reaching the Triton kernel): start-up must run them all.
    variants_of = _attention_variants_8b(monkeypatch, plugin)
    base = warm_up_shapes(limits)
    extra = covering_shapes(limits, variants_of, base)
    warmed = set().union(*(variants_of(c, n) for c, n in base + extra))
    seen: set = set()
    for c, n in extra:  # each added step brings a variant nothing before it had
        assert len(n) <= limits.max_batch_size and sum(n) <= limits.max_num_tokens
        assert all(a + b <= limits.max_seq_len for a, b in zip(c, n, strict=True))
        assert not variants_of(c, n) <= seen | set().union(*(variants_of(a, b) for a, b in base))
        seen |= variants_of(c, n)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        computed, new = _random_step(rng, limits)
        if new:
            assert variants_of(computed, new) <= warmed, (len(new), sum(new), max(new))
    assert covering_shapes(limits, variants_of, base) == extra  # deterministic


def test_engine_adds_covering_steps_only_for_the_triton_attention(tiny_model):
    path = tiny_model("LlamaForCausalLM")
    reference_engine = make_engine(path)
    assert reference_engine.attention_variants() is None
    assert reference_engine.warm_up_shapes() == warm_up_shapes(LIMITS)
    triton_engine = make_engine(path, plugins=PluginSet("forward", {"attention": "paged_attention"}))
    variants_of = triton_engine.attention_variants()
    assert variants_of is not None and variants_of([0], [8])
    shapes = triton_engine.warm_up_shapes()
    assert shapes[: len(warm_up_shapes(LIMITS))] == warm_up_shapes(LIMITS)
    assert set().union(*(variants_of(c, n) for c, n in shapes)) >= variants_of([0], [1])
    # the default attention hands a lone fresh prompt to SDPA: such a step launches no Triton variant
    sdpa_variants = make_engine(path, plugins=PluginSet("forward")).attention_variants()
    assert sdpa_variants is not None and sdpa_variants([0], [8]) == set()
    assert sdpa_variants([4], [8]) == variants_of([4], [8]) and sdpa_variants([0, 0], [8, 8])


def test_steps_beyond_the_largest_piecewise_size_run_eagerly(tiny_model):
    path = tiny_model("LlamaForCausalLM")
    engine = make_engine(path)
    runs = use_piecewise(engine, [8])
    builder = StepBuilder(BLOCK)
    out = engine.forward(builder.batch([Chunk(0, 1, 0, SEQ_A[:12])], slot_inits=[slot_init(1, SEQ_A, None)]))
    torch.testing.assert_close(out.logits[0], reference(path, tuple(SEQ_A))[11], **TOL)
    out = engine.forward(builder.batch([Chunk(0, 1, 12, SEQ_A[12:19])]))
    torch.testing.assert_close(out.logits[0], reference(path, tuple(SEQ_A))[18], **TOL)
    assert runs == [7]  # 12 tokens: eager; 7: padded to 8
    engine.close()  # the pieces hold views of the KV pool: closing lets them go
    assert engine.pieces is None and engine.kv_cache is None


def test_non_owning_view_aliases_the_same_memory():
    from kiln.engine.piecewise_graphs import _non_owning

    t = torch.arange(24, dtype=torch.float32).view(4, 6)[1:, ::2]  # offset and strides kept
    alias = _non_owning(t)
    assert alias.data_ptr() == t.data_ptr() and alias.shape == t.shape and alias.stride() == t.stride()
    torch.testing.assert_close(alias, t)
    t.add_(1)  # one memory: writes show through
    torch.testing.assert_close(alias, t)
    assert alias.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


class _RecordedPiece:
    """Stands in for a captured piece on the CPU: replay() runs the piece and writes its output into
    one fixed tensor, as a graph writes into its captured memory; the residual stays inside."""

    def __init__(self, runner: PiecewiseGraphRunner, i: int, size: int, out: torch.Tensor, state: dict):
        self.runner, self.i, self.size, self.out, self.state = runner, i, size, out, state

    def replay(self) -> None:
        out, self.state["residual"] = self.runner._piece(self.i, self.size, self.state.get("residual"))
        self.out.copy_(out)


def test_piecewise_replay_bookkeeping_matches_transformers(tiny_model):
    # The replay path (graphs, their fixed outputs, attention between them) with recorded pieces
    # standing in for CUDA graphs: every step of the schedule, padded, matches transformers.
    path = tiny_model("Qwen3ForCausalLM", num_hidden_layers=3)
    engine = make_engine(path)
    runs = use_piecewise(engine, [8, 16])
    runner = engine.pieces
    assert runner is not None
    cfg = engine.info.config
    for size in runner.sizes:
        state: dict = {}
        qs = [torch.full((size, cfg.num_heads, cfg.head_dim), float("nan")) for _ in range(cfg.num_layers)]
        runner._hidden[size] = torch.full((size, cfg.hidden_size), float("nan"))
        runner._q[size] = qs
        runner._graphs[size] = [_RecordedPiece(runner, i, size, out, state)
                                for i, out in enumerate([*qs, runner._hidden[size]])]  # fmt: skip
    runner._capture = True
    ref = {0: reference(path, tuple(SEQ_A)), 1: reference(path, tuple(SEQ_B))}
    builder = StepBuilder(BLOCK)
    inits = [slot_init(1, SEQ_A[:PROMPT_A], None), slot_init(2, SEQ_B[:PROMPT_B], None)]
    for i, chunks in enumerate(schedule()):
        chunks = [dataclasses.replace(c, prompt_logprobs_k=None) for c in chunks]
        out = engine.forward(builder.batch(chunks, slot_inits=inits if i == 0 else None))
        for row, c in enumerate(chunks):
            torch.testing.assert_close(out.logits[row], ref[c.seq_id][c.start + len(c.tokens) - 1], **TOL)
    assert len(runs) == len(schedule())


@pytest.mark.parametrize("max_tokens", [16, 100, 2048, 8192, 8000])
def test_default_piecewise_sizes(max_tokens):
    sizes = default_piecewise_sizes(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens and sizes[0] <= 16
    # padding: at most doubles a small step, at most 256 tokens up to 2,048 and 512 beyond
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        assert hi <= 2 * lo and hi - lo <= (256 if lo < 2048 else 512)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_warm_up_builds_sdpa_plans_only_for_the_sdpa_attention(tiny_model, monkeypatch):
    from kiln.plugins import sdpa_prefill

    calls = []
    monkeypatch.setattr(sdpa_prefill, "warm_up", lambda *a: calls.append(a) or 1)
    path = tiny_model("Qwen3ForCausalLM", head_dim=32, num_hidden_layers=1)  # a head dim the kernel takes
    plain = make_engine(path)
    assert plain.warm_up_seconds == 0.0
    plain.warm_up_steps()
    assert calls == [] and plain.warm_up_seconds > 0.0  # timed for the start-up summary
    make_engine(path, plugins=PluginSet("forward", {"attention": "paged_attention_sdpa"})).warm_up_steps()
    ((heads, kv_heads, head_dim, scale, dtype, _device, max_tokens, page),) = calls
    assert (heads, kv_heads, dtype, max_tokens, page) == (4, 2, torch.float32, LIMITS.max_num_tokens, BLOCK)
    assert scale == pytest.approx(head_dim**-0.5)
    # every layer windowed: no step takes the SDPA path, so no plans are built
    calls.clear()
    windowed = tiny_model("MistralForCausalLM", head_dim=32, num_hidden_layers=1, sliding_window=6)
    make_engine(windowed, plugins=PluginSet("forward")).warm_up_steps()
    assert calls == []


def test_sdpa_variant_cover_follows_the_window_layout(tiny_model):
    # the step a piecewise graph runs: a decode row, then two fresh prompts SDPA takes (no work floor)
    from kiln.plugins import sdpa_prefill

    step = ([9, 0, 0], [1, 30, 20])
    triton = PluginSet("forward", {"attention": "paged_attention"})
    sdpa = PluginSet("forward")

    def variants(path, plugins):
        engine = make_engine(path, plugins=plugins)
        use_piecewise(engine, [64])
        fn = engine.attention_variants()
        assert fn is not None
        return fn(*step)

    plain = tiny_model("Qwen3ForCausalLM")
    mixed = tiny_model("Qwen3ForCausalLM", num_hidden_layers=2, use_sliding_window=True, sliding_window=5,
                       max_window_layers=1)  # fmt: skip
    windowed = tiny_model("MistralForCausalLM", sliding_window=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdpa_prefill, "MIN_SPLIT_WORK", 1)
        full, split = variants(plain, triton), variants(plain, sdpa)
        assert split and split < full  # only the decode row reaches the Triton kernel
        assert variants(mixed, sdpa) == full  # the windowed layer runs the whole step on it
        assert variants(windowed, sdpa) == variants(windowed, triton)


def test_warm_up_steps_leave_the_engine_clean(tiny_model):
    path = tiny_model("LlamaForCausalLM")
    engine = make_engine(path)
    shapes = warm_up_shapes(LIMITS)
    assert {len(n) for _c, n in shapes} >= {1, 2, 3} and any(c[0] > 0 and n[0] == 1 for c, n in shapes)
    engine.warm_up_steps()
    assert not engine.block_table.any()  # no row is left pointing at the warm-up's blocks
    builder = StepBuilder(BLOCK)
    chunks = schedule()[0]
    out = engine.forward(builder.batch(chunks, slot_inits=[slot_init(1, SEQ_A[:PROMPT_A], 3)]))
    torch.testing.assert_close(out.logits[0], reference(path, tuple(SEQ_A))[4], **TOL)


@pytest.mark.parametrize(
    "sizes,logits_max",
    [([1, 2, 4], 0), ([4], 4), ([1, 2], 1), ([1, 2, 4], 4)],
    ids=["exact", "padded-head", "fewer-than-slots-head-at-1", "exact-head"],
)
def test_graph_path_matches_transformers(tiny_model, sizes, logits_max):
    # The decode-graph path (static input rows, padding, block tables and KV slots built inside the
    # graph; the LM head too at sizes up to logits_max), replayed eagerly on the CPU: the same logits
    # as transformers, and decode-only steps do go through it. [4] pads every decode step (1 or 2
    # rows) to 4.
    path = tiny_model("LlamaForCausalLM")
    ref = {0: reference(path, tuple(SEQ_A)), 1: reference(path, tuple(SEQ_B))}
    engine = make_engine(path)
    engine.graphs = DecodeGraphRunner(
        engine._forward_hidden,
        engine.block_table,
        sizes,
        LIMITS.max_seq_len,
        BLOCK,
        engine.device,
        capture=False,
        compute_logits=engine.model.compute_logits,
        logits_max_batch=logits_max,
        sample_greedy=greedy_sample_reference,
    )
    head_calls = 0
    compute_logits = engine.model.compute_logits

    def counted_head(hidden):
        nonlocal head_calls
        head_calls += 1
        return compute_logits(hidden)

    engine.model.compute_logits = counted_head  # outside the graph only: the runner holds the original
    replays = 0
    replay = engine.graphs.replay

    replay_rows: list[int] = []

    def counted(*args):
        nonlocal replays
        replays += 1
        replay_rows.append(int(args[0].shape[1]))
        return replay(*args)

    engine.graphs.replay = counted
    builder = StepBuilder(BLOCK)
    inits = [slot_init(1, SEQ_A[:PROMPT_A], None), slot_init(2, SEQ_B[:PROMPT_B], None)]
    decode_only = 0
    for i, chunks in enumerate(schedule()):
        chunks = [dataclasses.replace(c, prompt_logprobs_k=None) for c in chunks]
        decode_only += all(c.decode for c in chunks)
        batch = builder.batch(chunks, slot_inits=inits if i == 0 else None)
        prev = None
        if batch.num_decode and i % 2:  # as overlap scheduling does: the first decode token is on the device
            prev = torch.tensor([7, int(batch.input_ids[0]), 9])  # the previous step's samples, row 1 is ours
            batch.prev_sample_rows = np.array([1] + [-1] * (batch.num_decode - 1), np.int32)
            batch.input_ids = batch.input_ids.copy()
            batch.input_ids[0] = -1
        out = engine.forward(batch, prev_sampled=prev)
        for row, c in enumerate(chunks):
            torch.testing.assert_close(out.logits[row], ref[c.seq_id][c.start + len(c.tokens) - 1], **TOL)
        # the graph's greedy sample comes with the logits where its size has the head and no padding
        rows = len(chunks)
        in_graph_unpadded = all(c.decode for c in chunks) and rows in sizes and rows <= logits_max
        assert (out.greedy is not None) == in_graph_unpadded
        if out.greedy is not None:
            assert out.greedy[0].tolist() == out.logits.argmax(-1).tolist()
    assert replays == decode_only == 10
    if sizes == [4]:  # the last steps decoded A alone: the other rows its graph reads are padding
        assert (engine.graphs.inputs[2, 1:4] == -1).all() and (engine.graphs.inputs[3, 1:4] == 1).all()
    # a graph step reading row 3 of a previous step that sampled more rows than the largest graph has
    a_last = builder.batch([Chunk(0, 1, 29, SEQ_A[29:30], decode=True)])
    a_last.input_ids = np.array([-1], np.int32)
    a_last.prev_sample_rows = np.array([3], np.int32)
    prev = torch.tensor([5, 6, 7, SEQ_A[29]])  # LIMITS.max_batch_size rows
    out = engine.forward(a_last, prev_sampled=prev)
    torch.testing.assert_close(out.logits[0], ref[0][29], **TOL)
    # forked rows sample the same sequence twice: the graph path still gathers the right rows
    a_end = 30
    fork = engine.forward(
        builder.batch([Chunk(0, 1, a_end - 1, SEQ_A[a_end - 1 : a_end], decode=True)], sample=[0, 0])
    )
    assert replays == 12 and fork.logits.shape == (2, 320) and fork.greedy is None  # rows != samples
    torch.testing.assert_close(fork.logits[0], fork.logits[1])
    # each step ran the LM head once: inside the graph where its padded size is up to logits_max
    in_graph = sum(min(s for s in sizes if s >= rows) <= logits_max for rows in replay_rows)
    assert head_calls == len(schedule()) + 2 - in_graph
    assert in_graph == {0: 0, 1: 7, 4: 12}[logits_max]  # 1: the seven one-row steps


def test_a_graph_step_reads_the_greedy_tokens_its_predecessor_left_in_the_graph(tiny_model):
    # overlap scheduling with the greedy sample inside the graph: the graph also writes its tokens where
    # the next graph reads its input tokens, so that replay copies nothing; the next step's logits are
    # those of the sequence continued by the sampled token
    path = tiny_model("LlamaForCausalLM")
    engine = make_engine(path)
    engine.graphs = DecodeGraphRunner(
        engine._forward_hidden, engine.block_table, [1], LIMITS.max_seq_len, BLOCK, engine.device,
        capture=False, compute_logits=engine.model.compute_logits, logits_max_batch=1,
        sample_greedy=greedy_sample_reference,
    )  # fmt: skip
    builder = StepBuilder(BLOCK)
    a = SEQ_A
    prefill = [Chunk(0, 1, 0, a[0:5]), Chunk(0, 1, 5, a[5:12]), Chunk(0, 1, 12, a[12:19])]
    for i, chunk in enumerate(prefill):
        inits = [slot_init(1, a[:PROMPT_A], None)] if i == 0 else None
        engine.forward(builder.batch([chunk], slot_inits=inits))
    out = engine.forward(builder.batch([Chunk(0, 1, 19, a[19:20], decode=True)]))
    assert out.greedy is not None
    token = int(out.greedy[0][0])
    assert token == int(out.logits[0].argmax())
    nxt = builder.batch([Chunk(0, 1, 20, [token], decode=True)])
    nxt.input_ids = np.array([-1], np.int32)  # on the device only, as overlap scheduling has it
    nxt.prev_sample_rows = np.array([0], np.int32)
    assert engine.graphs._tokens_in_prev is out.greedy[0]
    follow = engine.forward(nxt, prev_sampled=out.greedy[0])
    torch.testing.assert_close(follow.logits[0], reference(path, tuple(a[:20] + [token]))[20], **TOL)


def test_graph_steps_prepare_the_same_inputs_on_their_short_path(tiny_model, monkeypatch):
    # a decode graph step's own preparation (only what the graph reads) against the general one: the same
    # graph rows, block-table updates and block copies; forked rows take the general path
    path = tiny_model("LlamaForCausalLM")
    engines = []
    for short in (True, False):
        engine = make_engine(path)
        engine.graphs = DecodeGraphRunner(
            engine._forward_hidden, engine.block_table, [1, 2, 4], LIMITS.max_seq_len, BLOCK, engine.device,
            capture=False,
        )  # fmt: skip
        if not short:
            monkeypatch.setattr(engine._inputs, "_graph_step", lambda batch: None)
        engines.append(engine)
    taken = []
    prepare_graph_step = engines[0]._inputs._graph_step

    def counted(batch):
        out = prepare_graph_step(batch)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(engines[0]._inputs, "_graph_step", counted)
    builders = [StepBuilder(BLOCK), StepBuilder(BLOCK)]
    steps = [
        dict(chunks=[Chunk(0, 1, 7, [5], decode=True), Chunk(1, 2, 15, [6], decode=True)], prev=[1, -1]),
        dict(chunks=[Chunk(0, 1, 8, [-1], decode=True), Chunk(1, 2, 16, [-1], decode=True)], prev=[0, 1]),
        dict(chunks=[Chunk(1, 2, 17, [9], decode=True)], prev=None, copy=[(3, 4)]),
        dict(chunks=[Chunk(0, 1, 9, [4], decode=True)], prev=None, sample=[0, 0]),  # forked: general path
    ]
    for step in steps:
        inputs = []
        for engine, builder in zip(engines, builders, strict=True):
            batch = builder.batch(step["chunks"], sample=step.get("sample"), copy_blocks=step.get("copy"))
            if step["prev"] is not None:
                batch.prev_sample_rows = np.array(step["prev"], np.int32)
            inputs.append(engine._inputs.build(batch, graph_step=engine._fits_graph(batch)))
        short, general = inputs
        assert short.sample_all_in_order == ("sample" not in step)
        assert torch.equal(short.input_ids, general.input_ids)
        assert torch.equal(short.positions, general.positions)
        assert short.graph_rows is not None and general.graph_rows is not None
        assert torch.equal(short.graph_rows, general.graph_rows)
        assert torch.equal(engines[0].block_table, engines[1].block_table) and engines[0].block_table.any()
        for a, b in ((short.copy_src, general.copy_src), (short.copy_dst, general.copy_dst)):
            assert (a is None and b is None) or torch.equal(a, b)
    assert short.sample_inverse is not None  # the fork
    assert taken == [True, True, True, False]


def _launch_key(names: list[str], fixed: set[str], args: tuple, kwargs: dict) -> tuple:
    """What Triton compiles a variant for: each specialised argument's class (a tensor's dtype and
    16-byte alignment, an int's ==1 / divisible-by-16 class), the constexprs and launch options."""

    def cls(a: object) -> object:
        if isinstance(a, torch.Tensor):
            return str(a.dtype), a.data_ptr() % 16 == 0
        if isinstance(a, bool) or a is None:
            return a
        if isinstance(a, int):
            return "1" if a == 1 else "div16" if a % 16 == 0 else "int"
        return type(a).__name__

    specialised = tuple((n, cls(a)) for n, a in zip(names, args, strict=False) if n not in fixed)
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("grid", "warmup")))
    return specialised + options


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_random_steps_launch_only_triton_variants_start_up_launched(tiny_model, monkeypatch):
    """A launch whose specialisation start-up never made compiles inside a request's step (2-4 s on an
    H100: a served prefill beside split decode rows did). Every kernel of every random in-flight step
    must match a launch of the start-up steps, arguments' dtypes, alignment and int classes included."""
    import inspect

    pytest.importorskip("triton")
    if INTERPRETER_UNUSABLE:
        pytest.skip(INTERPRETER_SKIP_REASON)
    from kiln.plugins.triton import activation, norms, paged_attention, rope_kv_write

    launches: list[tuple] = []
    for module in (activation, norms, paged_attention, rope_kv_write):
        for kernel in vars(module).values():
            if not (hasattr(kernel, "run") and hasattr(kernel, "fn")):
                continue
            names = list(inspect.signature(kernel.fn).parameters)
            kw = getattr(kernel, "kwargs", {})
            fixed = set(kw.get("do_not_specialize") or getattr(kernel, "do_not_specialize", None) or [])

            def record(
                *args, _run=kernel.run, _name=kernel.fn.__name__, _names=names, _fixed=fixed, **kwargs
            ):
                launches.append((_name, _launch_key(_names, _fixed, args, kwargs)))
                return _run(*args, **kwargs)

            monkeypatch.setattr(kernel, "run", record)
    path = tiny_model("Qwen3ForCausalLM", head_dim=32, num_hidden_layers=1)
    # contexts past 256 tokens: the decode pass splits its keys beside a prefill pass that does not
    limits = EngineLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=400)
    kv_config = KvCacheConfig(tokens_per_block=BLOCK, max_tokens=2048)
    engine = make_engine(path, limits=limits, kv_config=kv_config, plugins=PluginSet("forward"))
    engine.warm_up_steps()
    warmed = set(launches)
    assert {name for name, _ in warmed} >= {"_attention_tile_kernel", "_rope_kv_write_kernel"}
    rng = np.random.default_rng(1)
    for _ in range(12):
        computed, new = _random_step(rng, limits)
        batch, blocks = synthetic_batch(computed, new, BLOCK)
        if not new or blocks > engine.num_blocks:
            continue
        launches.clear()
        engine.forward(batch)
        late = set(launches) - warmed

        def nearest(launch: tuple) -> list:  # the start-up launch of that kernel differing least from it
            name, key = launch
            same = [dict(k) for n, k in warmed if n == name]
            return min(([(f, v, d.get(f)) for f, v in key if d.get(f) != v] for d in same), key=len)

        assert not late, (
            f"step {computed} + {new}: launches start-up did not (field, now, then): "
            + "; ".join(f"{n}: {nearest((n, k))}" for n, k in late)
        )
