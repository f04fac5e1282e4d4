"""Exceptions raised at kiln's boundary. Each message says what was wrong and what is allowed."""

from __future__ import annotations


class KilnError(Exception):
    """Base of kiln's own errors."""


class InvalidRequestError(KilnError, ValueError):
    """A request (prompt or sampling parameters) was rejected; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the model's context window."""


class EngineDeadError(KilnError, RuntimeError):
    """The executor loop stopped after a fatal error; every waiting and later call gets this."""


class RequestFailedError(KilnError, RuntimeError):
    """One request failed inside the engine; other requests were not affected."""
