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
        self._startup: list[str] = []  # what compiled before arm(), described the same way
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
        name = describe(kwargs)
        if self.armed:
            self.count += 1
            self.names.append(name)
            # the start-up compiles with the same constexprs differ only in the specialisation key:
            # naming them shows which argument's alignment or value class the warm-up missed
            same = [n for n in self._startup if n.split(" key=", 1)[0] == name.split(" key=", 1)[0]]
            earlier = "".join(f"\n  start-up compiled the same constexprs as: {n}" for n in same)
            log.warning(
                "Triton compiled a kernel variant after start-up (the step waits for it): %s%s", name, earlier
            )
        else:
            self._startup.append(name)
        return self._prev(*args, **kwargs) if self._prev is not None else None

    def close(self) -> None:
        knobs = self._knobs
        if knobs is not None and knobs.runtime.jit_post_compile_hook == self._hook:
            knobs.runtime.jit_post_compile_hook = self._prev
        self._knobs = None
