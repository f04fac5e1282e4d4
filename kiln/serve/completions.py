"""POST /v1/completions: one engine request per prompt, n samples each; streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.outputs import CompletionOutput, LogprobsDict, RequestOutput
from kiln.serve import openai_bridge as bridge
from kiln.serve.errors import bad_request
from kiln.serve.generation import Primed, as_api_error, collect, merge
from kiln.serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from kiln.serve.sse import (
    CLIENT_CLOSED,
    DONE,
    ClientDisconnected,
    EventStreamResponse,
    event,
    unless_disconnected,
)
from kiln.serve.state import ServerState


def _prompt_items(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: each a string or a list of token ids."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [p]  # type: ignore[list-item]
    return list(p)  # type: ignore[arg-type]


def _tokenize(
    items: list[str | list[int]], req: CompletionRequest, state: ServerState
) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) of every prompt (``_prompt_items``); runs in the tokenizer thread."""
    if not items:
        raise bad_request("prompt must not be empty.", "prompt")
    out: list[tuple[str | None, list[int]]] = []
    for item in items:
        if isinstance(item, str):
            if item == "":
                raise bad_request("prompt must not be empty.", "prompt")
            out.append((item, state.llm.tokenizer.encode(item, add_special_tokens=req.add_special_tokens)))
        else:
            out.append((None, list(item)))
    return out


async def create_completion(req: CompletionRequest, request: Request, state: ServerState) -> Response:
    bridge.check_completion_request(req, state)
    items = _prompt_items(req)
    num_prompts = len(items)
    limit = state.config.max_queued_requests
    if num_prompts > limit:  # each prompt is one queued engine request: this one could never be admitted
        raise bad_request(
            f"The request has {num_prompts} prompts, but this server admits at most {limit} queued "
            f"requests (one per prompt; --max-queued-requests {limit}). Send at most {limit} prompts "
            "per request.",
            "prompt",
        )
    state.client.check_admission(num_prompts)  # fail fast (503) before any tokenizer work
    prompts = await state.in_tokenizer_thread(_tokenize, items, req, state)
    for _text, ids in prompts:
        bridge.check_prompt_ids(ids, state.vocab_size)
        bridge.check_context(len(ids), req.max_tokens, state.max_seq_len, chat=False)
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = bridge.sampling_params(
        req, state, max_tokens=req.max_tokens, logprobs=req.logprobs, prompt_logprobs=echo_logprobs
    )
    rid = f"cmpl-{uuid.uuid4().hex}"
    ids_of = [f"{rid}-{i}" if len(prompts) > 1 else rid for i in range(len(prompts))]
    fmt = bridge.LogprobFormatter(state.llm.tokenizer, req.logprobs or 0)
    echo_texts = [
        (text if text is not None else state.llm.tokenizer.decode(ids, skip_special_tokens=False))
        if req.echo
        else ""
        for text, ids in prompts
    ]
    gens = [state.client.generate(ids_of[i], ids, params) for i, (_t, ids) in enumerate(prompts)]
    if req.stream:
        primed = Primed(merge(gens))
        try:
            await unless_disconnected(request, primed.prime())
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        events = _stream(req, rid, prompts, primed, fmt, echo_texts, state)
        return EventStreamResponse(events)
    try:
        finals = await unless_disconnected(request, collect(gens))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)  # never seen by anyone: the client left
    choices = []
    for pi, out in enumerate(finals):
        for c in out.outputs:
            text, logprobs = _choice_payload(req, c, out, prompts[pi][1], fmt, echo_texts[pi])
            choices.append(
                CompletionChoice(
                    index=bridge.choice_index(pi, req.n, c.index),
                    text=text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
    resp = CompletionResponse(
        id=rid,
        model=state.model_name,
        choices=choices,
        usage=bridge.usage([len(ids) for _t, ids in prompts], finals),
    )
    return JSONResponse(resp.model_dump(mode="json"))


def _choice_payload(
    req: CompletionRequest,
    c: CompletionOutput,
    out: RequestOutput,
    prompt_ids: list[int],
    fmt: bridge.LogprobFormatter,
    echo_text: str,
) -> tuple[str, CompletionLogprobs | None]:
    if req.logprobs is None:
        return echo_text + c.text, None
    offset = 0
    lp = CompletionLogprobs()
    if req.echo:
        lp, offset = fmt.completion(prompt_ids, _padded(out.prompt_logprobs, len(prompt_ids)), 0)
    gen, _ = fmt.completion(c.token_ids, _padded(c.logprobs, len(c.token_ids)), offset)
    _extend(lp, gen)
    return echo_text + c.text, lp


def _padded(entries: Sequence[LogprobsDict | None] | None, n: int) -> list[LogprobsDict | None]:
    """Exactly ``n`` entries (None where the engine gave no logprobs)."""
    out: list[LogprobsDict | None] = list(entries or [])[:n]
    return out + [None] * (n - len(out))


def _extend(a: CompletionLogprobs, b: CompletionLogprobs) -> None:
    a.tokens += b.tokens
    a.token_logprobs += b.token_logprobs
    a.top_logprobs += b.top_logprobs
    a.text_offset += b.text_offset


async def _stream(
    req: CompletionRequest,
    rid: str,
    prompts: list[tuple[str | None, list[int]]],
    stream: Primed,
    fmt: bridge.LogprobFormatter,
    echo_texts: list[str],
    state: ServerState,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    exclude = None if include_usage else {"usage"}
    n = req.n
    sent_text = [[0] * n for _ in prompts]
    sent_tokens = [[0] * n for _ in prompts]
    offsets = [[0] * n for _ in prompts]
    started = [[False] * n for _ in prompts]
    finished = [[False] * n for _ in prompts]
    finals: dict[int, RequestOutput] = {}
    try:
        async for pi, out in stream:
            if out.finished:
                finals[pi] = out
            for c in out.outputs:
                i = c.index
                if finished[pi][i]:
                    continue
                text = c.text[sent_text[pi][i] :]
                new_ids = c.token_ids[sent_tokens[pi][i] :]
                logprobs = None
                if not started[pi][i]:
                    started[pi][i] = True
                    text = echo_texts[pi] + text
                    if req.echo and req.logprobs is not None:
                        ids = prompts[pi][1]
                        plp = _padded(out.prompt_logprobs, len(ids))
                        logprobs, offsets[pi][i] = fmt.completion(ids, plp, 0)
                if req.logprobs is not None and new_ids:
                    entries = _padded((c.logprobs or [])[sent_tokens[pi][i] :], len(new_ids))
                    gen, offsets[pi][i] = fmt.completion(new_ids, entries, offsets[pi][i])
                    if logprobs is None:
                        logprobs = gen
                    else:
                        _extend(logprobs, gen)
                sent_text[pi][i] = len(c.text)
                sent_tokens[pi][i] = len(c.token_ids)
                done = c.finish_reason is not None
                finished[pi][i] = done
                # an update with new tokens is sent even when they add no text yet (an incomplete
                # character, a possible stop string): the client sees each step's progress
                if not text and not new_ids and logprobs is None and not done:
                    continue
                chunk = CompletionResponse(
                    id=rid,
                    created=created,
                    model=state.model_name,
                    choices=[
                        CompletionChoice(
                            index=bridge.choice_index(pi, n, i),
                            text=text,
                            logprobs=logprobs,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    ],
                )
                yield event(chunk, exclude)
        if include_usage:
            usage = bridge.usage([len(ids) for _t, ids in prompts], [finals[k] for k in sorted(finals)])
            yield event(
                CompletionResponse(id=rid, created=created, model=state.model_name, choices=[], usage=usage)
            )
    except Exception as e:  # noqa: BLE001 - mid-stream: an error event, then [DONE]
        yield event(as_api_error(e).body())
    finally:
        # closed at a yield (client gone while a chunk was being sent): `async for` leaves ``stream``
        # open, and only closing it aborts the engine requests now rather than when it is collected
        await stream.aclose()
    yield DONE
