"""EngineCore: scheduler -> model engine -> decoder, one step at a time; and the loop that drives it.

The loop is the same in a thread (CPU, tests) and in a worker process (the GPU default): it only
sees two callables, ``receive(block)`` for incoming messages and ``send(msg)`` for outgoing ones.
Messages in: ("add", Request) | ("abort", request_id, seq_index, reason, stop_reason) | ("shutdown",).
Messages out: ("ready", info) | ("updates", [SequenceUpdate], EngineStats) | ("fatal", text).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.config import EngineLimits, KvCacheConfig, SchedulerConfig
from kiln.executor.messages import Request, ScheduledBatch, SequenceUpdate
from kiln.executor.stats import EngineStats


@dataclass
class EngineCoreConfig:
    """Everything a worker needs to build its engine; travels to the worker process as msgpack."""

    model: str
    dtype: str
    device: str
    limits: EngineLimits
    kv_config: KvCacheConfig
    scheduler_config: SchedulerConfig
    seed: int = 0
    plugin_backend: str = "reference"
    plugins: dict[str, str] | None = None
    cuda_graphs: bool = True


class EngineCore:
    def __init__(self, cfg: EngineCoreConfig) -> None:
        from kiln.engine.decoder import Decoder
        from kiln.engine.model_engine import ModelEngine
        from kiln.executor.scheduler import Scheduler
        from kiln.plugins import PluginSet

        self.cfg = cfg
        self.engine = ModelEngine(
            cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            limits=cfg.limits,
            kv_config=cfg.kv_config,
            plugins=PluginSet(cfg.plugin_backend, cfg.plugins),
            cuda_graphs=cfg.cuda_graphs,
        )
        self.decoder = Decoder(cfg.limits.max_batch_size, self.engine.vocab_size, self.engine.device)
        self.scheduler = Scheduler(
            cfg.scheduler_config,
            cfg.limits,
            num_blocks=self.engine.num_blocks,
            tokens_per_block=cfg.kv_config.tokens_per_block,
            enable_block_reuse=cfg.kv_config.enable_block_reuse,
            seed=cfg.seed,
        )
        self.stats = EngineStats()

    def info(self) -> dict[str, Any]:
        return {
            "vocab_size": int(self.engine.vocab_size),
            "num_blocks": int(self.engine.num_blocks),
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).replace("torch.", ""),
        }

    def add_request(self, req: Request) -> list[SequenceUpdate]:
        try:
            self.scheduler.add_request(req)
        except ValueError as e:  # a bad request fails alone
            return [
                SequenceUpdate(req.request_id, 0, [], [], finished=True, finish_reason="abort", error=str(e))
            ]
        return []

    def abort(
        self, request_id: str, seq_index: int | None, reason: str, stop_reason: str | None
    ) -> list[SequenceUpdate]:
        return self.scheduler.abort(request_id, seq_index=seq_index, reason=reason, stop_reason=stop_reason)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[SequenceUpdate]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        t1 = time.perf_counter()
        fwd = self.engine.forward(batch)
        out = self.decoder.sample(fwd.logits, batch)  # the step's one device -> host copy
        out.prompt_logprobs = fwd.prompt_logprobs
        t2 = time.perf_counter()
        updates = self.scheduler.update(batch, out)
        t3 = time.perf_counter()
        self._record(batch, t3 - t0, (t1 - t0) + (t3 - t2))
        return updates

    def refresh_stats(self) -> EngineStats:
        s, sched = self.stats, self.scheduler.stats()
        s.num_running, s.num_waiting = sched.num_running, sched.num_waiting
        s.kv_usage, s.num_free_blocks = float(sched.kv_usage), int(sched.num_free_blocks)
        s.prefix_cache_queries, s.prefix_cache_hits = int(sched.prefix_queries), int(sched.prefix_hits)
        s.num_preemptions = int(sched.num_preemptions)
        return s

    def _record(self, batch: ScheduledBatch, step_time: float, host_time: float) -> None:
        s = self.refresh_stats()
        s.prompt_tokens_total += batch.num_tokens - batch.num_decode
        s.generation_tokens_total += batch.num_samples
        s.steps += 1
        s.last_step_time, s.last_host_time = step_time, host_time
        s.last_batch_size, s.last_num_tokens = batch.num_seqs, batch.num_tokens

    def close(self) -> None:
        self.engine.close()


Receive = Callable[[bool], list[tuple[Any, ...]]]
Send = Callable[[tuple[Any, ...]], None]


def run_engine_loop(core: EngineCore, receive: Receive, send: Send) -> None:
    """Serve messages and step until shutdown. A step that raises is fatal: every caller hears of it."""
    try:
        while True:
            msgs = receive(not core.has_work())
            updates: list[SequenceUpdate] = []
            for msg in msgs:
                kind = msg[0]
                if kind == "shutdown":
                    return
                if kind == "add":
                    updates += core.add_request(msg[1])
                elif kind == "abort":
                    updates += core.abort(*msg[1:])
                else:
                    raise ValueError(f"unknown executor message {kind!r}")
            if msgs:  # stats change with admissions and aborts too, not only with steps
                send(("updates", updates, core.refresh_stats()))
            if core.has_work():
                updates = core.step()
                send(("updates", updates, core.stats))
    except Exception:  # noqa: BLE001 - reported to every waiting caller, then the loop ends
        send(("fatal", traceback.format_exc()))
