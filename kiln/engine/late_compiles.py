"""Triton kernels compiled after start-up: each one stalls the step that needs it (~0.1-1 s on a GPU).

Start-up runs the shapes of step that in-flight batching makes so that every kernel variant exists
before the first request. A variant that still compiles mid-run is a gap in that warm-up; this
watch names it (kernel and argument specialisation) so the gap can be closed.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("kiln")


class LateCompileWatch:
    """Counts Triton JIT compilations once ``arm()`` is called; a no-op where Triton is missing."""

    def __init__(self) -> None:
        self.armed = False
        self.count = 0
        self.names: list[str] = []
        self._prev: Any = None
        self._knobs: Any = None
        try:
            from triton import knobs
        except Exception:  # noqa: BLE001 - no Triton (or an old one): nothing compiles through it
            return
        self._knobs = knobs
        self._prev = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = self._hook

    def arm(self) -> None:
        self.armed = True

    def _hook(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.count += 1
            name = str(kwargs.get("repr", "?"))
            self.names.append(name)
            log.warning("Triton compiled a kernel variant after start-up (the step waits for it): %s", name)
        return self._prev(*args, **kwargs) if self._prev is not None else None

    def close(self) -> None:
        knobs = self._knobs
        if knobs is not None and knobs.runtime.jit_post_compile_hook == self._hook:
            knobs.runtime.jit_post_compile_hook = self._prev
        self._knobs = None
