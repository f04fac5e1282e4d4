"""The async bridge between HTTP handlers and the one shared engine.

Each request gets a producer task that drains ``LLM.generate_async`` into a latest-value slot; the
handler reads the newest cumulative output (outputs are cumulative, so skipping intermediate ones loses
nothing and a slow client never backs up the engine). Closing the handler's iterator (client gone,
handler cancelled) cancels the producer, which closes the engine's generator: the engine aborts the
request and frees its KV blocks. The client also owns admission (draining, queue limit) and drain-time
aborts, and a watchdog that fails every waiting request once the engine loop is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from kiln.errors import EngineDeadError, RequestFailedError
from kiln.outputs import CompletionOutput, RequestOutput
from kiln.sampling_params import SamplingParams
from kiln.serve.errors import INTERNAL, UNAVAILABLE, APIError

logger = logging.getLogger("kiln.serve")


@dataclass
class RequestRecord:
    """What one finished request did, for the request log and the latency metrics (seconds)."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reasons: list[str]
    e2e: float
    ttft: float | None = None
    tpot: float | None = None  # mean time per output token after the first
    queue_time: float | None = None


@dataclass
class _Tracked:
    request_id: str
    prompt_len: int
    received: float = field(default_factory=time.monotonic)
    first_output: float | None = None
    aborted: bool = False
    error: BaseException | None = None
    latest: RequestOutput | None = None
    version: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class EngineClient:
    """Shares one engine (``kiln.LLM`` or anything with its interface) between all requests."""

    def __init__(
        self,
        llm: Any,
        max_queued_requests: int,
        on_finish: list[Callable[[RequestRecord], None]] | None = None,
    ) -> None:
        self.llm = llm
        self.max_queued_requests = max_queued_requests
        self.on_finish = on_finish or []
        self.draining = False
        self._in_flight: dict[str, _Tracked] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._dead_reported = False

    # ------------------------------------------------------------------ state
    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def num_queued(self) -> int:
        """Requests accepted but without any output yet (waiting in the engine or in their prefill)."""
        return sum(1 for t in self._in_flight.values() if t.first_output is None)

    def is_alive(self) -> bool:
        return bool(self.llm.is_alive())

    def check_admission(self, new: int = 1) -> None:
        """Raise the 503 / 500 a request adding ``new`` engine requests gets right now, if any."""
        if self.draining:
            raise APIError(
                503,
                "The server is shutting down and accepts no new requests.",
                UNAVAILABLE,
                code="server_draining",
            )
        if not self.is_alive():
            raise APIError(
                500,
                "The engine stopped after a fatal error; restart the server.",
                INTERNAL,
                code="engine_dead",
            )
        queued, limit = self.num_queued, self.max_queued_requests
        if queued + new > limit:
            adds = f"; this request adds {new}" if new > 1 else ""
            raise APIError(
                503,
                f"Too many queued requests ({queued} waiting, the limit is {limit}{adds}); retry later.",
                UNAVAILABLE,
                code="queue_full",
            )

    # ------------------------------------------------------------------ generation
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield the newest cumulative output until the final one (finished=True).

        Engine errors for this request are raised from here (before the first output for bad input).
        Aborted (drain timeout) requests end with a final output whose unfinished sequences say "abort".
        """
        self.check_admission()
        t = _Tracked(request_id, len(prompt_token_ids))
        self._in_flight[request_id] = t
        producer = asyncio.create_task(self._produce(t, prompt_token_ids, params))
        last_seen = 0
        final: RequestOutput | None = None
        try:
            while True:
                await t.wake.wait()
                t.wake.clear()
                if t.error is not None:
                    raise t.error
                out = t.latest
                if out is not None and out.finished:  # a finished request wins over a late abort
                    final = out
                    yield out
                    return
                if t.aborted:
                    final = _abort_output(out, request_id, prompt_token_ids, params.n)
                    yield final
                    return
                if out is not None and t.version != last_seen:
                    last_seen = t.version
                    yield out
                elif producer.done():  # ended without a final output: never leave the caller waiting
                    raise RequestFailedError("the engine ended the request without a final output")
        finally:
            try:
                if not producer.done():
                    producer.cancel()  # closes the engine's generator: the engine aborts the request
                    await asyncio.wait({producer})
            finally:
                self._in_flight.pop(request_id, None)
                if final is None and t.error is None:  # the caller went away (client disconnect)
                    final = _abort_output(t.latest, request_id, prompt_token_ids, params.n)
                self._record(t, final)

    async def _produce(self, t: _Tracked, prompt_token_ids: list[int], params: SamplingParams) -> None:
        gen = self.llm.generate_async(prompt_token_ids, params, request_id=t.request_id, streaming=True)
        try:
            async for out in gen:
                if t.first_output is None:
                    t.first_output = time.monotonic()
                t.latest = out
                t.version += 1
                t.wake.set()
                if out.finished:
                    break
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the request's handler
            t.error = e
        finally:
            await gen.aclose()  # aborts the request in the engine unless it finished
            t.wake.set()

    def _record(self, t: _Tracked, final: RequestOutput | None) -> None:
        now = time.monotonic()
        outs = final.outputs if final is not None else []
        gen_tokens = sum(len(c.token_ids) for c in outs)
        longest = max((len(c.token_ids) for c in outs), default=0)
        ttft = t.first_output - t.received if t.first_output is not None else None
        tpot = None
        if ttft is not None and longest > 1:
            tpot = (now - t.first_output) / (longest - 1)  # type: ignore[operator]
        queue_time = None
        m = getattr(final, "metrics", None) if final is not None else None
        scheduled = getattr(m, "first_scheduled_time", None)
        if m is not None and scheduled is not None:
            queue_time = max(0.0, scheduled - m.arrival_time)
        rec = RequestRecord(
            request_id=t.request_id,
            prompt_tokens=t.prompt_len,
            completion_tokens=gen_tokens,
            cached_tokens=final.num_cached_tokens if final is not None else 0,
            finish_reasons=[c.finish_reason or "abort" for c in outs] if final is not None else ["error"],
            e2e=now - t.received,
            ttft=ttft,
            tpot=tpot,
            queue_time=queue_time,
        )
        for hook in self.on_finish:
            try:
                hook(rec)
            except Exception:  # noqa: BLE001 - a logging / metrics bug must not fail the request
                logger.exception("request hook failed")

    # ------------------------------------------------------------------ lifecycle
    def abort_all(self) -> int:
        """End every in-flight request now with finish_reason "abort"; returns how many."""
        for t in self._in_flight.values():
            t.aborted = True
            t.wake.set()
        return len(self._in_flight)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most ``timeout`` seconds; True if idle."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._in_flight

    def start(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    async def _watch(self) -> None:
        """Fail waiting requests once the engine is dead, whatever the engine itself delivers."""
        while True:
            await asyncio.sleep(0.5)
            if self.is_alive():
                continue
            if not self._dead_reported:
                self._dead_reported = True
                logger.error(
                    "the engine loop is dead: failing in-flight requests; /health answers 503. Cause: %s",
                    self._fatal_error_text(),
                )
            for t in self._in_flight.values():
                if t.error is None and (t.latest is None or not t.latest.finished):
                    t.error = EngineDeadError("the engine loop stopped")
                    t.wake.set()

    def _fatal_error_text(self) -> str:
        """Why the engine died: the text of its fatal error (the engine's traceback)."""
        return self.llm.fatal_error or "unknown (the engine reported no error text)"


def _abort_output(
    latest: RequestOutput | None, request_id: str, prompt_token_ids: list[int], n: int
) -> RequestOutput:
    """The final output of a request ended by the server: unfinished sequences get "abort"."""
    if latest is None:
        outs = [CompletionOutput(i, "", [], None, None, finish_reason="abort") for i in range(n)]
        return RequestOutput(request_id, None, prompt_token_ids, None, outs, finished=True)
    outs = [c if c.finished else replace(c, finish_reason="abort") for c in latest.outputs]
    return replace(latest, outputs=outs, finished=True)
