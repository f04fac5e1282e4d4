"""Server life cycle against real server processes: disconnects, a full queue, SIGTERM drain, a dead engine,
and `kiln bench serve` against the server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from test_serve_harness import MODEL_NAME, ServerProcess, pid_alive

C = "/v1/completions"


def body(max_tokens: int, stream: bool = True, **kw) -> dict:
    return {
        "model": MODEL_NAME,
        "prompt": "hello world",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        **kw,
    }


async def read_stream(client: httpx.AsyncClient, url: str, payload: dict, first: asyncio.Event | None = None):
    """(status, list of decoded events, saw [DONE]) of one streaming request."""
    events, done = [], False
    async with client.stream("POST", url, json=payload) as r:
        if r.status_code != 200:
            return r.status_code, [json.loads(await r.aread())], False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[6:]))
            if first is not None:
                first.set()
    return 200, events, done


def finish_reasons(events: list[dict]) -> list[str]:
    return [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]


async def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------ disconnects and bench


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_storm")
    with ServerProcess(tiny_model(tokenizer=True), "--log-interval", "0.5", log_dir=d) as s:
        yield s


def test_disconnect_storm_frees_everything(server):
    num, num_plain = 200, 20

    async def drop_after_first_chunk(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", server.url(C), json=body(200)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the connection mid-generation

    async def give_up_waiting(client: httpx.AsyncClient) -> None:
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that stops waiting
            # only the wait for the response is short: under a 220-connection storm on a small CI
            # machine, sending the request itself can take longer than that
            await client.post(
                server.url(C), json=body(240, stream=False), timeout=httpx.Timeout(120, read=0.5)
            )

    async def main() -> float:
        limits = httpx.Limits(max_connections=num + num_plain + 10)
        async with httpx.AsyncClient(headers=server.headers, timeout=120, limits=limits) as client:
            await asyncio.gather(
                *(drop_after_first_chunk(client) for _ in range(num)),
                *(give_up_waiting(client) for _ in range(num_plain)),
            )
            t0 = time.monotonic()
            r = await client.post(server.url(C), json=body(8, stream=False))
            elapsed = time.monotonic() - t0
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            return elapsed

    assert asyncio.run(main()) < 5.0

    async def idle() -> bool:
        return (
            server.metric("kiln:kv_cache_usage_perc") == 0 and server.metric("kiln:num_requests_running") == 0
        )

    asyncio.run(wait_for(idle, 5.0, "KV usage and running requests back to zero"))
    assert server.metric("kiln:num_requests_in_server") == 0
    aborted = server.metric('kiln:request_success_total{finished_reason="abort",model_name="tiny"}')
    assert aborted == num + num_plain
    assert server.metric("kiln:generation_tokens_total") < num * 200  # they stopped early
    assert httpx.get(server.url("/health")).status_code == 200
    assert server.log().count("finish=abort") == num + num_plain

    async def status_line() -> bool:  # the periodic one (every 0.5 s here): the storm's work shows in it
        log = server.log()
        return "engine: running=" in log and "tok/s" in log

    asyncio.run(wait_for(status_line, 3.0, "the engine status line"))


def test_bench_serve_against_the_server(server, tmp_path):
    from kiln.bench import serve as bench

    parser = bench.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--base-url",
            server.base_url,
            "--api-key",
            server.api_key,
            "--rate",
            "40",
            "inf",
            "--num-requests",
            "8",
            "--isl",
            "40",
            "--osl",
            "6",
            "--vocab-size",
            "300",
            "--concurrency",
            "4",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.svg"),
        ]
    )
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"] == MODEL_NAME and len(report["results"]) == 2
    for r in report["results"]:
        assert r["completed"] == 8 and r["failed"] == 0 and r["output_tokens"] == 8 * 6
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(r[key]) == {"mean", "median", "p99"} and r[key]["median"] > 0
        assert r["e2e_ms"]["median"] >= r["ttft_ms"]["median"] and r["output_tok_s"] > 0
        # each rate draws its own prompts, so the second rate finds nothing of the first in the cache
        assert r["prompt_tokens"] == 8 * 40 and r["cached_prompt_tokens"] == 0
    assert report["workload"]["warmup_requests"] == 2
    svg = (tmp_path / "r.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4
    png = parser.parse_args(["--base-url", server.base_url, "--plot", str(tmp_path / "r.png")])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs matplotlib"):
            bench.write_plot(report, png.plot)


def test_queue_full_gets_503(tiny_model, tmp_path):
    args = ("--max-batch-size", "1", "--max-queued-requests", "1")
    with ServerProcess(tiny_model(tokenizer=True), *args, log_dir=tmp_path) as s:

        async def main() -> None:
            async with httpx.AsyncClient(headers=s.headers, timeout=120) as client:
                first = asyncio.Event()
                running = asyncio.create_task(read_stream(client, s.url(C), body(240), first))
                await first.wait()
                queued = asyncio.create_task(read_stream(client, s.url(C), body(4)))

                async def two_in_server() -> bool:
                    return s.metric("kiln:num_requests_in_server") == 2

                await wait_for(two_in_server, 10, "the second request to queue")
                r = await client.post(s.url(C), json=body(4, stream=False))
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert err["code"] == "queue_full" and err["type"] == "service_unavailable_error"
                for task in (running, queued):
                    status, events, done = await task
                    assert status == 200 and done and finish_reasons(events) == ["length"]
                r = await client.post(s.url(C), json=body(4, stream=False))
                assert r.status_code == 200

        asyncio.run(main())


# ------------------------------------------------------------------------------------------ drain and death


def engine_worker(s: ServerProcess) -> int:
    for pid in s.children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    return pid
        except FileNotFoundError:
            pass
    raise AssertionError(f"no engine worker among the children {s.children()}")


def test_sigterm_drains_then_exits_cleanly(tiny_model, tmp_path):
    model = tiny_model(tokenizer=True, max_position_embeddings=4096)
    args = ("--executor", "process", "--shutdown-timeout", "3")
    s = ServerProcess(model, *args, log_dir=tmp_path).start()
    try:
        worker = engine_worker(s)

        async def main() -> None:
            async with httpx.AsyncClient(headers=s.headers, timeout=120) as client:
                started = [asyncio.Event(), asyncio.Event()]
                short = asyncio.create_task(read_stream(client, s.url(C), body(100), started[0]))
                long = asyncio.create_task(read_stream(client, s.url(C), body(4000), started[1]))
                await asyncio.gather(*(e.wait() for e in started))
                t0 = time.monotonic()
                os.kill(s.pid, signal.SIGTERM)
                await asyncio.sleep(0.3)
                r = await client.post(s.url(C), json=body(4, stream=False))
                assert r.status_code == 503 and r.json()["error"]["code"] == "server_draining"
                assert (await client.get(s.url("/health"))).status_code == 503
                status, events, done = await short
                assert status == 200 and done and finish_reasons(events) == ["length"]
                assert sum(len(e["choices"][0]["text"]) > 0 for e in events if e["choices"]) > 0
                status, events, done = await long
                assert status == 200 and done and finish_reasons(events) == ["abort"]
                assert 2.5 < time.monotonic() - t0 < 10

        asyncio.run(main())
        assert s.proc.wait(30) == 0
        assert not pid_alive(worker), "the engine worker outlived the server"
        assert "shutdown timeout: aborted 1 requests" in s.log()
    finally:
        s.kill()


def test_dead_engine_fails_fast_and_health_says_so(tiny_model, tmp_path):
    s = ServerProcess(tiny_model(tokenizer=True), "--executor", "process", log_dir=tmp_path).start()
    try:
        worker = engine_worker(s)

        async def main() -> None:
            async with httpx.AsyncClient(headers=s.headers, timeout=30) as client:
                first = asyncio.Event()
                stream = asyncio.create_task(read_stream(client, s.url(C), body(240), first))
                await first.wait()
                os.kill(worker, signal.SIGKILL)
                status, events, done = await asyncio.wait_for(stream, 10)
                assert status == 200 and done and "error" in events[-1]
                assert events[-1]["error"]["code"] == "engine_dead"

                async def unhealthy() -> bool:
                    return (await client.get(s.url("/health"))).status_code == 503

                await wait_for(unhealthy, 5, "/health to answer 503")
                t0 = time.monotonic()
                r = await client.post(s.url(C), json=body(4, stream=False))
                assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
                assert time.monotonic() - t0 < 2
                assert (await client.get(s.url("/health"))).json()["error"]["code"] == "engine_dead"

        asyncio.run(main())
        assert s.metric("kiln:engine_alive") == 0
        assert s.stop(timeout=30) == 0
    finally:
        s.kill()


def test_dead_engine_logs_its_cause_once(tiny_model, tmp_path):
    s = ServerProcess(tiny_model(tokenizer=True), "--executor", "process", log_dir=tmp_path).start()
    try:
        os.kill(engine_worker(s), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "the engine loop is dead" not in s.log():
            assert time.monotonic() < deadline, s.log()[-3000:]
            time.sleep(0.1)
        time.sleep(1.5)  # the watchdog checks every 0.5 s: it must not log again
        lines = [ln for ln in s.log().splitlines() if "the engine loop is dead" in ln]
        assert len(lines) == 1, lines
        assert " ERROR " in lines[0] and "Cause: the engine process died" in lines[0]
    finally:
        s.kill()


def test_queue_full_message_gives_the_waiting_count():
    from types import SimpleNamespace

    from kiln.serve.engine_client import EngineClient, _Tracked
    from kiln.serve.errors import APIError

    client = EngineClient(SimpleNamespace(is_alive=lambda: True), max_queued_requests=3)
    client._in_flight = {rid: _Tracked(rid, 4) for rid in ("a", "b")}
    client.check_admission()  # room for one more
    with pytest.raises(APIError) as e:
        client.check_admission(2)  # a request of two prompts does not fit: none of it is admitted
    assert e.value.status == 503 and e.value.code == "queue_full"
    assert "2 waiting, the limit is 3; this request adds 2" in e.value.message
    client._in_flight["c"] = _Tracked("c", 4)
    with pytest.raises(APIError) as e:
        client.check_admission()
    assert "(3 waiting, the limit is 3)" in e.value.message
