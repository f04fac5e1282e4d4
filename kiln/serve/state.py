"""ServerState: what every route shares (the engine, its client, limits, metrics)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kiln.serve.config import ServeConfig
from kiln.serve.engine_client import EngineClient
from kiln.serve.errors import NOT_FOUND, APIError

T = TypeVar("T")


@dataclass
class ServerState:
    llm: Any  # kiln.LLM or anything with its interface
    config: ServeConfig
    client: EngineClient
    metrics: Any  # kiln.serve.metrics.ServerMetrics
    model_name: str
    max_seq_len: int
    vocab_size: int
    started: float = field(default_factory=time.time)
    # One thread: tokenizing and chat templates leave the event loop, and the tokenizer is never
    # used by two of our threads at once.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-tokenize")
    )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                NOT_FOUND,
                "model",
                "model_not_found",
            )

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_pool, lambda: fn(*args, **kwargs))
