"""Logging: one INFO line per finished request and a periodic engine status line."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kiln.serve.engine_client import RequestRecord

logger = logging.getLogger("kiln.serve")


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def log_request(rec: RequestRecord) -> None:
    reasons = ",".join(sorted(set(rec.finish_reasons)))
    logger.info(
        "request %s: prompt=%d (cached %d) completion=%d ttft=%s duration=%s finish=%s",
        rec.request_id,
        rec.prompt_tokens,
        rec.cached_tokens,
        rec.completion_tokens,
        _secs(rec.ttft),
        _secs(rec.e2e),
        reasons,
    )


async def status_loop(llm: Any, interval: float) -> None:
    """Every ``interval`` seconds: running, waiting, KV usage and token rates (quiet while idle)."""
    last = llm.stats()
    last_t = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        if not llm.is_alive():
            logger.warning("engine status: the engine loop is dead")
            continue
        s = llm.stats()
        now = time.monotonic()
        dt = max(now - last_t, 1e-9)
        prompt_rate = (s.prompt_tokens_total - last.prompt_tokens_total) / dt
        gen_rate = (s.generation_tokens_total - last.generation_tokens_total) / dt
        busy = s.num_running or s.num_waiting or prompt_rate or gen_rate
        if busy:
            hits = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
            logger.info(
                "engine: running=%d waiting=%d kv=%.1f%% prompt=%.1f tok/s generation=%.1f tok/s "
                "prefix-hit=%.1f%% preemptions=%d",
                s.num_running,
                s.num_waiting,
                100 * s.kv_usage,
                prompt_rate,
                gen_rate,
                100 * hits,
                s.num_preemptions,
            )
        last, last_t = s, now
