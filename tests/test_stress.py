"""Random mixes of requests through LLM: every feature at once, aborts, a tight KV pool, overlap on
and off. Nothing may hang, leak or fail, and the deterministic requests give the same tokens."""

from __future__ import annotations

import asyncio
import random

import pytest

from kiln import LLM, KvCacheConfig, SamplingParams, SchedulerConfig


def _random_params(rng: random.Random) -> SamplingParams:
    greedy = rng.random() < 0.5
    return SamplingParams(
        n=rng.choice([1, 1, 2, 3]),
        temperature=0.0 if greedy else rng.choice([0.5, 1.0]),
        top_k=rng.choice([-1, 5, 50]),
        top_p=rng.choice([1.0, 0.9]),
        min_p=rng.choice([0.0, 0.05]),
        seed=rng.randrange(1000),  # seeded: reproducible in any batch, with or without overlap
        repetition_penalty=rng.choice([1.0, 1.2]),
        presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, -0.3]),
        logit_bias=rng.choice([None, {5: 3.0, 7: -100.0}]),
        min_tokens=rng.choice([0, 2]),
        max_tokens=rng.randint(2, 24),
        stop=rng.choice([None, ["a"], ["th", "\n"]]),
        stop_token_ids=rng.choice([None, [11]]),
        ignore_eos=rng.random() < 0.5,
        logprobs=rng.choice([None, 0, 3]),
        prompt_logprobs=rng.choice([None, None, 2]),
    )


def _summary(out) -> list[tuple]:
    return [(c.index, tuple(c.token_ids), c.text, c.finish_reason, c.stop_reason) for c in out.outputs]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_mixes_finish_identically_with_and_without_overlap(tiny_model, seed):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randint(1, 60))] for _ in range(24)]
    params = [_random_params(rng) for _ in prompts]
    aborted = {i for i in range(len(prompts)) if rng.random() < 0.2}
    results = {}
    for overlap in (False, True):
        with LLM(
            path,
            max_batch_size=8,
            max_num_tokens=48,
            max_seq_len=128,
            kv_cache_config=KvCacheConfig(max_tokens=320, tokens_per_block=8),
            scheduler_config=SchedulerConfig("max_utilization"),
            overlap_scheduling=overlap,
        ) as llm:

            async def run_all() -> list:
                async def one(i: int):
                    gen = llm.generate_async(prompts[i], params[i], streaming=True)
                    last = None
                    async for out in gen:
                        last = out
                        if i in aborted and sum(len(c.token_ids) for c in out.outputs) >= 2:
                            await gen.aclose()
                            return None
                    return last

                return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(prompts)))), 120)

            outs = asyncio.run(run_all())
            for _ in range(200):  # aborts are asynchronous: wait for the pool to drain
                if llm.stats().kv_usage == 0.0 and llm.stats().num_running == 0:
                    break
                asyncio.run(asyncio.sleep(0.01))
            stats = llm.stats()
            assert stats.kv_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0, stats
            assert llm.is_alive()
        results[overlap] = outs
        for i, out in enumerate(outs):
            if i in aborted and out is None:
                continue
            assert out is not None and out.finished
            assert len(out.outputs) == params[i].n
            for c in out.outputs:
                assert c.finish_reason in ("stop", "length")
                assert len(c.token_ids) <= params[i].max_tokens
                if params[i].logprobs is not None:
                    assert len(c.logprobs) == len(c.token_ids)
            if params[i].prompt_logprobs is not None:
                assert len(out.prompt_logprobs) == len(prompts[i])
    for i in range(len(prompts)):
        a, b = results[False][i], results[True][i]
        if a is not None and b is not None:
            assert _summary(a) == _summary(b), f"request {i} differs with overlap: {params[i]}"
