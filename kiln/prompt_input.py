"""A user's prompts and sampling params checked and turned into token ids, before anything is submitted.

Every check raises ``InvalidRequestError`` (a ValueError) saying what was wrong and what is allowed, so
a bad prompt in a batch fails the call while the engine and every other request go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kiln.errors import ContextLengthExceededError, InvalidRequestError
from kiln.sampling_params import SamplingParams
from kiln.tokenizer import Tokenizer

PromptType = str | list[int] | dict[str, Any]


def as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt or a list of them -> a list of prompts (a list of ints is one prompt of token ids)."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt of token ids
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidRequestError(
            "prompts must be a non-empty list of strings or token-id lists", param="prompt"
        )
    return list(prompts)


def as_params_list(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    num_prompts: int,
    default: Callable[[], SamplingParams],
) -> list[SamplingParams]:
    """One SamplingParams (``default()`` for None) for every prompt, or a list of one per prompt."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or default()] * num_prompts
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != num_prompts:
            raise ValueError(
                f"got {len(sampling_params)} sampling params for {num_prompts} prompts; "
                "pass one SamplingParams or one per prompt"
            )
        return list(sampling_params)
    raise InvalidRequestError(
        "sampling_params must be a SamplingParams or a list of them, one per prompt; "
        f"got {type(sampling_params).__name__}"
    )


def validate_params(params: list[SamplingParams]) -> None:
    """Check each distinct SamplingParams again: a field may have changed since construction."""
    for sp in {id(sp): sp for sp in params}.values():
        if not isinstance(sp, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be a SamplingParams, got {type(sp).__name__}")
        try:
            sp.validate()
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None


def prompt_token_ids(prompt: PromptType, tokenizer: Tokenizer) -> tuple[str | None, list[int]]:
    """(the prompt's text or None, its token ids): a string is tokenized, token ids are taken as they are."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
            if not isinstance(prompt, (list, tuple)):
                raise InvalidRequestError(
                    f"prompt_token_ids must be a list of token ids, got {type(prompt).__name__}",
                    param="prompt_token_ids",
                )
            prompt = list(prompt)
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
    if isinstance(prompt, str):
        if prompt == "":
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, list) and _all_token_ints(prompt):
        return None, list(prompt)
    if isinstance(prompt, list):
        at = next(i for i, t in enumerate(prompt) if not isinstance(t, int) or isinstance(t, bool))
        raise InvalidRequestError(
            f"a prompt's token ids must be ints, got {type(prompt[at]).__name__} ({prompt[at]!r}) "
            f"at index {at}",
            param="prompt",
        )
    raise InvalidRequestError(
        "a prompt must be a string, a list of token ids or a dict with 'prompt' or 'prompt_token_ids'; "
        f"got {type(prompt).__name__}",
        param="prompt",
    )


def check_request(
    ids: list[int], sp: SamplingParams, vocab_size: int, max_batch_size: int, max_seq_len: int
) -> None:
    """A tokenized request against the model and the engine's limits."""
    if not ids:
        raise InvalidRequestError("prompt must not be empty (it has no tokens)", param="prompt")
    if min(ids) < 0 or max(ids) >= vocab_size:  # two passes in C; the message's list only then
        bad = [t for t in ids if not 0 <= t < vocab_size]
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size}); got {bad[:5]}", param="prompt")
    for name, toks in (
        ("logit_bias", list(sp.logit_bias or {})),
        ("stop_token_ids", sp.stop_token_ids or []),
    ):
        bad = [t for t in toks if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"{name} token ids must be in [0, {vocab_size}); got {bad[:5]}", name)
    if sp.n > max_batch_size:
        raise InvalidRequestError(f"n must be <= max_batch_size ({max_batch_size}), got {sp.n}", "n")
    budget = len(ids) + (sp.max_tokens or 1)
    if len(ids) >= max_seq_len or budget > max_seq_len:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
            f"{budget} tokens ({len(ids)} in the prompt, {sp.max_tokens or 1} for the completion). "
            "Please reduce the length of the prompt or the completion.",
            param="max_tokens" if len(ids) < max_seq_len else "prompt",
        )


def text_content(message: Any) -> Any:
    """A chat message whose content is a list of OpenAI text parts, with the parts joined into one
    string (as the server does): chat templates expect a string."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"a message's content must be a string or a list of {{'type': 'text', 'text': str}} parts; "
                f"got a part of type {kind!r}",
                param="messages",
            )
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def _all_token_ints(values: list[Any]) -> bool:
    """Every value an int and none a bool. The common case (plain ints) is one pass in C; only
    a list holding something else is checked value by value (int subclasses other than bool pass)."""
    if set(map(type, values)) <= {int}:
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in values)
