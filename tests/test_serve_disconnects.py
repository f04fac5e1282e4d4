"""Clients that go away: their requests are aborted, their KV blocks freed, and nobody else notices.

The stream plumbing is tested on its own (a slow reader, a stream closed mid-chunk); one real server
process (tiny random Llama, CPU, small steps so that a long prompt's prefill spans many of them) serves
the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from types import SimpleNamespace

import httpx
import pytest
from test_serve_harness import MODEL_NAME, ServerProcess

from kiln.outputs import CompletionOutput, RequestOutput
from kiln.sampling_params import SamplingParams
from kiln.serve import chat, completions
from kiln.serve.errors import APIError
from kiln.serve.generation import Primed, merge
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest

C, CHAT = "/v1/completions", "/v1/chat/completions"
STEP_TOKENS = 16  # the server's --max-num-tokens: a 3,000-token prompt takes ~190 steps


def output(k: int, finished: bool = False) -> RequestOutput:
    """The cumulative output of a one-sequence request after ``k`` tokens."""
    c = CompletionOutput(0, "x" * k, list(range(k)), None, None, finish_reason="length" if finished else None)
    return RequestOutput("r", None, [1], None, [c], finished=finished)


# ------------------------------------------------------------------------------------ stream plumbing


def test_merge_keeps_only_the_newest_output_of_each_prompt():
    async def main() -> None:
        produced = [asyncio.Event(), asyncio.Event()]

        async def source(i: int):
            for k in range(1, 101):
                yield output(k, finished=k == 100)
                await asyncio.sleep(0)
            produced[i].set()

        stream = merge([source(0), source(1)])
        first = await stream.__anext__()
        assert first[1].outputs[0].token_ids == [0]
        # the reader stalls (a client that stopped reading) while both prompts run to the end
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in produced)), 10)
        rest = [item async for item in stream]
        assert sorted(i for i, _ in rest) == [0, 1], "one update per prompt, not the whole backlog"
        assert all(out.finished and len(out.outputs[0].token_ids) == 100 for _, out in rest)

    asyncio.run(main())


def test_merge_raises_a_prompts_failure_and_closes_the_others():
    async def main() -> None:
        closed = []

        async def endless():
            try:
                k = 0
                while True:
                    k += 1
                    yield output(k)
                    await asyncio.sleep(0)
            finally:
                closed.append(True)

        async def failing():
            yield output(1)
            raise RuntimeError("engine fault")

        with pytest.raises(APIError):
            async for _ in merge([endless(), failing()]):
                pass
        assert closed

    asyncio.run(main())


def _completion_events(stream: Primed):
    req = CompletionRequest(model=MODEL_NAME, prompt="hi", max_tokens=500, stream=True)
    return completions._stream(
        req, "cmpl-1", [("hi", [1])], stream, None, [""], SimpleNamespace(model_name="m")
    )


def _chat_events(stream: Primed):
    req = ChatCompletionRequest(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], stream=True)
    return chat._stream(req, "chatcmpl-1", 1, stream, None, SimpleNamespace(model_name="m"))


@pytest.mark.parametrize("events_of", [_completion_events, _chat_events], ids=["completions", "chat"])
def test_closing_the_events_mid_stream_closes_the_engine_streams_at_once(events_of):
    """The response closes its events when the client is gone; a send that was waiting on a slow client
    leaves them at a yield. Closing them there must close the engine streams (which aborts the requests)
    before close returns, not whenever the garbage collector gets to them."""

    async def main() -> None:
        closed = []

        async def source():
            try:
                for k in range(1, 500):
                    yield output(k)
                    await asyncio.sleep(0)
            finally:
                closed.append(True)

        primed = Primed(merge([source()]))
        await primed.prime()
        events = events_of(primed)
        assert (await events.__anext__()).startswith(b"data: ")
        await events.aclose()
        assert closed

    asyncio.run(main())


# ------------------------------------------------------------------------------------ against a server


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return tiny_model(tokenizer=True, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_disconnects")
    (d / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    args = ("--max-num-tokens", str(STEP_TOKENS), "--max-batch-size", str(STEP_TOKENS))
    with ServerProcess(model, *args, "--chat-template", str(d / "chat.jinja"), log_dir=d) as s:
        yield s


def payload(path: str, prompt: str | list[int], max_tokens: int, **kw) -> dict:
    body = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}
    if path == C:
        return {**body, "prompt": prompt}
    return {**body, "messages": [{"role": "user", "content": prompt}]}


def texts(path: str, response: dict) -> list[str]:
    return [c["text"] if path == C else c["message"]["content"] for c in response["choices"]]


async def read_stream(client: httpx.AsyncClient, url: str, body: dict, leave_after: int | None = None):
    """The texts of every choice of a streamed request; None if it left after ``leave_after`` events."""
    out: dict[int, str] = {}
    seen = 0
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            seen += 1
            if leave_after is not None and seen >= leave_after:
                return None  # leaving the block closes the connection mid-stream
            for c in json.loads(line[6:])["choices"]:
                text = c["text"] if "text" in c else c["delta"].get("content") or ""
                out[c["index"]] = out.get(c["index"], "") + text
    return [out[i] for i in sorted(out)]


async def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def idle(server: ServerProcess) -> bool:
    """Nothing in the server, nothing in the engine, every KV block free."""
    return (
        server.metric("kiln:num_requests_in_server") == 0
        and server.metric("kiln:num_requests_running") == 0
        and server.metric("kiln:num_requests_waiting") == 0
        and server.metric("kiln:kv_cache_usage_perc") == 0
    )


def aborted(server: ServerProcess) -> float:
    """Sequences that ended with finish_reason "abort" (the counter appears with the first)."""
    name = f'kiln:request_success_total{{finished_reason="abort",model_name="{MODEL_NAME}"}}'
    text = httpx.get(server.url("/metrics"), headers=server.headers, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.parametrize("path", [C, CHAT])
def test_client_leaving_aborts_its_request(server, path):
    url = server.url(path)

    async def main() -> None:
        async with httpx.AsyncClient(headers=server.headers, timeout=60) as client:
            short = payload(path, "hello world", 12)
            before = texts(path, (await client.post(url, json=short)).json())
            long = payload(path, "hello world", 4000, n=2)
            base = aborted(server)

            # streaming: gone after the first chunk
            assert await read_stream(client, url, long, leave_after=1) is None
            await wait_for(lambda: idle(server), 10, "the streamed request to be freed")
            assert aborted(server) == base + 2

            # not streaming: gone while the engine is generating its answer
            tokens = server.metric("kiln:generation_tokens_total")
            task = asyncio.create_task(client.post(url, json=long))
            await wait_for(
                lambda: server.metric("kiln:generation_tokens_total") > tokens, 10, "the request to run"
            )
            task.cancel()  # closes the connection
            await asyncio.gather(task, return_exceptions=True)
            await wait_for(lambda: idle(server), 10, "the plain request to be freed")
            assert aborted(server) == base + 4

            assert texts(path, (await client.post(url, json=short)).json()) == before
            assert await read_stream(client, url, short) == before

    asyncio.run(main())


def test_half_of_many_clients_leaving(server):
    rng = random.Random(0)
    prompts = ["hello world", "The quick brown fox", "def f(x):\n", "abc " * 40]

    async def main() -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(headers=server.headers, timeout=60, limits=limits) as client:
            expected = {}
            for path in (C, CHAT):
                for p in prompts:
                    r = await client.post(server.url(path), json=payload(path, p, 16))
                    expected[path, p] = texts(path, r.json())[0]
            base = aborted(server)

            async def stays(path: str, p: str, n: int, stream: bool) -> list[str] | None:
                body = payload(path, p, 16, n=n)
                if stream:
                    return await read_stream(client, server.url(path), body)
                return texts(path, (await client.post(server.url(path), json=body)).json())

            async def leaves(path: str, p: str, n: int, stream: bool) -> None:
                body = payload(path, p, 3000, n=n)
                if stream:
                    assert await read_stream(client, server.url(path), body, rng.randint(1, 30)) is None
                    return
                with pytest.raises(httpx.ReadTimeout):  # gives up waiting for the answer
                    await client.post(server.url(path), json=body, timeout=httpx.Timeout(60, read=1.0))

            jobs = [
                (rng.choice([C, CHAT]), rng.choice(prompts), rng.choice([1, 2]), rng.random() < 0.5)
                for _ in range(50)
            ]
            results = await asyncio.gather(
                *((leaves if i % 2 else stays)(*job) for i, job in enumerate(jobs)),
                client.get(server.url("/health")),
            )
            assert results[-1].status_code == 200
            for i, (path, p, n, _stream) in enumerate(jobs):
                if i % 2 == 0:
                    assert results[i] == [expected[path, p]] * n, (path, p, n)
            await wait_for(lambda: idle(server), 10, "every request to be freed")
            assert aborted(server) == base + sum(n for i, (_, _, n, _) in enumerate(jobs) if i % 2)
            assert (await client.get(server.url("/health"))).status_code == 200

    asyncio.run(main())


def test_abort_during_prefill_then_the_same_prompt_again(server, model):
    from kiln import LLM
    from kiln.config import KvCacheConfig

    rng = random.Random(1)
    prompt = [rng.randrange(1, 320) for _ in range(3000)]
    body = payload(C, prompt, 16)
    url = server.url(C)

    async def main() -> dict:
        async with httpx.AsyncClient(headers=server.headers, timeout=60) as client:
            computed = server.metric("kiln:prompt_tokens_total")
            task = asyncio.create_task(read_stream(client, url, body))
            await wait_for(  # a few KV blocks' worth computed
                lambda: server.metric("kiln:prompt_tokens_total") > computed + 64, 10, "the prefill to start"
            )
            task.cancel()  # closes the connection; in 16-token steps the prefill outlasts this round trip
            await asyncio.gather(task, return_exceptions=True)
            await wait_for(lambda: idle(server), 10, "the request to be freed")
            return (await client.post(url, json=body)).json()

    again = asyncio.run(main())
    assert 0 < again["usage"]["prompt_tokens_details"]["cached_tokens"] <= len(prompt)
    fresh_engine = LLM(
        model,
        kv_cache_config=KvCacheConfig(enable_block_reuse=False),
        max_num_tokens=STEP_TOKENS,
        max_batch_size=STEP_TOKENS,
    )
    with fresh_engine:
        fresh = fresh_engine.generate(
            [prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False
        )[0]
    assert again["choices"][0]["text"] == fresh.outputs[0].text
