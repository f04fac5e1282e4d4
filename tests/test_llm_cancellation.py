"""Cancellation and concurrency through LLM: abandoned streams, interrupted and failed batches, aborts,
threads sharing one engine. Nothing may leak (front-end tables, engine requests, KV blocks) and every
caller gets its own, correct outputs."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable

import pytest

from kiln import LLM, KvCacheConfig, SamplingParams, SchedulerConfig
from kiln.errors import InvalidRequestError

GREEDY = dict(temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, **GREEDY)


def _llm(path: str, **kw) -> LLM:
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_num_tokens", 64)
    kw.setdefault("max_seq_len", 256)
    return LLM(path, **kw)


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _wait_idle(llm: LLM, idle_free: int) -> None:
    """Every request gone from the front end and the engine, every KV block free again."""
    _barrier(llm)

    def idle() -> bool:
        s = llm.stats()
        engine_idle = s.num_running == s.num_waiting == 0 and s.num_free_blocks == idle_free
        return engine_idle and not llm._states and not llm._sinks

    _wait_for(idle, f"an idle engine with {idle_free} free blocks (now {llm.stats()})")


def _barrier(llm: LLM) -> None:
    """A request sent after everything else: once it is done, the engine has seen all that came before."""
    gen = llm.generate_async([1], SamplingParams(max_tokens=1))
    assert asyncio.run(asyncio.wait_for(_last(gen), 20)).finished


async def _last(gen):
    outs = [out async for out in gen]
    return outs[-1]


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_an_abandoned_stream_is_aborted_whatever_ends_it(tiny_model, executor):
    """A consumer that breaks out, a cancelled task, a timeout, and an event loop closed under a running
    stream: each request is aborted and freed, and the engine serves on."""
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path, executor=executor) as llm:
        idle_free = llm.stats().num_free_blocks
        ref = llm.generate([4, 5, 6], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)[0]

        async def break_out() -> None:
            async for out in llm.generate_async([1, 2, 3], LONG, streaming=True):
                if len(out.outputs[0].token_ids) >= 2:
                    break

        async def cancel_task() -> None:
            first = asyncio.Event()

            async def consume() -> None:
                async for _ in llm.generate_async([1, 2, 3], LONG, streaming=True):
                    first.set()

            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        async def time_out() -> None:
            async def consume() -> None:
                async for _ in llm.generate_async([1, 2, 3], LONG):
                    pass

            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(consume(), 0.01)

        for end in (break_out, cancel_task, time_out):
            asyncio.run(end())
            _wait_idle(llm, idle_free)

        # A loop closed without closing the stream (no asyncio.run): its next output has nowhere to go.
        loop = asyncio.new_event_loop()
        gen = llm.generate_async([1, 2, 3], LONG, streaming=True)
        loop.run_until_complete(gen.__anext__())
        loop.close()
        _wait_idle(llm, idle_free)
        assert llm.is_alive()
        asyncio.run(gen.aclose())

        async def again() -> object:
            async for out in llm.generate_async([4, 5, 6], SamplingParams(max_tokens=8, **GREEDY)):
                return out

        out = asyncio.run(asyncio.wait_for(again(), 30))
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids  # type: ignore[attr-defined]
        _wait_idle(llm, idle_free)


def test_an_interrupted_generate_aborts_its_requests(tiny_model):
    """Ctrl-C while generate() waits: its requests leave the front end and the engine at once."""
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:
        idle_free = llm.stats().num_free_blocks
        main = threading.main_thread().ident
        assert main == threading.get_ident()

        def interrupt() -> None:
            _wait_for(lambda: bool(llm._states), "generate() to register its requests")
            signal.pthread_kill(main, signal.SIGINT)

        t = threading.Thread(target=interrupt)
        t.start()
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[1, 2, 3], [4, 5, 6]], LONG, use_tqdm=False)
        t.join()
        assert not llm._states and not llm._sinks
        _wait_idle(llm, idle_free)
        assert llm.stats().generation_tokens_total < 2 * LONG.max_tokens  # type: ignore[operator]
        assert llm.generate([1, 2], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)[0].finished


def test_a_request_the_engine_rejects_fails_its_batch_at_once(tiny_model):
    """One prompt of a batch the engine refuses (too large for the KV pool): generate() raises naming it,
    without running the rest of the batch to the end first; none of them is left in the engine."""
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    small = KvCacheConfig(max_tokens=128, tokens_per_block=8)  # 16 blocks
    with _llm(path, kv_cache_config=small) as llm:
        idle_free = llm.stats().num_free_blocks
        sp = SamplingParams(max_tokens=50, **GREEDY)
        with pytest.raises(InvalidRequestError, match="prompt 1: prompt of 200 tokens needs 25 KV blocks"):
            llm.generate([[1, 2], [1] * 200, [5, 6]], sp, use_tqdm=False)
        assert not llm._states
        _wait_idle(llm, idle_free)
        assert llm.stats().generation_tokens_total < 2 * sp.max_tokens  # type: ignore[operator]


def test_bad_params_in_a_batch_send_nothing(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:
        bad = SamplingParams(max_tokens=4)
        bad.top_p = 0.0
        sent: list[object] = []
        real = llm._executor.submit
        llm._executor.submit = lambda *reqs: (sent.extend(reqs), real(*reqs))  # type: ignore[method-assign]
        with pytest.raises(InvalidRequestError, match="top_p must be in"):
            llm.generate([[1, 2], [3, 4], [5, 6]], [LONG, bad, LONG], use_tqdm=False)

        async def bad_id() -> None:
            async for _ in llm.generate_async([1, 2], LONG, request_id=7):  # type: ignore[arg-type]
                pass

        with pytest.raises(InvalidRequestError, match="request_id must be a string, got 7"):
            asyncio.run(bad_id())
        assert not sent and not llm._states


def test_abort_of_unknown_finished_or_aborted_ids_is_a_no_op(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:
        idle_free = llm.stats().num_free_blocks
        done = llm.generate([1, 2], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)[0]
        llm.abort(done.request_id)  # finished
        llm.abort("no-such-request")

        async def aborted_twice() -> list:
            seen = []
            async for out in llm.generate_async([1, 2, 3], LONG, request_id="mine", streaming=True):
                seen.append(out)
                if len(seen) == 2:
                    llm.abort("mine")
                    llm.abort("mine")
            return seen

        seen = asyncio.run(asyncio.wait_for(aborted_twice(), 30))
        assert [o.finished for o in seen] == [False, False, True]
        assert seen[-1].outputs[0].finish_reason == "abort"
        llm.abort("mine")
        _wait_idle(llm, idle_free)
        assert llm.is_alive()
        # the id is free again
        again = asyncio.run(
            _last(llm.generate_async([1, 2, 3], SamplingParams(max_tokens=3), request_id="mine"))
        )
        assert again.finished and len(again.outputs[0].token_ids) == 3


def test_an_abort_while_the_request_is_being_sent_reaches_the_engine_after_it(tiny_model):
    """abort() from another thread between a request's registration and its send must not reach the
    engine first (where it would be a no-op, leaving the request to run to its end)."""
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    with _llm(path) as llm:
        idle_free = llm.stats().num_free_blocks
        real = llm._executor.submit

        def submit_after_an_abort(*reqs):
            for r in reqs:
                llm.abort(r.request_id)
            real(*reqs)

        llm._executor.submit = submit_after_an_abort  # type: ignore[method-assign]
        out = llm.generate([[1, 2, 3]], LONG, use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "abort"
        llm._executor.submit = real  # type: ignore[method-assign]
        # the engine takes messages in order: once a later request is done, the aborted one is gone
        assert llm.generate([1], SamplingParams(max_tokens=1), use_tqdm=False)[0].finished
        assert llm.stats().num_running == 0
        _wait_idle(llm, idle_free)


def test_threads_sharing_an_engine_get_their_own_outputs(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    prompts = [[7, 8, 9, 10], [11, 12] * 9, [13] * 30]
    kinds = {
        "greedy": SamplingParams(max_tokens=12, **GREEDY),
        "seeded": SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
        "n3": SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True),
        "stop": SamplingParams(max_tokens=16, stop=["a", "e"], temperature=0.0),
    }

    def summary(outs) -> list:
        return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]

    with _llm(path, max_batch_size=16) as llm:
        idle_free = llm.stats().num_free_blocks
        solo = {k: summary(llm.generate(prompts, sp, use_tqdm=False)) for k, sp in kinds.items()}
        got: dict[str, list] = {k: [] for k in kinds}
        errors: list[BaseException] = []
        start = threading.Barrier(2 * len(kinds))

        def run(kind: str) -> None:
            try:
                start.wait(10)
                for _ in range(2):
                    got[kind].append(summary(llm.generate(prompts, kinds[kind], use_tqdm=False)))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in kinds for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)
        for kind, runs in got.items():
            assert len(runs) == 4 and all(r == solo[kind] for r in runs), kind
        _wait_idle(llm, idle_free)


@pytest.mark.parametrize("overlap", [False, True])
def test_prefix_reuse_after_aborts_and_preemption_keeps_outputs(tiny_model, overlap):
    """Aborted streams leave half-computed, cached blocks behind; then a batch sharing their prefixes runs
    in a pool so small that it preempts. Outputs equal those of a large pool without prefix reuse, and
    the engine (overlapped or not) ends with every block free."""
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    shared = [[(7 * i + 3) % 300 + 1 for i in range(n)] for n in (16, 27)]
    prompts = [shared[i % 2] + [100 + i] * (1 + i % 5) for i in range(8)]
    sps = [SamplingParams(max_tokens=20 + 4 * i, n=1 + i % 2, **GREEDY) for i in range(8)]
    with _llm(path, kv_cache_config=KvCacheConfig(enable_block_reuse=False)) as ref_llm:
        ref = _tokens(ref_llm.generate(prompts, sps, use_tqdm=False))
    tight = KvCacheConfig(max_tokens=160, tokens_per_block=8)
    with _llm(
        path,
        kv_cache_config=tight,
        scheduler_config=SchedulerConfig("max_utilization"),
        overlap_scheduling=overlap,
    ) as llm:
        idle_free = llm.stats().num_free_blocks

        async def abort_early() -> None:
            async def one(i: int) -> None:
                async for out in llm.generate_async(prompts[i], LONG, streaming=True):
                    if len(out.outputs[0].token_ids) > i % 3:
                        break

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(prompts)))), 60)

        asyncio.run(abort_early())
        _wait_idle(llm, idle_free)
        got = _tokens(llm.generate(prompts, sps, use_tqdm=False))
        stats = llm.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        _wait_idle(llm, idle_free)
    assert got == ref
