"""Overlap scheduling end to end on the CPU: kiln with step N+1 scheduled before step N's output is
applied gives exactly what kiln gives one step at a time (torch runs synchronously here, so nothing
actually overlaps, but the order of scheduling, device reads and updates is the one used on CUDA)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from kiln import LLM, KvCacheConfig, SamplingParams, SchedulerConfig
from kiln.outputs import RequestOutput

GREEDY: dict[str, Any] = dict(temperature=0.0, ignore_eos=True)


def _prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _llm(path: str, overlap: bool, **kw: Any) -> LLM:
    kw.setdefault("max_batch_size", 16)
    kw.setdefault("max_num_tokens", 64)
    kw.setdefault("max_seq_len", 256)
    llm = LLM(path, overlap_scheduling=overlap, **kw)
    core = llm._executor._core  # the thread executor on the CPU
    assert core.depth == (2 if overlap else 1)
    # count the steps whose decode input tokens were read from the step before them, on the device
    schedule, core.reads = core.scheduler.schedule, 0

    def counting():
        batch = schedule()
        core.reads += batch is not None and batch.reads_prev_samples
        return batch

    core.scheduler.schedule = counting
    return llm


def _summary(outs: list[RequestOutput]) -> tuple[list[Any], list[float]]:
    """(everything a caller sees of the outputs but logprob values, those values): batches may
    differ in composition between the two modes, so values are compared with a tolerance."""
    values: list[float] = []

    def lps(entries):
        if entries is None:
            return None
        keys = []
        for e in entries:
            keys.append(None if e is None else list(e))
            values.extend([] if e is None else e.values())
        return keys

    exact = [
        (
            o.finished,
            o.num_cached_tokens,
            lps(o.prompt_logprobs),
            [
                (c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason, lps(c.logprobs))
                for c in o.outputs
            ],
        )
        for o in outs
    ]
    return exact, values


def _same(a: tuple[list[Any], list[float]], b: tuple[list[Any], list[float]]) -> None:
    assert a[0] == b[0]
    assert a[1] == pytest.approx(b[1], abs=1e-5)


Summary = tuple[list[Any], list[float]]


def _both(
    path: str, prompts: list, params: Any, exact_counts: bool = True, **kw: Any
) -> tuple[Summary, Summary]:
    """(one step at a time, overlapped) outputs; checks that overlap happened and that KV is freed."""
    results = []
    for overlap in (False, True):
        with _llm(path, overlap, **kw) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            core, stats = llm._executor._core, llm.stats()
            assert stats.kv_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0
            assert not core.has_work()
            if overlap:
                assert core.reads > 0, "no step read its input tokens from the step in flight"
            else:
                assert core.reads == 0
            results.append((_summary(outs), stats))
    (seq_out, seq_stats), (ovl_out, ovl_stats) = results
    if exact_counts:  # the tokens delivered (those dropped after a finish are not counted)
        assert ovl_stats.generation_tokens_total == seq_stats.generation_tokens_total
        assert ovl_stats.prompt_tokens_total == seq_stats.prompt_tokens_total
    return seq_out, ovl_out


def test_greedy_mixed_lengths_with_chunked_prefill(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = _prompts(12, seed=11, hi=120)
    params = [SamplingParams(max_tokens=1 + i % 9, logprobs=2, **GREEDY) for i in range(12)]
    seq, ovl = _both(path, prompts, params, max_num_tokens=16)  # long prompts take several chunks
    _same(ovl, seq)


def test_max_tokens_one_and_two(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = _prompts(6, seed=12, hi=30)
    params = [SamplingParams(max_tokens=1 + i % 2, **GREEDY) for i in range(6)]
    seq, ovl = _both(path, prompts, params)
    _same(ovl, seq)
    assert [len(o[3][0][1]) for o in ovl[0]] == [1, 2] * 3


def test_preemption_with_a_tiny_pool(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = _prompts(8, seed=4, lo=20, hi=40)
    tight = KvCacheConfig(max_tokens=160, tokens_per_block=8, enable_block_reuse=False)
    kw = dict(kv_cache_config=tight, scheduler_config=SchedulerConfig("max_utilization"))
    with _llm(path, True, **kw) as llm:
        ovl = _summary(llm.generate(prompts, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False))
        assert llm.stats().num_preemptions > 0 and llm.stats().kv_usage == 0.0
    with _llm(path, False, max_num_tokens=256) as big:  # no preemption at all
        ref = _summary(big.generate(prompts, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False))
    assert [o[3][0][1] for o in ovl[0]] == [o[3][0][1] for o in ref[0]]


def test_n_forks_and_seeded_sampling_with_penalties(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = _prompts(5, seed=13, lo=5, hi=50)
    params = [
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
        SamplingParams(
            temperature=0.8,
            top_p=0.9,
            top_k=40,
            seed=8,
            max_tokens=12,
            ignore_eos=True,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.4,
        ),  # fmt: skip
        SamplingParams(
            n=2,
            temperature=0.7,
            min_p=0.05,
            seed=9,
            max_tokens=9,
            min_tokens=4,
            logit_bias={5: 3.0, 6: -2.0},
            frequency_penalty=1.0,
        ),  # fmt: skip
        SamplingParams(n=2, temperature=0.0, max_tokens=6, repetition_penalty=1.5, logprobs=3),
        SamplingParams(temperature=1.2, seed=10, max_tokens=11, presence_penalty=1.5, min_tokens=3),
    ]
    seq, ovl = _both(path, prompts, params, max_num_tokens=24)
    _same(ovl, seq)
    assert len({tuple(c[1]) for c in ovl[0][0][3]}) > 1  # the forks sample apart


def test_stop_strings_and_stop_token_ids(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = ["def fibonacci(n):", "import os", "hello world", "x = 1"]
    with _llm(path, False) as llm:
        full = llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)
    # stops cut out of each known greedy text / token list, so every request stops early
    params = []
    for i, o in enumerate(full):
        text, toks = o.outputs[0].text, o.outputs[0].token_ids
        if i % 2 == 0:
            params.append(SamplingParams(max_tokens=20, stop=[text[6:9]], **GREEDY))
        else:
            params.append(SamplingParams(max_tokens=20, stop_token_ids=[toks[5]], temperature=0.0))
    seq, ovl = _both(path, prompts, params, exact_counts=False)  # stop strings: aborts race the steps
    _same(ovl, seq)
    reasons = [o[3][0][3:5] for o in ovl[0]]
    assert all(r[0] == "stop" for r in reasons), reasons
    assert all(len(o[3][0][1]) < 20 for o in ovl[0])


def test_prompt_logprobs(tiny_model):
    path = tiny_model("Qwen2ForCausalLM", tokenizer=True)
    prompts = _prompts(4, seed=14, lo=10, hi=60)
    params = [
        SamplingParams(max_tokens=4, prompt_logprobs=2 if i % 2 == 0 else None, **GREEDY) for i in range(4)
    ]
    seq, ovl = _both(path, prompts, params, max_num_tokens=16)
    _same(ovl, seq)
    assert len(ovl[0][0][2]) == len(prompts[0]) and ovl[0][1][2] is None  # the first token has none


def test_abort_mid_flight_frees_everything(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = _prompts(3, seed=15, lo=5, hi=20)
    with _llm(path, False) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=40, **GREEDY),
                                                             use_tqdm=False)]  # fmt: skip
    with _llm(path, True) as llm:

        async def go() -> list[list[int]]:
            async def consume(prompt: list[int], stop_after: int) -> list[int]:
                gen = llm.generate_async(prompt, SamplingParams(max_tokens=40, **GREEDY), streaming=True)
                toks: list[int] = []
                async for out in gen:
                    toks = out.outputs[0].token_ids
                    if len(toks) >= stop_after:
                        break
                await gen.aclose()
                return toks

            runs = [consume(p, k) for p, k in zip(prompts, [2, 5, 40], strict=True)]
            return list(await asyncio.gather(*runs))

        got = asyncio.run(go())
        for _ in range(200):
            s = llm.stats()
            if s.kv_usage == 0.0 and s.num_running == 0 and not llm._executor._core.has_work():
                break
            asyncio.run(asyncio.sleep(0.01))
        else:
            raise AssertionError(f"KV not freed after the aborts: {llm.stats()}")
        # the engine is unharmed: a new request gives the full greedy output
        again = llm.generate(prompts[0], SamplingParams(max_tokens=40, **GREEDY), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == ref[0]
    assert got[2] == ref[2]
    for toks, full, k in zip(got[:2], ref[:2], [2, 5], strict=True):
        assert len(toks) >= k and toks == full[: len(toks)]


@pytest.mark.parametrize("bad", ["yes", 1])
def test_option_is_validated(tiny_model, bad):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with pytest.raises(ValueError, match="overlap_scheduling must be True, False or None"):
        LLM(path, overlap_scheduling=bad)
    with LLM(path, max_seq_len=64) as llm:  # off on the CPU unless asked
        assert llm._executor._core.depth == 1


def test_engine_state_lives_in_inference_mode(tiny_model):
    """The engine is built and stepped in inference mode (no autograd bookkeeping on the hot path)."""
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path, overlap=True) as llm:
        core = llm._executor._core
        assert core.engine.block_table.is_inference() and core.decoder.state.floats.is_inference()
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
