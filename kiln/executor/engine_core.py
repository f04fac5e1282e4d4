"""EngineCore: scheduler -> model engine -> decoder, step after step; and the loop that drives it.

Each ``step()`` launches the next step (schedule, forward, sampling, the results' copy to the host
started), then, once ``depth`` steps are in flight or nothing new could be launched, waits for the
oldest and applies its output. Depth 1 runs one step at a time. Depth 2 is overlap scheduling: step
N+1 is scheduled and launched while the device still runs step N, its decode input tokens read from
step N's sampled tokens on the device; the host then waits for step N and applies it. The scheduler
keeps freed KV blocks back for one step (``free_delay_steps=1``) so none is reused while in flight.

The loop is the same in a thread (CPU, tests) and in a worker process (the GPU default): it only
sees two callables, ``receive(block)`` for incoming messages and ``send(msg)`` for outgoing ones.
Messages in: ("add", Request, ...) | ("abort", request_id, seq_index, reason, stop_reason) | ("shutdown",).
Messages out: ("ready", info) | ("updates", [SequenceUpdate], EngineStats) | ("fatal", text).
"""

from __future__ import annotations

import os
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from kiln.config import EngineLimits, KvCacheConfig, SchedulerConfig
from kiln.engine.late_compiles import LateCompileWatch
from kiln.engine.token_budget import default_max_num_tokens
from kiln.executor.gc_policy import GcPauses, IdleFullCollections
from kiln.executor.host_profile import engine_loop_profile
from kiln.executor.messages import PromptLogprobs, Request, ScheduledBatch, SequenceUpdate
from kiln.executor.stats import EngineStats

if TYPE_CHECKING:
    from kiln.engine.decoder import Decoder, SampledStep


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
    piecewise_graphs: bool = True  # prefill / mixed steps through piecewise graphs (with cuda_graphs)
    overlap_scheduling: bool = False  # schedule and launch step N+1 while the device runs step N
    compile: bool | None = None  # torch.compile the decoder layers; None = on CUDA only
    # no max_num_tokens was given: the engine picks its card's (whole GEMM waves) in place of the limits'
    budget_from_device: bool = False


@dataclass
class _Launched:
    """A step launched on the device whose output the scheduler has not applied yet."""

    batch: ScheduledBatch
    sampled: SampledStep
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    schedule_time: float = 0.0
    launch_time: float = 0.0  # host time to enqueue the forward and the sampling
    started: float = 0.0  # perf_counter when its scheduling began


class EngineCore:
    # Built and stepped in inference mode: no autograd bookkeeping, and torch's custom ops skip their
    # Python autograd and in-place/view layers (~10% of an eager step's host time). Callers that use
    # the engine's parts directly (profiling, tests) must do so in inference mode too.
    @torch.inference_mode()
    def __init__(self, cfg: EngineCoreConfig) -> None:
        from kiln.engine.decoder import Decoder
        from kiln.engine.model_engine import ModelEngine
        from kiln.executor.scheduler import Scheduler
        from kiln.plugins import PluginSet

        if cfg.budget_from_device:  # asked here, in the engine's process: the front end opens no CUDA context
            budget = default_max_num_tokens(torch.device(cfg.device), cfg.limits.max_batch_size)
            cfg = replace(cfg, limits=replace(cfg.limits, max_num_tokens=budget), budget_from_device=False)
        self.cfg = cfg
        warmed: list[Decoder] = []

        def build_sampler(vocab_size: int, device: torch.device) -> None:
            # built and warmed up at the largest batch inside the KV-sizing warm-up (GPU), so the
            # sampler's peak workspace is counted before the KV pool takes the rest
            warmed.append(Decoder(cfg.limits.max_batch_size, vocab_size, device))
            warmed[0].warm_up()

        self.engine = ModelEngine(
            cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            limits=cfg.limits,
            kv_config=cfg.kv_config,
            plugins=PluginSet(cfg.plugin_backend, cfg.plugins),
            cuda_graphs=cfg.cuda_graphs,
            piecewise_graphs=cfg.piecewise_graphs,
            compile=cfg.compile,
            sampler_warm_up=build_sampler,
        )
        # the KV-sizing warm-up did not run (CPU, or a fixed KV size): build the sampler now, and on the
        # GPU warm it up all the same, or its kernels would compile at the first steps
        if not warmed:
            warmed.append(Decoder(cfg.limits.max_batch_size, self.engine.vocab_size, self.engine.device))
            if self.engine.device.type == "cuda":
                warmed[0].warm_up()
        self.decoder = warmed[0]
        self.scheduler = Scheduler(
            cfg.scheduler_config,
            cfg.limits,
            num_blocks=self.engine.num_blocks,
            tokens_per_block=cfg.kv_config.tokens_per_block,
            enable_block_reuse=cfg.kv_config.enable_block_reuse,
            seed=cfg.seed,
            # a step in flight may still write the blocks its sequences held: keep them back one step
            free_delay_steps=1 if cfg.overlap_scheduling else 0,
        )
        self.depth = 2 if cfg.overlap_scheduling else 1  # steps in flight before the oldest is applied
        self._launched: deque[_Launched] = deque()
        self.stats = EngineStats()
        self._gc = GcPauses()
        self._late_compiles = LateCompileWatch()  # start-up is over: every kernel should exist
        self._late_compiles.arm()
        self._compiles_logged = 0
        # KILN_STEP_LOG=FILE: one tab-separated line per step, to see which steps are slow and why
        self._step_log = _open_step_log(os.environ.get("KILN_STEP_LOG"))

    def info(self) -> dict[str, Any]:
        return {
            "vocab_size": int(self.engine.vocab_size),
            "num_blocks": int(self.engine.num_blocks),
            "num_free_blocks": int(self.scheduler.stats().num_free_blocks),  # at start: every usable block
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).replace("torch.", ""),
            "compile_seconds": float(self.engine.compile_seconds),
            "cuda_graph_capture_seconds": float(getattr(self.engine.graphs, "capture_seconds", 0.0))
            + float(getattr(self.engine.pieces, "capture_seconds", 0.0)),
            "warm_up_seconds": float(self.engine.warm_up_seconds),
            "max_num_tokens": int(self.cfg.limits.max_num_tokens),
            "plugins": {kind: name for kind, (name, _) in self.engine.plugins.choice.items()},  # this card's
        }

    def add_request(self, req: Request) -> list[SequenceUpdate]:
        try:
            self.scheduler.add_request(req)
        except ValueError as e:  # a bad request fails alone
            return [
                SequenceUpdate(
                    req.request_id,
                    0,
                    [],
                    [],
                    finished=True,
                    finish_reason="abort",
                    error=str(e),
                    rejected=True,
                )
            ]
        return []

    def abort(
        self, request_id: str, seq_index: int | None, reason: str, stop_reason: str | None
    ) -> list[SequenceUpdate]:
        ups = self.scheduler.abort(request_id, seq_index=seq_index, reason=reason, stop_reason=stop_reason)
        self._release_blocks_if_idle()
        return ups

    def _release_blocks_if_idle(self) -> None:
        """Freed blocks wait a step before reuse while a step in flight may write them (overlap); with
        none in flight they are free at once, and an idle engine reports its whole pool free."""
        if not self._launched:
            self.scheduler.kv.pool.release_pending()

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._launched)

    @torch.inference_mode()
    def step(self) -> list[SequenceUpdate]:
        """Launch the next step; apply the oldest in flight once ``depth`` are (or none could launch)."""
        t0 = time.perf_counter()
        launched = self._launch()
        if not self._launched or (launched and len(self._launched) < self.depth):
            return []
        return self._apply(self._launched.popleft(), t0)

    def _launch(self) -> bool:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        t1 = time.perf_counter()
        if batch.reads_prev_samples:
            prev = self._launched[-1] if self._launched else None
            if prev is None or prev.batch.step_id != batch.step_id - 1:
                raise RuntimeError(f"step {batch.step_id} reads the sampled tokens of a step not in flight")
            fwd = self.engine.forward(batch, prev_sampled=prev.sampled.tokens)
        else:
            fwd = self.engine.forward(batch)
        sampled = self.decoder.sample_async(fwd.logits, batch, fwd.greedy)
        self._launched.append(
            _Launched(batch, sampled, fwd.prompt_logprobs, t1 - t0, time.perf_counter() - t1, t0)
        )
        return True

    def _apply(self, step: _Launched, t0: float) -> list[SequenceUpdate]:
        tw = time.perf_counter()
        out = step.sampled.result()  # the step's one device -> host copy: waits for the device
        out.prompt_logprobs = step.prompt_logprobs
        t1 = time.perf_counter()
        updates = self.scheduler.update(step.batch, out)
        self._release_blocks_if_idle()
        t2 = time.perf_counter()
        self._record(step, updates, t2 - t0, step.schedule_time + (t2 - t1), t1 - tw, t2 - step.started)
        return updates

    def refresh_stats(self) -> EngineStats:
        s, sched = self.stats, self.scheduler.stats()
        s.num_running, s.num_waiting = sched.num_running, sched.num_waiting
        s.kv_usage, s.num_free_blocks = float(sched.kv_usage), int(sched.num_free_blocks)
        s.prefix_cache_queries, s.prefix_cache_hits = int(sched.prefix_queries), int(sched.prefix_hits)
        s.num_preemptions = int(sched.num_preemptions)
        return s

    def _record(
        self,
        step: _Launched,
        updates: list[SequenceUpdate],
        step_time: float,
        host_time: float,
        wait_time: float,
        span: float,
    ) -> None:
        batch = step.batch
        s = self.refresh_stats()
        s.prompt_tokens_total += batch.num_tokens - batch.num_decode
        # tokens delivered: one computed for a sequence that finished meanwhile is dropped, not counted
        s.generation_tokens_total += sum(len(up.new_token_ids) for up in updates)
        s.steps += 1
        s.last_step_time, s.last_host_time = step_time, host_time
        s.step_time_total += step_time
        s.host_time_total += host_time
        s.device_wait_total += wait_time
        gc_time = self._gc.since_last_read()
        s.gc_time_total += gc_time
        compiles = self._late_compiles.count - self._compiles_logged
        self._compiles_logged = s.late_kernel_compiles = self._late_compiles.count
        if batch.num_decode == batch.num_seqs:
            s.decode_steps += 1
            s.decode_step_time_total += step_time
        else:
            s.mixed_step_span_total += span
        s.last_batch_size, s.last_num_tokens = batch.num_seqs, batch.num_tokens
        if self._step_log is not None:
            self._step_log.write(
                f"{batch.step_id}\t{time.time():.6f}\t{batch.num_seqs}\t{batch.num_decode}\t{batch.num_tokens}\t"
                f"{1e3 * step_time:.3f}\t{1e3 * host_time:.3f}\t{1e3 * wait_time:.3f}\t{1e3 * gc_time:.3f}\t"
                f"{1e3 * step.launch_time:.3f}\t{compiles}\n"
            )

    def close(self) -> None:
        self._gc.close()
        self._late_compiles.close()
        self.engine.close()
        if self._step_log is not None:
            self._step_log.close()
            self._step_log = None


# gc_ms: the cyclic garbage collector's time since the previous line (it pauses the whole loop);
# launch_ms: this step's forward and sampling launches; compiles: Triton kernels compiled since then
_STEP_LOG_COLUMNS = (
    "step unix_time seqs decode_seqs tokens step_ms host_ms device_wait_ms gc_ms launch_ms compiles".split()
)
_STEP_LOG_HEADER = "\t".join(_STEP_LOG_COLUMNS) + "\n"


def _open_step_log(path: str | None) -> Any:
    if not path:
        return None
    f = open(path, "a", buffering=1)  # line-buffered: a killed run keeps its lines  # noqa: SIM115
    if f.tell() == 0:
        f.write(_STEP_LOG_HEADER)
    return f


Receive = Callable[[bool], list[tuple[Any, ...]]]
Send = Callable[[tuple[Any, ...]], None]


def run_engine_loop(
    core: EngineCore, receive: Receive, send: Send, gc_policy: IdleFullCollections | None = None
) -> None:
    """Serve messages and step until shutdown. A step that raises is fatal: every caller hears of it.

    ``gc_policy`` (the engine process only): full garbage collections move to the idle moments.
    ``KILN_HOST_PROFILE=FILE`` profiles the loop (host_profile.py)."""
    with engine_loop_profile():
        _serve(core, receive, send, gc_policy)


# A step's updates carry the engine's stats at most this often, and always when a request finishes or
# the loop runs out of work: encoding them costs the worker ~12 us of held GIL a message, a few
# percent of a small model's step at batch 1.
STATS_INTERVAL_S = 0.1


def _serve(core: EngineCore, receive: Receive, send: Send, gc_policy: IdleFullCollections | None) -> None:
    stats_sent = 0.0
    try:
        while True:
            busy = core.has_work()
            if gc_policy is not None and not busy:
                gc_policy.on_idle()
            t0 = time.perf_counter()
            msgs = receive(not busy)
            if busy:  # a blocking wait for requests while idle is no overhead
                core.stats.loop_io_time_total += time.perf_counter() - t0
            updates: list[SequenceUpdate] = []
            aborted = False
            for msg in msgs:
                kind = msg[0]
                if kind == "shutdown":
                    return
                if kind == "add":
                    for req in msg[1:]:
                        updates += core.add_request(req)
                elif kind == "abort":
                    updates += core.abort(*msg[1:])
                    aborted = True
                else:
                    raise ValueError(f"unknown executor message {kind!r}")
            # Admissions and aborts change the stats too. Admissions' news rides with the step they let
            # run: a write of its own before that step's launch cost ~0.1 ms of time to first token. An
            # abort's goes out at once, before another step, as does any news with nothing to step.
            news = bool(msgs)
            if news and (aborted or not core.has_work()):
                send(("updates", updates, core.refresh_stats()))
                updates, news = [], False
            if core.has_work():
                updates += core.step()
                if gc_policy is not None:
                    gc_policy.on_busy_step()
                t1 = time.perf_counter()
                if news:
                    send(("updates", updates, core.refresh_stats()))
                    stats_sent = t1
                elif (
                    t1 - stats_sent >= STATS_INTERVAL_S
                    or not core.has_work()
                    or any(u.finished for u in updates)
                ):
                    send(("updates", updates, core.stats))
                    stats_sent = t1
                else:
                    send(("updates", updates, None))  # the front end keeps the last stats it had
                core.stats.loop_io_time_total += time.perf_counter() - t1
    except Exception:  # noqa: BLE001 - reported to every waiting caller, then the loop ends
        send(("fatal", traceback.format_exc()))
