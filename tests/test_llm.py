"""End to end through LLM: scheduler -> model engine -> decoder, compared with transformers."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch
from tiny_models import hf_greedy, load_hf_model

from kiln import LLM, KvCacheConfig, SamplingParams, SchedulerConfig
from kiln.errors import ContextLengthExceededError, EngineDeadError, InvalidRequestError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _llm(path: str, **kw) -> LLM:
    kw.setdefault("max_batch_size", 16)
    kw.setdefault("max_num_tokens", 256)
    kw.setdefault("max_seq_len", 256)
    return LLM(path, **kw)


ARCHS = [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 4}),  # tied, MHA
    (
        "LlamaForCausalLM",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    ("MistralForCausalLM", {}),
    ("Qwen2ForCausalLM", {}),
    ("Qwen3ForCausalLM", {"head_dim": 32}),
]


@pytest.mark.parametrize("arch, overrides", ARCHS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(ARCHS)])
def test_greedy_tokens_and_logprobs_match_transformers(tiny_model, arch, overrides):
    path = tiny_model(arch, tokenizer=True, **overrides)
    hf = load_hf_model(path)
    prompts = _prompts(5, seed=1)
    with _llm(path) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, logprobs=5, **GREEDY), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ref, ref_lp = hf_greedy(hf, prompt, 10)
        got = out.outputs[0]
        assert got.token_ids == ref
        for step, entry in enumerate(got.logprobs):
            top = torch.topk(ref_lp[step], 5)
            for tid, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                assert entry[tid] == pytest.approx(lp, abs=1e-3)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_generate_admits_its_whole_batch_in_the_first_step(tiny_model, executor):
    # a batch up to one submit chunk goes as one message: the engine's first step already holds all of it
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    n = 200
    with _llm(path, executor=executor, max_batch_size=n, max_num_tokens=4096) as llm:
        before = llm.stats().steps
        sp = SamplingParams(max_tokens=1, **GREEDY)
        outs = llm.generate(_prompts(n, seed=5, hi=20), sp, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [1] * n
        assert llm.stats().steps - before == 1


def test_a_large_generate_is_validated_whole_then_sent_in_chunks(tiny_model, monkeypatch):
    # The engine starts on the first chunk while the rest are registered and sent; a bad prompt
    # anywhere still fails the call before any request is sent.
    import kiln.llm as llm_module

    monkeypatch.setattr(llm_module, "_SUBMIT_CHUNK", 8)
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path, max_batch_size=32) as llm:
        sent: list[list[str]] = []
        submit = llm._executor.submit

        def recording_submit(*reqs):
            sent.append([r.request_id for r in reqs])
            submit(*reqs)

        monkeypatch.setattr(llm._executor, "submit", recording_submit)
        prompts = _prompts(20, seed=6, hi=20)
        sp = SamplingParams(max_tokens=3, **GREEDY)
        with pytest.raises(InvalidRequestError, match="token ids must be in"):
            llm.generate([*prompts, [10**9]], sp, use_tqdm=False)
        assert sent == []
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert [len(chunk) for chunk in sent] == [8, 8, 4]
        assert [rid for chunk in sent for rid in chunk] == [o.request_id for o in outs]
        alone = [llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
        assert [o.outputs[0].token_ids for o in outs[:3]] == alone


def test_batch_invariance_and_chunked_prefill(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = _prompts(16, seed=2, hi=120)
    sp = SamplingParams(max_tokens=8, **GREEDY)
    with _llm(path) as llm:
        alone = llm.generate(prompts[3], sp, use_tqdm=False)[0].outputs[0].token_ids
        batch = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert batch[3] == alone
    with _llm(path, max_num_tokens=16) as small:  # every long prompt is split into chunks
        chunked = [o.outputs[0].token_ids for o in small.generate(prompts, sp, use_tqdm=False)]
    assert chunked == batch


def test_prefix_reuse_hits_and_keeps_outputs(tiny_model):
    path = tiny_model("Qwen2ForCausalLM", tokenizer=True)
    shared = _prompts(1, seed=3, lo=80, hi=80)[0]
    a, b = shared + [5, 6, 7], shared + [8, 9]
    sp = SamplingParams(max_tokens=6, **GREEDY)
    with _llm(path, kv_cache_config=KvCacheConfig(tokens_per_block=16)) as llm:
        first = llm.generate(a, sp, use_tqdm=False)[0]
        hits_before = llm.stats().prefix_cache_hits
        second = llm.generate(b, sp, use_tqdm=False)[0]
        hits = llm.stats().prefix_cache_hits - hits_before
    assert hits >= 64 and second.num_cached_tokens >= 64  # 5 full blocks of the shared 80 tokens
    with _llm(path, kv_cache_config=KvCacheConfig(enable_block_reuse=False)) as cold:
        assert cold.generate(b, sp, use_tqdm=False)[0].outputs[0].token_ids == second.outputs[0].token_ids
        assert cold.generate(a, sp, use_tqdm=False)[0].outputs[0].token_ids == first.outputs[0].token_ids
        assert cold.stats().prefix_cache_hits == 0


def test_preemption_gives_same_outputs(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = _prompts(8, seed=4, lo=20, hi=40)
    sp = SamplingParams(max_tokens=24, **GREEDY)
    with _llm(path) as big:
        ref = [o.outputs[0].token_ids for o in big.generate(prompts, sp, use_tqdm=False)]
    tight = KvCacheConfig(max_tokens=160, tokens_per_block=8, enable_block_reuse=False)
    with _llm(path, kv_cache_config=tight, scheduler_config=SchedulerConfig("max_utilization")) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        assert llm.stats().num_preemptions > 0
        assert llm.stats().kv_usage == 0.0
    assert got == ref


def test_seeded_sampling_is_reproducible_alone_and_in_batch(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = _prompts(6, seed=5)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    with _llm(path) as llm:
        alone = llm.generate(prompts[0], seeded, use_tqdm=False)[0].outputs[0]
        mixed = llm.generate(prompts, [seeded] + [other] * 5, use_tqdm=False)[0].outputs[0]
        again = llm.generate(prompts[0], seeded, use_tqdm=False)[0].outputs[0]
        n3 = llm.generate(
            prompts[0],
            SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=12, ignore_eos=True),
            use_tqdm=False,
        )[0]
    assert alone.token_ids == mixed.token_ids == again.token_ids
    assert alone.text == mixed.text
    assert len(n3.outputs) == 3 and len({tuple(c.token_ids) for c in n3.outputs}) > 1


def test_n_greedy_samples_are_identical(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:
        out = llm.generate([[3, 4, 5] * 15], SamplingParams(n=4, max_tokens=9, **GREEDY), use_tqdm=False)[0]
        ref = llm.generate([[3, 4, 5] * 15], SamplingParams(max_tokens=9, **GREEDY), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(c.token_ids == ref.outputs[0].token_ids for c in out.outputs)


def test_streaming_deltas_concatenate_and_stop_conditions(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:
        full = llm.generate("def fibonacci(n):", SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)[0]
        text = full.outputs[0].text

        async def stream() -> list[str]:
            seen, prev = [], ""
            async for out in llm.generate_async(
                "def fibonacci(n):", SamplingParams(max_tokens=20, **GREEDY), streaming=True
            ):
                cur = out.outputs[0].text
                assert cur.startswith(prev)
                seen.append(cur[len(prev) :])
                prev = cur
            return seen

        deltas = asyncio.run(stream())
        assert "".join(deltas) == text and len(deltas) > 1
        # A stop string cut out of the known greedy text.
        stop = text[5:9]
        assert stop.strip() and stop not in text[:8]
        cut = llm.generate(
            "def fibonacci(n):", SamplingParams(max_tokens=20, stop=[stop], **GREEDY), use_tqdm=False
        )
        c = cut[0].outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason == stop and c.text == text[: text.index(stop)]
        # stop_token_ids end with the token that hit, kept in token_ids.
        tok = full.outputs[0].token_ids[4]
        stopped = llm.generate(
            "def fibonacci(n):",
            SamplingParams(max_tokens=20, stop_token_ids=[tok], temperature=0),
            use_tqdm=False,
        )[0].outputs[0]
        first = full.outputs[0].token_ids.index(tok)
        assert stopped.finish_reason == "stop" and stopped.stop_reason == tok
        assert stopped.token_ids == full.outputs[0].token_ids[: first + 1]
        assert full.outputs[0].finish_reason == "length"
        assert llm.stats().kv_usage == 0.0


def test_abort_by_closing_stream_frees_kv(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:

        async def go() -> None:
            gen = llm.generate_async([1, 2, 3], SamplingParams(max_tokens=200, **GREEDY), streaming=True)
            async for out in gen:
                if len(out.outputs[0].token_ids) >= 3:
                    break
            await gen.aclose()
            for _ in range(100):
                if llm.stats().kv_usage == 0.0 and llm.stats().num_running == 0:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"KV not freed after abort: {llm.stats()}")

        asyncio.run(go())


def test_bad_input_is_rejected_with_clear_errors(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path, max_seq_len=64) as llm:
        with pytest.raises(ContextLengthExceededError, match="maximum context length is 64 tokens"):
            llm.generate([1] * 70, SamplingParams(max_tokens=4), use_tqdm=False)
        with pytest.raises(ContextLengthExceededError):
            llm.generate([1] * 60, SamplingParams(max_tokens=10), use_tqdm=False)
        with pytest.raises(InvalidRequestError, match="prompt must not be empty"):
            llm.generate("", SamplingParams(), use_tqdm=False)
        with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 320\)"):
            llm.generate([[1, 2, 400]], SamplingParams(), use_tqdm=False)
        for not_ids in ([1, True], [1, 2.0], [1, "2"]):  # bools are ints to Python, not token ids
            kind = type(not_ids[1]).__name__
            with pytest.raises(InvalidRequestError, match=f"token ids must be ints, got {kind} .*index 1"):
                llm.generate([not_ids], SamplingParams(), use_tqdm=False)
        with pytest.raises(InvalidRequestError, match="prompt 1: token ids must be in"):
            llm.generate([[1, 2], [400]], SamplingParams(), use_tqdm=False)  # which prompt of the batch
        with pytest.raises(InvalidRequestError, match="prompt_token_ids must be a list of token ids"):
            llm.generate({"prompt_token_ids": 5}, SamplingParams(), use_tqdm=False)
        with pytest.raises(InvalidRequestError, match="sampling_params must be a SamplingParams .* got dict"):
            llm.generate([1, 2], {"temperature": 0}, use_tqdm=False)  # type: ignore[arg-type]
        # A SamplingParams changed after construction is checked again when submitted.
        sp = SamplingParams(max_tokens=4)
        for field, value, message in (
            ("top_p", 0.0, "top_p must be in"),
            ("max_tokens", -3, "max_tokens must be an integer >= 1"),
            ("n", 0, "n must be an integer >= 1"),
            ("seed", -1, "seed must be None or an integer"),
            ("stop", 5, "stop must be None, a string or a list of strings"),
        ):
            changed = SamplingParams(max_tokens=4)
            setattr(changed, field, value)
            with pytest.raises(InvalidRequestError, match=message):
                llm.generate([1, 2], changed, use_tqdm=False)
        sp.stop = "x"
        llm.generate([1, 2], sp, use_tqdm=False)
        assert sp.stop_list == ["x"]  # the change took effect
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0: greedy\)"):
            SamplingParams(temperature=-1)
        # The engine is unharmed.
        assert llm.generate([1, 2], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)[0].finished
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1"):
        LLM(path, max_batch_size=0)
    with pytest.raises(ValueError, match="is not a directory"):
        LLM("/nonexistent/model")


def test_abort_gives_the_waiting_caller_its_final_output(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    long = SamplingParams(max_tokens=200, **GREEDY)
    with _llm(path) as llm:
        idle_free = llm.stats().num_free_blocks  # known before any step: every usable block
        assert idle_free == llm.engine_info["num_blocks"] - 1  # all but the null block

        async def streamed() -> list[object]:
            seen = []
            async for out in llm.generate_async([1, 2, 3], long, request_id="mine", streaming=True):
                seen.append(out)
                if len(seen) == 2:
                    llm.abort("mine")
            return seen

        seen = asyncio.run(asyncio.wait_for(streamed(), 60))
        final = seen[-1]
        assert final.finished and final.outputs[0].finish_reason == "abort"  # type: ignore[attr-defined]
        assert len(final.outputs[0].token_ids) < 200  # type: ignore[attr-defined]

        # generate() blocked in another thread returns the aborted request's output
        import threading

        got: list[object] = []
        t = threading.Thread(target=lambda: got.extend(llm.generate([[4, 5, 6]], long, use_tqdm=False)))
        t.start()
        while not llm._states:  # the request is registered
            t.join(0.01)
        llm.abort(next(iter(llm._states)))
        t.join(60)
        assert not t.is_alive() and got[0].outputs[0].finish_reason == "abort"  # type: ignore[attr-defined]
        llm.abort("req-unknown")  # an unknown id: nothing happens
        for _ in range(500):  # the engine frees them on its next loop step
            if llm.stats().num_running == 0:
                break
            time.sleep(0.01)
        assert llm.stats().num_running == 0 and llm.stats().num_free_blocks == idle_free
    with pytest.raises(EngineDeadError, match="this LLM was shut down .*create a new LLM"):
        llm.generate([1, 2], long, use_tqdm=False)


def test_automatic_request_ids_skip_a_callers_own(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:
        taken = f"req-{llm._next_id().split('-')[1]}"  # the next automatic id would follow this one
        nxt = f"req-{int(taken.split('-')[1]) + 1}"

        async def both() -> tuple[object, ...]:
            long = SamplingParams(max_tokens=200, **GREEDY)
            gen = llm.generate_async([1, 2], long, request_id=nxt, streaming=True)
            first = await gen.__anext__()  # running now, under the id the next automatic one would take
            outs = await asyncio.to_thread(llm.generate, [3, 4], SamplingParams(max_tokens=2, **GREEDY))
            await gen.aclose()
            return first, outs

        _, outs = asyncio.run(both())
        assert outs[0].request_id != nxt and outs[0].finished  # type: ignore[index]


def test_fatal_engine_error_reaches_every_caller(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    llm = _llm(path)
    try:
        engine = llm._executor._core.engine  # thread executor on the CPU

        def boom(batch):
            raise RuntimeError("device fell over")

        engine.forward = boom
        with pytest.raises(EngineDeadError, match="device fell over"):
            llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert not llm.is_alive()
        with pytest.raises(EngineDeadError):
            llm.generate([1], SamplingParams(), use_tqdm=False)
    finally:
        llm.shutdown()


def test_chat_and_process_executor(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    sp = SamplingParams(max_tokens=6, **GREEDY)
    with _llm(path) as llm:
        ref = llm.chat([{"role": "user", "content": "Hello"}], sp, use_tqdm=False)[0].outputs[0].token_ids
        # OpenAI text parts are joined, as the server does
        parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
        got = llm.chat([{"role": "user", "content": parts}], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert got == ref
        with pytest.raises(InvalidRequestError, match="got a part of type 'image_url'"):
            llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], sp)
    with _llm(path, executor="process") as llm:
        got = llm.chat([{"role": "user", "content": "Hello"}], sp, use_tqdm=False)[0].outputs[0].token_ids
        stats = llm.stats()  # from the worker process, its own collector policy installed
        assert stats.steps > 0 and stats.gc_time_total >= 0 and stats.late_kernel_compiles == 0
    assert got == ref


def test_a_request_that_cannot_fit_fails_alone(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    small = KvCacheConfig(max_tokens=64, tokens_per_block=16)
    with _llm(path, kv_cache_config=small) as llm:

        async def both() -> tuple[object, object]:
            async def run(prompt: list[int], n: int) -> object:
                try:
                    async for out in llm.generate_async(prompt, SamplingParams(max_tokens=n, **GREEDY)):
                        return out
                except Exception as e:  # noqa: BLE001 - the test inspects it
                    return e

            return tuple(await asyncio.gather(run([1] * 100, 8), run([1, 2, 3], 4)))

        too_big, fine = asyncio.run(both())
        assert isinstance(too_big, InvalidRequestError)
        assert "needs 7 KV blocks of 16 tokens but the pool has 4" in str(too_big)
        assert fine.finished and len(fine.outputs[0].token_ids) == 4
        assert llm.is_alive()


def test_cli_generate_prints_text_and_summary(tiny_model, capsys):
    from kiln.cli import main

    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    rc = main(["generate", "--model", path, "--max-tokens", "5", "--temperature", "0", "--max-seq-len", "128",
               "def f(x):", "import os"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0
    assert "--- 'def f(x):' (length, 5 tokens)" in out.out and "--- 'import os'" in out.out
    assert "2 requests, 10 tokens" in out.err and "tok/s" in out.err
    assert main(["generate", "--model", path, "--temperature", "-1", "x"]) == 2
    assert "temperature must be a finite number >= 0 (0: greedy), got -1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kv_cache_config": {"max_tokens": 64}}, "kv_cache_config must be a KvCacheConfig"),
        ({"scheduler_config": "max_utilization"}, "scheduler_config must be a SchedulerConfig"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"plugins": ["rms_norm"]}, "plugins must be a dict"),
        ({"dtype": "int8"}, "dtype must be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:N'"),
        ({"executor": "fork"}, "executor must be 'auto', 'thread' or 'process'"),
        ({"max_seq_len": 10_000}, r"max_seq_len \(10000\) exceeds the model's max_position_embeddings"),
        ({"max_num_tokens": 4}, r"max_num_tokens \(4\) must be >= max_batch_size"),
    ],
)
def test_llm_arguments_are_validated(tiny_model, kwargs, message):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with pytest.raises(ValueError, match=message):
        LLM(path, **{"max_batch_size": 8, **kwargs})


def test_request_metrics_are_ordered(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:
        outs = llm.generate(_prompts(4, seed=11), SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    for out in outs:
        m = out.metrics
        assert m is not None and m.first_scheduled_time is not None
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert m.queued_time is not None and m.arrival_time <= m.queued_time <= m.first_scheduled_time


def test_step_log_has_one_line_per_step(tiny_model, tmp_path, monkeypatch):
    log = tmp_path / "steps.tsv"
    monkeypatch.setenv("KILN_STEP_LOG", str(log))
    prompts = _prompts(4, seed=5, lo=20, hi=40)
    with _llm(tiny_model("LlamaForCausalLM", tokenizer=True), max_num_tokens=32) as llm:
        llm.generate(prompts, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
        steps = llm.stats().steps
    header, *rows = [line.split("\t") for line in log.read_text().splitlines()]
    assert header[:5] == ["step", "unix_time", "seqs", "decode_seqs", "tokens"] and len(rows) == steps
    prompt_tokens = [int(r[4]) - int(r[3]) for r in rows]  # tokens less one per decode row
    assert max(int(r[4]) for r in rows) <= 32 and sum(prompt_tokens) == sum(map(len, prompts))
    assert all(float(r[5]) > 0 for r in rows)
    assert header[-3:] == ["gc_ms", "launch_ms", "compiles"]
    assert all(len(r) == len(header) and float(r[-3]) >= 0 and int(r[-1]) == 0 for r in rows)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_host_profile_records_the_engine_loop(tiny_model, tmp_path, monkeypatch, executor):
    # KILN_HOST_PROFILE: the loop's cProfile statistics, written at shutdown, in the worker process too,
    # into a folder made for it (a missing one lost a whole run's profile)
    from kiln.executor.host_profile import ENV, report

    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prof = tmp_path / "not" / "yet" / "host.prof"
    monkeypatch.setenv(ENV, str(prof))
    with _llm(path, executor=executor) as llm:
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
    text = report(str(prof), top=200)
    assert "by tottime" in text and "by cumulative" in text
    assert "(step)" in text and "(forward)" in text  # EngineCore.step, ModelEngine.forward


def test_step_updates_carry_stats_now_and_then_and_whenever_a_request_finishes(tiny_model, monkeypatch):
    # encoding the stats every step costs the worker's loop; the front end keeps the last it got, and
    # the step that finishes a request always brings them, so a finished generate sees every step
    from kiln.executor import engine_core

    monkeypatch.setattr(engine_core, "STATS_INTERVAL_S", 1e9)
    carried: list[bool] = []
    on_output = LLM._on_output

    def spy(self, msg):
        if msg[0] == "updates":
            carried.append(msg[2] is not None)
        on_output(self, msg)

    monkeypatch.setattr(LLM, "_on_output", spy)
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path, executor="process") as llm:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        stats = llm.stats()
    assert stats.generation_tokens_total == 8 and stats.num_running == 0
    assert carried[-1] and carried.count(False) >= 5  # the steps between admission and the end: none
