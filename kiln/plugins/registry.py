"""The plugin mechanism: named ops with a fast ``forward``, a plain-torch ``reference`` and a fake.

A plugin is a class decorated with ``@kiln.plugins.plugin("name", kind="...")``. It declares its op
``schema`` (torch.library syntax) and implements three methods with that signature:

- ``shape_dtype_inference``: the fake (meta) implementation; shapes and dtypes only.
- ``forward``: the fast path (Triton or CUDA).
- ``reference``: plain torch; runs anywhere, the ground truth in tests.

Optionally ``forward_into(out, *args)``: ``forward`` writing its result into ``out`` (a tensor of the
result's shape and dtype) and returning nothing. Where the engine already holds the buffer the result
goes to (the piecewise CUDA graphs' attention output), it calls that and saves a copy; without it,
``forward``'s result is copied there.

Each plugin becomes two torch custom ops, ``kiln::<name>`` (forward) and ``kiln::<name>_reference``,
so torch.compile and CUDA graphs see a shape-known opaque op. Models never import plugins: they get
a ``PluginSet`` that maps a *kind* (``"attention"``, ``"rms_norm"``, ...) to the op chosen for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

BACKENDS = ("forward", "reference")


class Plugin:
    """Base class of every plugin. Subclasses set ``schema`` and may set ``mutates_args``."""

    name: str = ""
    kind: str = ""
    schema: str = ""
    mutates_args: tuple[str, ...] = ()

    def shape_dtype_inference(self, *args: Any) -> Any:
        raise NotImplementedError

    def forward(self, *args: Any) -> Any:
        raise NotImplementedError

    def reference(self, *args: Any) -> Any:
        raise NotImplementedError

    def forward_into(self, out: torch.Tensor, *args: Any) -> None:
        raise NotImplementedError


@dataclass
class RegisteredPlugin:
    plugin: Plugin
    forward_op: Callable[..., Any]
    reference_op: Callable[..., Any]
    forward_impl: Callable[..., Any]  # what forward_op runs: the plugin's forward, launching directly
    into_impl: Callable[..., None] | None  # forward_into, launching directly; None if not implemented

    def op(self, backend: str) -> Callable[..., Any]:
        if backend not in BACKENDS:
            raise ValueError(f"plugin backend must be one of {BACKENDS}, got {backend!r}")
        return self.forward_op if backend == "forward" else self.reference_op

    def impl(self, backend: str) -> Callable[..., Any]:
        """The Python function behind ``op(backend)``, for a caller that is already inside a custom
        op (no second dispatcher call)."""
        self.op(backend)  # checks the backend
        return self.forward_impl if backend == "forward" else self.plugin.reference


def _launch_triton_directly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with ``wrap_triton(kernel)[grid](...)`` launching the kernel straight away.

    By default wrap_triton routes every launch through a higher-order op made for tracing (pytree
    flattening, inspect.signature, HOP dispatch): ~75-240 us of host time per launch, and each
    launch's constant args kept for good in torch's kernel side table. A plugin's implementation
    only ever runs on real tensors (tracing uses shape_dtype_inference), so it needs none of it;
    torch.library.triton_op turns it off the same way.
    """
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # a torch without the switch: launches go through the HOP
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with set_wrap_triton_enabled(False):
            return fn(*args, **kwargs)

    return run


_REGISTRY: dict[str, RegisteredPlugin] = {}
# The schema every plugin of a kind must share, so that one can replace another.
_KIND_SCHEMAS: dict[str, str] = {}


def plugin(name: str, *, kind: str) -> Callable[[type[Plugin]], type[Plugin]]:
    """Register ``cls`` as plugin ``name`` of ``kind``; returns the class unchanged."""

    def register(cls: type[Plugin]) -> type[Plugin]:
        if not name.isidentifier():
            raise ValueError(f"plugin name must be a Python identifier, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(f"a plugin named {name!r} is already registered")
        inst = cls()
        inst.name, inst.kind = name, kind
        if not inst.schema:
            raise ValueError(f"plugin {name!r} must declare a schema, e.g. '(Tensor x) -> Tensor'")
        expected = _KIND_SCHEMAS.get(kind, inst.schema)
        if _normalise(expected) != _normalise(inst.schema):
            raise ValueError(
                f"plugin {name!r} of kind {kind!r} has schema {inst.schema!r}; "
                f"plugins of this kind must have schema {expected!r}"
            )
        base = ("shape_dtype_inference", "forward", "reference")
        missing = [m for m in base if getattr(cls, m) is getattr(Plugin, m)]
        if missing:
            raise ValueError(f"plugin {name!r} must implement {', '.join(missing)}")
        ops = []
        forward = _launch_triton_directly(inst.forward)
        for suffix, impl in (("", forward), ("_reference", inst.reference)):
            op = torch.library.custom_op(
                f"kiln::{name}{suffix}", impl, mutates_args=inst.mutates_args, schema=inst.schema
            )
            op.register_fake(inst.shape_dtype_inference)
            ops.append(op)
        _KIND_SCHEMAS.setdefault(kind, inst.schema)
        into = (
            _launch_triton_directly(inst.forward_into)
            if cls.forward_into is not Plugin.forward_into
            else None
        )
        _REGISTRY[name] = RegisteredPlugin(inst, ops[0], ops[1], forward, into)
        return cls

    return register


def _normalise(schema: str) -> str:
    # Argument names may differ between plugins of a kind; types and order may not.
    import re

    return re.sub(r"\s+\w+(?=[,)=])", "", schema.replace(" ", " "))


def get_plugin(name: str) -> RegisteredPlugin:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"no plugin named {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered_plugins() -> dict[str, RegisteredPlugin]:
    _load_builtins()
    return dict(_REGISTRY)


def _load_builtins() -> None:
    import kiln.plugins.builtin  # noqa: F401  (registers the built-in plugins on import)


# The built-in plugin chosen for each kind unless the user picks another.
DEFAULT_PLUGINS = {
    "attention": "paged_attention_sdpa",
    "rope_kv_write": "rope_kv_write",
    "rms_norm": "rms_norm",
    "fused_add_rms_norm": "fused_add_rms_norm",
    "silu_and_mul": "silu_and_mul",
    "linear": "linear",
    "add_rms_norm_linear": "add_rms_norm_linear",
    "silu_mul_linear": "silu_mul_linear",
    "linear_silu_mul": "linear_silu_mul",
}
# On the "forward" backend (Triton/CUDA kernels), kinds whose fused plugin measurably wins where it
# applies take it by default; it checks the step's shape and the card at run time and runs the ops
# apart elsewhere (see each plugin). Not when the user picks a plugin for a kind that fuses the same op
# another way (SiLU-and-mul as the down projection's prologue): that choice stands.
FORWARD_DEFAULT_PLUGINS = {"linear_silu_mul": "gemm_silu_mul"}
_FUSES_THE_SAME_OP = {"linear_silu_mul": ("silu_mul_linear",)}


def _named(selection: Any) -> str | None:
    """A plugin name from an override (a name or ``(name, backend)``), None for no override."""
    return selection if selection is None or isinstance(selection, str) else selection[0]


def _name_and_backend(kind: str, selection: Any) -> tuple[str, str]:
    """An override given as ``(name, backend)``; anything else is refused with what is allowed."""
    if (
        isinstance(selection, (tuple, list))
        and len(selection) == 2
        and isinstance(selection[0], str)
        and selection[1] in BACKENDS
    ):
        return selection[0], selection[1]
    raise ValueError(
        f"the plugin for kind {kind!r} must be a plugin name string (or a (name, backend) pair with "
        f"backend one of {BACKENDS}), got {selection!r}"
    )


class PluginSet:
    """The op chosen for each kind, resolved once when the engine is built.

    ``backend`` is "forward" (Triton/CUDA kernels) or "reference" (plain torch); ``overrides`` maps a
    kind to a plugin name, or to ``(name, backend)``.
    """

    def __init__(self, backend: str = "reference", overrides: dict[str, Any] | None = None) -> None:
        _load_builtins()
        if backend not in BACKENDS:
            raise ValueError(f"plugin backend must be one of {BACKENDS}, got {backend!r}")
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(DEFAULT_PLUGINS)
        if unknown:
            raise ValueError(f"unknown plugin kinds {sorted(unknown)}; kinds are {sorted(DEFAULT_PLUGINS)}")
        for kind, sel in overrides.items():  # checked first: the rival check below reads them too
            if not isinstance(sel, str):
                overrides[kind] = _name_and_backend(kind, sel)
        self.choice: dict[str, tuple[str, str]] = {}
        self._ops: dict[str, Callable[..., Any]] = {}
        self._into: dict[str, Callable[..., None] | None] = {}
        for kind, default in DEFAULT_PLUGINS.items():
            rivals = _FUSES_THE_SAME_OP.get(kind, ())
            rival_chosen = any(_named(overrides.get(k)) not in (None, DEFAULT_PLUGINS[k]) for k in rivals)
            if backend == "forward" and not rival_chosen:
                default = FORWARD_DEFAULT_PLUGINS.get(kind, default)
            sel = overrides.get(kind, default)
            name, be = (sel, backend) if isinstance(sel, str) else tuple(sel)
            if name not in _REGISTRY:
                of_kind = sorted(n for n, r in _REGISTRY.items() if r.plugin.kind == kind)
                raise ValueError(f"no plugin named {name!r}; plugins of kind {kind!r}: {of_kind}")
            reg = _REGISTRY[name]
            if reg.plugin.kind != kind:
                raise ValueError(f"plugin {name!r} is of kind {reg.plugin.kind!r}, not {kind!r}")
            self.choice[kind] = (name, be)
            self._ops[kind] = reg.op(be)
            self._into[kind] = reg.into_impl if be == "forward" else None

    def overridden(self, kind: str) -> bool:
        """Whether ``kind`` runs another plugin than its ops-apart default (``DEFAULT_PLUGINS``; a
        ``FORWARD_DEFAULT_PLUGINS`` entry counts as another): layers call a default linear or
        fused-projection kind's ops directly, without its custom op."""
        return self.choice[kind][0] != DEFAULT_PLUGINS[kind]

    def writer(self, kind: str) -> Callable[..., None] | None:
        """``kind``'s ``forward_into`` (called outside any traced or compiled code), or None when the
        chosen plugin has none or runs its reference."""
        if kind not in self._into:
            raise ValueError(f"no plugin kind {kind!r}; kinds are {sorted(DEFAULT_PLUGINS)}")
        return self._into[kind]

    def __getattr__(self, kind: str) -> Callable[..., Any]:
        ops = self.__dict__.get("_ops", {})
        if kind in ops:
            return ops[kind]
        raise AttributeError(f"no plugin kind {kind!r}; kinds are {sorted(DEFAULT_PLUGINS)}")
