"""OpenAI request fields -> kiln inputs (token ids, SamplingParams), kiln outputs -> OpenAI fields.

Everything here is synchronous and pure except for the tokenizer calls, which the routes run in the
tokenizer thread. Every rejection is an APIError with the field that caused it.
"""

from __future__ import annotations

from typing import Any

from kiln.outputs import CompletionOutput, LogprobsDict, RequestOutput
from kiln.sampling_params import SamplingParams
from kiln.serve.errors import APIError, bad_request, from_engine_error, unsupported
from kiln.serve.protocol import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from kiln.serve.state import ServerState

_SUPPORTED_ROLES = ("system", "developer", "user", "assistant")

# OpenAI allows 4 stop strings. Every stop string is searched for in each sequence's new text on the
# engine's output thread, which serves all requests, and the longest one is held back while streaming:
# an unbounded list slows everyone. 16 strings of up to 1,000 characters cover real uses (end markers,
# code fences, few-shot separators) at a negligible cost.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1000


# ------------------------------------------------------------------------------------ request -> kiln


def check_common(req: CompletionRequest | ChatCompletionRequest, state: ServerState) -> None:
    """Checks shared by both endpoints that need no tokenizer."""
    state.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    if req.n > state.config.max_n:
        raise bad_request(f"n must be <= {state.config.max_n} on this server, got {req.n}.", "n")
    check_stop(req.stop)


def check_stop(stop: str | list[str] | None) -> None:
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop may have at most {MAX_STOP_STRINGS} strings, got {len(stops)}.", "stop")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_STRING_CHARS:
            raise bad_request(
                f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters long; "
                f"stop[{i}] has {len(s)}.",
                "stop",
            )


def check_completion_request(req: CompletionRequest, state: ServerState) -> None:
    check_common(req, state)
    if req.best_of is not None and req.best_of != req.n:
        raise unsupported("best_of", "only best_of equal to n (or unset) is accepted")
    if req.suffix:
        raise unsupported("suffix", "insertion is not implemented")
    if req.logprobs is not None and req.logprobs > state.config.max_logprobs:
        raise bad_request(
            f"logprobs must be <= {state.config.max_logprobs} on this server, got {req.logprobs}.", "logprobs"
        )


# Unimplemented chat fields and the values that mean "not used" (accepted, since they change nothing).
_CHAT_NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


def check_chat_request(req: ChatCompletionRequest, state: ServerState) -> None:
    check_common(req, state)
    for name, noop in _CHAT_NOOP_VALUES.items():
        if getattr(req, name) not in noop:
            raise unsupported(name)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        limit = state.config.max_logprobs
        if req.top_logprobs > limit:
            raise bad_request(
                f"top_logprobs must be <= {limit} on this server, got {req.top_logprobs}.", "top_logprobs"
            )
    for i, m in enumerate(req.messages):
        if m.role not in _SUPPORTED_ROLES:
            raise unsupported(f"messages[{i}].role", f"role '{m.role}': tool calling is not implemented")
        for name in ("tool_calls", "tool_call_id", "function_call"):
            if getattr(m, name) is not None:
                raise unsupported(f"messages[{i}].{name}", "tool calling is not implemented")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them (content flattened to text)."""
    out = []
    for m in messages:
        # "developer" is OpenAI's newer name for "system"; chat templates know only "system"
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def check_prompt_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    if not ids:
        raise bad_request(f"{param} must not be empty.", param)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"{param} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.", param
        )


def check_context(prompt_len: int, max_tokens: int | None, max_seq_len: int, chat: bool) -> None:
    """OpenAI's context-length error: prompt + completion must fit in the model's context."""
    where, fix = ("in the messages", "messages") if chat else ("in your prompt", "prompt")
    # A prompt that alone fills the context is the prompt's fault, whatever max_tokens says.
    if prompt_len >= max_seq_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_seq_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the {fix}.",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_len + max_tokens > max_seq_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} {where}, {max_tokens} for the completion). "
            f"Please reduce the length of the {fix} or completion.",
            param="messages" if chat else "max_tokens",
            code="context_length_exceeded",
        )


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    state: ServerState,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """SamplingParams of a request; unset fields take the model's generation_config defaults."""
    defaults = state.llm.default_sampling_params() if hasattr(state.llm, "default_sampling_params") else None

    def pick(value: Any, name: str) -> Any:
        if value is not None:
            return value
        return getattr(defaults, name) if defaults is not None else getattr(SamplingParams, name)

    bias: dict[int, float] | None = None
    if req.logit_bias is not None:
        bias = {}
        for key, value in req.logit_bias.items():
            try:
                tok = int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias") from None
            if not 0 <= tok < state.vocab_size:
                raise bad_request(
                    f"logit_bias has a token id outside the vocabulary [0, {state.vocab_size}): {tok}.",
                    "logit_bias",
                )
            bias[tok] = value
    for tok in req.stop_token_ids or []:
        if not 0 <= tok < state.vocab_size:
            raise bad_request(
                f"stop_token_ids has a token id outside the vocabulary [0, {state.vocab_size}): {tok}.",
                "stop_token_ids",
            )
    try:
        return SamplingParams(
            n=req.n,
            temperature=pick(req.temperature, "temperature"),
            top_k=pick(req.top_k, "top_k"),
            top_p=pick(req.top_p, "top_p"),
            min_p=pick(req.min_p, "min_p"),
            seed=req.seed,
            repetition_penalty=pick(req.repetition_penalty, "repetition_penalty"),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=bias,
            min_tokens=req.min_tokens,
            max_tokens=max_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as e:
        param_map = {"logprobs": "top_logprobs"} if isinstance(req, ChatCompletionRequest) else None
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            param_map = {**(param_map or {}), "max_tokens": "max_completion_tokens"}
        raise from_engine_error(e, param_map) from None


# ------------------------------------------------------------------------------------ kiln -> response


def usage(prompt_lens: list[int], finals: list[RequestOutput]) -> Usage:
    prompt = sum(prompt_lens)
    completion = sum(len(c.token_ids) for r in finals for c in r.outputs)
    cached = sum(r.num_cached_tokens for r in finals)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


class LogprobFormatter:
    """Turns kiln's per-position {token id: logprob} dicts into OpenAI's two logprob formats."""

    def __init__(self, tokenizer: Any, top_n: int) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}
        self.top_n = top_n

    def token(self, tid: int) -> str:
        s = self._cache.get(tid)
        if s is None:
            s = self._tok.decode([tid], skip_special_tokens=False)
            if len(self._cache) < 200_000:
                self._cache[tid] = s
        return s

    def _top(self, d: LogprobsDict) -> list[tuple[int, float]]:
        # The dict holds the sampled token plus the top-N: the N best of it are the top-N.
        return sorted(d.items(), key=lambda kv: -kv[1])[: self.top_n]

    def completion(
        self, token_ids: list[int], entries: list[LogprobsDict | None], text_offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """Logprobs of ``token_ids`` (entry None: no logprob, e.g. the first prompt token); returns the
        object and the text offset after the last token."""
        out = CompletionLogprobs()
        for tid, d in zip(token_ids, entries, strict=True):
            s = self.token(tid)
            out.tokens.append(s)
            out.text_offset.append(text_offset)
            text_offset += len(s)
            if d is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(d.get(tid, 0.0)))
            top: dict[str, float] = {}
            for t, lp in self._top(d):  # best first: two ids with the same text keep the better logprob
                top.setdefault(self.token(t), _finite(lp))
            out.top_logprobs.append(top)
        return out, text_offset

    def chat(self, token_ids: list[int], entries: list[LogprobsDict]) -> ChatLogprobs:
        content = []
        for tid, d in zip(token_ids, entries, strict=True):
            s = self.token(tid)
            content.append(
                TokenLogprob(
                    token=s,
                    logprob=_finite(d.get(tid, 0.0)),
                    bytes=list(s.encode("utf-8")),
                    top_logprobs=[
                        TopLogprob(
                            token=(t := self.token(k)), logprob=_finite(lp), bytes=list(t.encode("utf-8"))
                        )
                        for k, lp in self._top(d)
                    ],
                )
            )
        return ChatLogprobs(content=content)


def _finite(x: float) -> float:
    # JSON has no -inf: OpenAI clients expect a number; -9999.0 is the conventional floor.
    return x if x > -9999.0 else -9999.0


def choice_index(prompt_index: int, n: int, seq_index: int) -> int:
    return prompt_index * n + seq_index


def sequence_finished(c: CompletionOutput) -> bool:
    return c.finish_reason is not None
