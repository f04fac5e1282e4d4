"""Executor clients: the same submit/abort/shutdown interface over a thread or a worker process."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from kiln.executor import codec
from kiln.executor.engine_core import EngineCore, EngineCoreConfig, run_engine_loop
from kiln.executor.gc_policy import IdleFullCollections
from kiln.executor.messages import Request

OnOutput = Callable[[tuple[Any, ...]], None]


class ExecutorClient(ABC):
    """Sends requests to the engine loop; the loop's outputs arrive through ``on_output``."""

    info: dict[str, Any]

    def submit(self, *reqs: Request) -> None:
        """One message for all of ``reqs``: the engine admits them together, before its next step."""
        self._send(("add", *reqs))

    def abort(
        self,
        request_id: str,
        seq_index: int | None = None,
        reason: str = "abort",
        stop_reason: str | None = None,
    ) -> None:
        self._send(("abort", request_id, seq_index, reason, stop_reason))

    @abstractmethod
    def _send(self, msg: tuple[Any, ...]) -> None: ...

    @abstractmethod
    def shutdown(self) -> None: ...


class ThreadExecutor(ExecutorClient):
    """The engine loop in a daemon thread of this process (CPU and tests)."""

    def __init__(self, cfg: EngineCoreConfig, on_output: OnOutput) -> None:
        self._core = EngineCore(cfg)  # built here so that construction errors reach the caller
        self.info = self._core.info()
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._thread = threading.Thread(
            target=run_engine_loop,
            args=(self._core, self._receive, on_output),
            name="kiln-engine",
            daemon=True,
        )
        self._thread.start()

    def _receive(self, block: bool) -> list[tuple[Any, ...]]:
        msgs = []
        try:
            msgs.append(self._inbox.get(block=block))
            while True:
                msgs.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return msgs

    def _send(self, msg: tuple[Any, ...]) -> None:
        self._inbox.put(msg)

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(("shutdown",))
            self._thread.join(timeout=30)
        self._core.close()


class _Outbox:
    """The worker's sending side: the loop encodes a message (a snapshot of its stats) and queues it; a
    thread writes it to the pipe. A front end that stops reading for a while (a full garbage
    collection over thousands of requests, a burst of detokenizing) fills the pipe's buffer; the
    writer then waits, and the engine keeps stepping instead of idling the device.

    A message with tokens is handed over: the loop waits until it is written, up to ``wait_s``
    (``KILN_OUTBOX_WAIT_MS``, default 2; 0 never waits), unless the writer is still busy with earlier
    messages (the pipe is full: a front end that lags costs the loop one wait, not one a step). Queued
    alone, its write waited for the GIL, which the loop holds while it launches
    the next step: 8B TTFT at ISL 2,048 spent 1.0-1.2 ms from the results to the front end on an H200,
    0.2-0.3 ms with the write done at once (benchmarks/NOTES.md)."""

    def __init__(self, conn: Any, wait_s: float | None = None) -> None:
        self._conn = conn
        if wait_s is None:
            wait_s = float(os.environ.get("KILN_OUTBOX_WAIT_MS", "2")) / 1e3
        self.wait_s = wait_s
        self._queue: queue.SimpleQueue[tuple[bytes, threading.Event | None] | None] = queue.SimpleQueue()
        self._queued = self._written = 0  # messages so far; each counter has one thread that writes it
        self._thread = threading.Thread(target=self._write, name="kiln-outbox", daemon=True)
        self._thread.start()

    def send(self, msg: tuple[Any, ...]) -> None:
        data = codec.encode(msg)
        idle = self._written == self._queued
        self._queued += 1
        if self.wait_s <= 0 or msg[0] != "updates" or not msg[1] or not idle:
            self._queue.put((data, None))
            return
        written = threading.Event()
        self._queue.put((data, written))
        written.wait(self.wait_s)  # releases the GIL: the writer takes it at once

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            data, written = item
            try:
                self._conn.send_bytes(data)
            except OSError:  # the front end is gone; nobody is left to tell
                return
            finally:
                self._written += 1
                if written is not None:
                    written.set()

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued (the last updates, a fatal error), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)


# The worker reads what has arrived for at most this long before the loop steps again: a burst of
# messages (LLM.generate sends 256 requests a message) is then admitted a few messages at a time
# between steps, instead of holding the first step until the last message is read and decoded.
RECEIVE_BUDGET_S = 0.002


def pipe_receiver(inbox: Any, budget_s: float = RECEIVE_BUDGET_S) -> Callable[[bool], list[tuple[Any, ...]]]:
    """The worker loop's ``receive`` over the front end's pipe: (wait for one message if ``block``) then
    what else has arrived, for at most ``budget_s``; a closed pipe reads as a shutdown."""

    def receive(block: bool) -> list[tuple[Any, ...]]:
        msgs = []
        try:
            if block or inbox.poll(0):
                msgs.append(tuple(codec.decode(inbox.recv_bytes())))
            deadline = time.perf_counter() + budget_s
            while time.perf_counter() < deadline and inbox.poll(0):
                msgs.append(tuple(codec.decode(inbox.recv_bytes())))
        except (EOFError, OSError):  # the front end is gone: stop
            msgs.append(("shutdown",))
        return msgs

    return receive


def _worker_main(cfg_bytes: bytes, inbox: Any, outbox_conn: Any) -> None:
    """Entry point of the worker process: build the engine, report ready, run the loop."""
    outbox = _Outbox(outbox_conn)
    send = outbox.send
    receive = pipe_receiver(inbox)
    try:
        core = EngineCore(codec.decode(cfg_bytes))
    except Exception as e:  # noqa: BLE001 - the front end raises it
        import traceback

        send(("fatal", f"engine start-up failed: {e}\n{traceback.format_exc()}"))
        outbox.close()
        return
    # Everything built so far (modules, compiled code, graphs) lives as long as the process: frozen out
    # of the cyclic collector, whose full passes run only while the loop waits for work.
    gc_policy = IdleFullCollections()
    gc_policy.install()
    send(("ready", core.info()))
    try:
        run_engine_loop(core, receive, send, gc_policy)
        core.close()
    finally:
        outbox.close()


class ProcessExecutor(ExecutorClient):
    """The engine loop in its own process, so the front end's Python never holds the step loop."""

    def __init__(self, cfg: EngineCoreConfig, on_output: OnOutput, startup_timeout: float = 1800.0) -> None:
        ctx = mp.get_context("spawn")
        worker_in, self._to_worker = ctx.Pipe(duplex=False)
        self._from_worker, worker_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_worker_main,
            args=(codec.encode(cfg), worker_in, worker_out),
            name="kiln-engine",
            daemon=True,
        )
        self._proc.start()
        worker_in.close()
        worker_out.close()
        self._lock = threading.Lock()
        self._closing = False
        if not self._from_worker.poll(startup_timeout):
            self._kill()
            raise RuntimeError(f"the engine process did not start within {startup_timeout:.0f} s")
        try:
            first = tuple(codec.decode(self._from_worker.recv_bytes()))
        except EOFError:
            self._kill()
            raise RuntimeError(
                f"the engine process exited during start-up (exit code {self._proc.exitcode})"
            ) from None
        if first[0] != "ready":
            self._kill()
            raise RuntimeError(first[1])
        self.info = first[1]
        self._on_output = on_output
        self._reader = threading.Thread(target=self._read, name="kiln-engine-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = tuple(codec.decode(self._from_worker.recv_bytes()))
            except (EOFError, OSError):
                if not self._closing:
                    self._on_output(("fatal", f"the engine process died (exit code {self._proc.exitcode})"))
                return
            self._on_output(msg)
            if msg[0] == "fatal":
                return

    def _send(self, msg: tuple[Any, ...]) -> None:
        data = codec.encode(msg)
        with self._lock:
            try:
                self._to_worker.send_bytes(data)
            except (BrokenPipeError, OSError):
                pass  # the reader reports the dead engine to every caller

    def shutdown(self) -> None:
        self._closing = True
        if self._proc.is_alive():
            self._send(("shutdown",))
            self._proc.join(timeout=30)
        self._kill()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        for conn in (self._to_worker, self._from_worker):
            conn.close()
