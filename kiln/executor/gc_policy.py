"""Python's cyclic garbage collector in the engine loop: how long it pauses steps, and when it may.

A full (generation 2) collection scans every tracked object that is not frozen and stops the step
loop meanwhile. In the engine process that was 40-150 ms per pass on a 2-core CPU, several times
during a batch of 512 requests, so a few steps took ten times their length and the device idled.

- ``GcPauses`` measures: the time spent in collections, in total and since the last read.
- ``freeze_startup_objects`` (a front-end process that owns its heap: ``kiln serve``, ``kiln bench``)
  leaves the start-up objects out of every later collection. With 10,000 live requests a front
  end's full collections took 220-360 ms on a 2-core CPU, 30-130 ms with start-up's ~336k objects
  frozen: the outputs of every request waited that long.
- ``IdleFullCollections`` (engine process only; the policy is process-wide) freezes start-up's
  objects, turns off automatic full collections, and runs them while the loop has no work, when
  the default policy would have run one by then. Under unbroken load it still runs one after
  ``busy_limit`` times the default cadence, so cyclic garbage cannot grow without bound.
"""

from __future__ import annotations

import gc
import time
from typing import Any

_NEVER = 2**31 - 1  # a generation-2 threshold the count never reaches


def freeze_startup_objects() -> int:
    """Collect once, then freeze every object alive now (modules, the tokenizer, the engine client);
    returns how many are frozen. Process-wide: call it only from a process kiln owns."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Time spent in the cyclic collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total = 0.0
        self.full_collections = 0
        self._started = 0.0
        self._read = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.total += time.perf_counter() - self._started
        if info.get("generation") == 2:
            self.full_collections += 1

    def since_last_read(self) -> float:
        """Seconds of collection since the previous call."""
        delta, self._read = self.total - self._read, self.total
        return delta

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


class IdleFullCollections:
    """Full collections between bursts of work instead of in the middle of a step."""

    # Under unbroken load a full pass scans every live request's objects: 50-65 ms with 10,000 queued
    # on an H100 host, once every ~400 steps at 10 cadences (0.4% of a 128/128 run). At 100 cadences
    # it is ~once a minute of such a run, and the cyclic garbage it leaves meanwhile stays bounded.
    def __init__(self, busy_limit: int = 100) -> None:
        if busy_limit < 1:
            raise ValueError(f"busy_limit must be >= 1, got {busy_limit}")
        self.threshold0, self.threshold1, self.threshold2 = gc.get_threshold()
        self.busy_limit = busy_limit

    def install(self) -> None:
        """Freeze what exists now (modules, compiled code, graphs: they live as long as the process)
        and stop automatic full collections."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(self.threshold0, self.threshold1, _NEVER)

    def _due(self, times: int) -> bool:
        # gc.get_count()[2]: generation-1 collections since the last full one
        return gc.get_count()[2] >= times * self.threshold2

    def on_idle(self) -> None:
        """The loop is about to wait for work: collect if the default policy would have by now."""
        if self._due(1):
            gc.collect()

    def on_busy_step(self) -> None:
        """After a step under load: collect only once far past the default cadence."""
        if self._due(self.busy_limit):
            gc.collect()

    def uninstall(self) -> None:
        gc.set_threshold(self.threshold0, self.threshold1, self.threshold2)
        gc.unfreeze()
