"""Triton kernels compiled after start-up: each one stalls the step that needs it (~0.1-1 s on a GPU).

Start-up runs the shapes of step that in-flight batching makes so that every kernel variant exists
before the first request. A variant that still compiles mid-run is a gap in that warm-up; this
watch names it (kernel and argument specialisation) so the gap can be closed.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("kiln")


def describe(hook_kwargs: dict[str, Any]) -> str:
    """Kernel, launch options, constexpr values and the specialisation key (argument types, 16-byte
    alignment and ==1 flags) of one compile: everything that tells this variant from the others."""
    head = str(hook_kwargs.get("repr", "?")).split("(", 1)[0]
    compile_info = hook_kwargs.get("compile") or {}
    fn = getattr(hook_kwargs.get("fn"), "jit_function", None)
    params = [p.name for p in getattr(fn, "params", [])]

    def arg(key: Any) -> str:
        i = key[0] if isinstance(key, tuple) and key else key
        return params[i] if isinstance(i, int) and i < len(params) else str(key)

    constants = ", ".join(f"{arg(k)}={v}" for k, v in (compile_info.get("constants") or {}).items())
    return f"{head} constexprs({constants}) key={compile_info.get('key', '?')}"[:4000]


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
            name = describe(kwargs)
            self.names.append(name)
            log.warning("Triton compiled a kernel variant after start-up (the step waits for it): %s", name)
        return self._prev(*args, **kwargs) if self._prev is not None else None

    def close(self) -> None:
        knobs = self._knobs
        if knobs is not None and knobs.runtime.jit_post_compile_hook == self._hook:
            knobs.runtime.jit_post_compile_hook = self._prev
        self._knobs = None
