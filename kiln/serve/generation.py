"""Running a request's prompts through the engine client: collect all, or merge their streams.

Engine exceptions become APIErrors here, so routes deal with one error type.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from kiln.outputs import RequestOutput
from kiln.serve.errors import APIError, from_engine_error


async def _last(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    last: RequestOutput | None = None
    try:
        async for out in gen:
            last = out
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
    assert last is not None and last.finished, "the engine client always ends with a final output"
    return last


async def collect(gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Final outputs of all prompts, in order; the first failure cancels the others."""
    tasks = [asyncio.ensure_future(_last(g)) for g in gens]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise as_api_error(t.exception())  # type: ignore[arg-type]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several prompts as (prompt index, cumulative output).

    Each prompt keeps only its newest output until the consumer takes it: outputs are cumulative, so a
    client that reads slowly (or not at all) gets fewer, larger updates and nothing piles up in memory.
    """
    latest: dict[int, RequestOutput] = {}
    errors: list[BaseException] = []
    ended = 0
    news = asyncio.Event()

    async def pump(i: int, g: AsyncIterator[RequestOutput]) -> None:
        nonlocal ended
        try:
            async for out in g:
                latest[i] = out
                news.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            errors.append(e)
        finally:
            with contextlib.suppress(BaseException):
                await g.aclose()  # type: ignore[attr-defined]
            ended += 1
            news.set()

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        while True:
            if errors:
                raise as_api_error(errors[0])
            if latest:
                i = next(iter(latest))  # the prompt waiting longest: a dict keeps insertion order
                yield i, latest.pop(i)
            elif ended == len(tasks):
                return
            else:
                await news.wait()
                news.clear()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Primed:
    """A merged stream whose first item was already awaited: validation errors the engine raises
    before anything runs surface while the route can still answer with a 4xx."""

    def __init__(self, stream: AsyncIterator[tuple[int, RequestOutput]]) -> None:
        self._stream = stream
        self._first: tuple[int, RequestOutput] | None = None

    async def prime(self) -> None:
        try:
            self._first = await self._stream.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for item in self._stream:
            yield item

    async def aclose(self) -> None:
        await self._stream.aclose()  # type: ignore[attr-defined]


def as_api_error(e: BaseException) -> APIError:
    return e if isinstance(e, APIError) else from_engine_error(e)
