"""Tokenizer: HF AutoTokenizer behind a small interface, plus incremental detokenization."""

from __future__ import annotations

import os
from typing import Any

from kiln.errors import InvalidRequestError

# How many prompt tokens seed a detokenizer: enough context for tokenizers (SentencePiece) whose
# decoding of a token depends on its left neighbour.
_CONTEXT_TOKENS = 5
# Files one of which a directory needs for AutoTokenizer to load a tokenizer from it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class Tokenizer:
    """Wraps a Hugging Face tokenizer loaded from a model directory (or a tokenizer directory)."""

    def __init__(
        self, path: str, eos_token_ids: tuple[int, ...] = (), trust_remote_code: bool = False
    ) -> None:
        # Without any tokenizer file HF's error talks about sentencepiece and tiktoken instead.
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            raise ValueError(f"no tokenizer found in {path!r} (tokenizer.json or tokenizer_config.json)")
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - re-raised with the path and the cause
            raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e
        ids = list(eos_token_ids)
        if self.hf.eos_token_id is not None and self.hf.eos_token_id not in ids:
            ids.append(self.hf.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(ids)
        self.vocab_size: int = len(self.hf)
        # The Rust tokenizer behind a fast HF tokenizer streams exactly what decode() gives, unless
        # decode() also cleans up spaces afterwards; then the windowed detokenizer is used instead.
        backend = getattr(self.hf, "backend_tokenizer", None)
        cleans_up = bool(getattr(self.hf, "clean_up_tokenization_spaces", False))
        self.stream_backend: Any = backend if backend is not None and not cleans_up else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        if chat_template is None and not getattr(self.hf, "chat_template", None):
            raise InvalidRequestError(
                "this model's tokenizer has no chat template; pass chat_template= (a Jinja template) "
                "or use plain completions",
                param="messages",
            )
        try:
            out: Any = self.hf.apply_chat_template(
                messages,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                **kwargs,
            )
        except Exception as e:  # noqa: BLE001 - template errors are the caller's input errors
            raise InvalidRequestError(
                f"could not apply the chat template to these messages: {e}", "messages"
            ) from e
        if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
            out = out["input_ids"]
        return [int(t) for t in out]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Invariant: the concatenation of everything ``add`` and ``flush`` returned equals the decoded
    text of all output tokens (decoded with the prompt's last tokens as left context).
    With a fast tokenizer the Rust ``DecodeStream`` does the work (one call per token); otherwise a
    window of ids is decoded twice per step, and text is emitted once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the window decoded for context
        self._read = len(self._ids)  # tokens before this are already emitted
        self._stream: Any = None
        self._outputs: list[int] = []  # stream path: every output id, for the final flush
        self._pieces: list[str] = []  # stream path: everything emitted
        if tokenizer.stream_backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=list(self._ids), skip_special_tokens=skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, new_ids: list[int]) -> str:
        if self._stream is not None:
            backend = self._tok.stream_backend
            self._outputs.extend(new_ids)
            text = "".join(p for t in new_ids if (p := self._stream.step(backend, t)))
            if text:
                self._pieces.append(text)
            return text
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        # A trailing U+FFFD means a multi-byte character is incomplete: wait for more tokens.
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (possibly a replacement character)."""
        if self._stream is not None:  # the stream holds back an incomplete character: decode once
            emitted, full = "".join(self._pieces), self._decode(self._outputs)
            if not full.startswith(emitted):
                return ""
            self._pieces = [full]
            return full[len(emitted) :]
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""
