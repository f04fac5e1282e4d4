"""POST /v1/chat/completions: the chat template turns messages into one prompt; n samples of the reply."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.errors import InvalidRequestError
from kiln.outputs import RequestOutput
from kiln.serve import openai_bridge as bridge
from kiln.serve.errors import bad_request, from_engine_error
from kiln.serve.generation import Primed, as_api_error, collect, merge
from kiln.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
)
from kiln.serve.sse import (
    CLIENT_CLOSED,
    DONE,
    ClientDisconnected,
    EventStreamResponse,
    event,
    unless_disconnected,
)
from kiln.serve.state import ServerState


def render_chat(messages: list[ChatMessage], add_generation_prompt: bool, state: ServerState) -> list[int]:
    """Token ids of a conversation under the chat template (--chat-template or the tokenizer's)."""
    tok = state.llm.tokenizer
    if state.config.chat_template is None and not getattr(getattr(tok, "hf", None), "chat_template", "?"):
        raise bad_request(
            "This model's tokenizer has no chat template: start the server with --chat-template FILE, "
            "or use /v1/completions.",
            "messages",
        )
    try:
        return tok.apply_chat_template(
            bridge.chat_messages(messages),
            chat_template=state.config.chat_template,
            add_generation_prompt=add_generation_prompt,
        )
    except InvalidRequestError as e:
        raise from_engine_error(e) from None
    except Exception as e:  # noqa: BLE001 - a template that raises is the request's problem
        raise from_engine_error(
            InvalidRequestError(f"the chat template failed on these messages: {e}", "messages")
        ) from None


async def create_chat_completion(
    req: ChatCompletionRequest, request: Request, state: ServerState
) -> Response:
    bridge.check_chat_request(req, state)
    state.client.check_admission()
    ids = await state.in_tokenizer_thread(render_chat, req.messages, req.add_generation_prompt, state)
    bridge.check_prompt_ids(ids, state.vocab_size, "messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    bridge.check_context(len(ids), max_tokens, state.max_seq_len, chat=True)
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    params = bridge.sampling_params(req, state, max_tokens=max_tokens, logprobs=top_n)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    fmt = bridge.LogprobFormatter(state.llm.tokenizer, top_n or 0)
    gens = [state.client.generate(rid, ids, params)]
    if req.stream:
        primed = Primed(merge(gens))
        try:
            await unless_disconnected(request, primed.prime())
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        return EventStreamResponse(_stream(req, rid, len(ids), primed, fmt, state))
    try:
        (final,) = await unless_disconnected(request, collect(gens))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=fmt.chat(c.token_ids, c.logprobs or []) if top_n is not None else None,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        for c in final.outputs
    ]
    resp = ChatCompletionResponse(
        id=rid, model=state.model_name, choices=choices, usage=bridge.usage([len(ids)], [final])
    )
    return JSONResponse(resp.model_dump(mode="json"))


async def _stream(
    req: ChatCompletionRequest,
    rid: str,
    prompt_len: int,
    stream: Primed,
    fmt: bridge.LogprobFormatter,
    state: ServerState,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    exclude = None if include_usage else {"usage"}
    n = req.n
    sent_text, sent_tokens = [0] * n, [0] * n
    started, finished = [False] * n, [False] * n
    final: RequestOutput | None = None

    def chunk(choice: ChatStreamChoice) -> bytes:
        return event(
            ChatCompletionChunk(id=rid, created=created, model=state.model_name, choices=[choice]), exclude
        )

    try:
        async for _pi, out in stream:
            if out.finished:
                final = out
            for c in out.outputs:
                i = c.index
                if finished[i]:
                    continue
                if not started[i]:  # OpenAI's first chunk of a choice carries the role
                    started[i] = True
                    yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
                text = c.text[sent_text[i] :]
                new_ids = c.token_ids[sent_tokens[i] :]
                logprobs = None
                if req.logprobs and new_ids:
                    entries = list((c.logprobs or [])[sent_tokens[i] : len(c.token_ids)])
                    logprobs = fmt.chat(new_ids[: len(entries)], entries)
                sent_text[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                done = c.finish_reason is not None
                finished[i] = done
                # an update with new tokens is sent even when they add no text yet (an incomplete
                # character, a possible stop string): the client sees each step's progress
                if not text and not new_ids and logprobs is None and not done:
                    continue
                yield chunk(
                    ChatStreamChoice(
                        index=i,
                        delta=DeltaMessage(content=text) if text or not done else DeltaMessage(),
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        if include_usage and final is not None:
            yield event(
                ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=state.model_name,
                    choices=[],
                    usage=bridge.usage([prompt_len], [final]),
                )
            )
    except Exception as e:  # noqa: BLE001 - mid-stream: an error event, then [DONE]
        yield event(as_api_error(e).body())
    finally:
        # closed at a yield (client gone while a chunk was being sent): `async for` leaves ``stream``
        # open, and only closing it aborts the engine requests now rather than when it is collected
        await stream.aclose()
    yield DONE
