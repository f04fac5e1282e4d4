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


_END = object()


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several prompts as (prompt index, cumulative output)."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(i: int, g: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in g:
                queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))
        finally:
            with contextlib.suppress(BaseException):
                await g.aclose()  # type: ignore[attr-defined]
            queue.put_nowait((i, _END))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise as_api_error(item)
            else:
                yield i, item  # type: ignore[misc]
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
