"""torch.compile of the decoder layers: one compiled callable shared by every layer.

All layers of a model run the same code on differently-valued weights, so one function,
``DecoderLayer.forward`` taking the layer as an argument, is compiled once and reused: dynamo lifts
a layer's parameters to graph inputs, so another layer (same class, same shapes) passes the guards
of the graph compiled for the first. Two graphs in all: the first layer (no residual yet) and the
rest; a model whose layers differ in a constant (a per-layer sliding window) gets one more.

Nothing in a graph depends on a step's size or on the KV pool:
- The token dimension (hidden, residual, positions, slot_mapping) and the sequence dimension
  (block tables, seq_lens, query_start_loc) are marked unbacked before every call: no guard on
  their values and no 0/1 specialisation, so a single-token decode and a long prefill share a graph.
- The KV pool never enters a graph. Each layer's (k_cache, v_cache) are views of one pool; passed
  in as mutated inputs they are aliased (inductor then copies the whole cache every call, and with
  dynamic shapes writes it back at the wrong offset). Instead the graph carries an integer handle
  and the two KV-cache ops (rope_kv_write, attention) are routed through ``kiln_compile::`` ops that
  look the views up by handle and call the chosen plugin's op.
- The metadata ints ``max_query_len`` / ``max_seq_len`` change every step. The attention kind
  declares them ``int``, and a symbolic int passed as an ``int`` argument is specialised (a graph
  per value); the routed op declares them (and the handle) ``SymInt``.
Plugins stay opaque custom ops with fake impls: the graph breaks nowhere (``fullgraph=True``).

``compile_decoder_layers`` compiles eagerly, with a warm-up step of its own on a small temporary
KV pool, so compile time (and any Triton autotuning) happens at start-up and is reported, and the
engine's KV-sizing warm-up and CUDA-graph capture already run compiled code.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from kiln.engine.attention_metadata import AttentionMetadata
from kiln.engine.kv_cache import KvCache, KvCacheSpec
from kiln.layers.attention import PagedAttention
from kiln.models.decoder import DecoderLayer
from kiln.plugins.registry import get_plugin, registered_plugins

log = logging.getLogger(__name__)

KvCacheViews = tuple[torch.Tensor, torch.Tensor]

# ------------------------------------------------------------------ KV-cache ops by handle

# A layer's (k_cache, v_cache), by the handle its compiled forward passes through the graph. Set
# only for the duration of that layer's call, so a freed pool is never kept alive from here.
_KV_BY_HANDLE: dict[int, KvCacheViews] = {}
_handles = itertools.count(1)


def _kv(handle: int) -> KvCacheViews:
    kv = _KV_BY_HANDLE.get(handle)
    assert kv is not None, f"KV cache handle {handle} used outside its layer's compiled forward"
    return kv


@functools.cache
def _plugin_op(plugin: str, backend: str) -> Callable[..., Any]:
    # The plugin's function, not its custom op: the routed op already went through the dispatcher,
    # and a second custom-op call costs ~15 us of host time per op (two per layer).
    return get_plugin(plugin).impl(backend)


def _rope_kv_write_impl(q, k, v, positions, cos_sin_cache, kv, slot_mapping, plugin, backend):  # fmt: skip
    k_cache, v_cache = _kv(kv)
    return _plugin_op(plugin, backend)(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)


def _attention_impl(q, kv, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len,
                    scale, sliding_window, plugin, backend):  # fmt: skip
    k_cache, v_cache = _kv(kv)
    return _plugin_op(plugin, backend)(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                       max_query_len, max_seq_len, scale, sliding_window)  # fmt: skip


def _same_as_q(q: torch.Tensor, *args: Any) -> torch.Tensor:
    # Both kinds' contract: the output (rotated q / attention output) has q's shape and dtype.
    return torch.empty_like(q)


# The pool is no tensor argument of these ops, so nothing a graph sees is mutated (mutates_args=()):
# a step's KV write is ordered before the attention read by the rotated q the attention consumes.
_rope_kv_write_op = torch.library.custom_op(
    "kiln_compile::rope_kv_write",
    _rope_kv_write_impl,
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos_sin_cache, SymInt kv, "
    "Tensor slot_mapping, str plugin, str backend) -> Tensor",
)
_rope_kv_write_op.register_fake(_same_as_q)
_attention_op = torch.library.custom_op(
    "kiln_compile::attention",
    _attention_impl,
    mutates_args=(),
    schema="(Tensor q, SymInt kv, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, "
    "SymInt max_query_len, SymInt max_seq_len, float scale, int sliding_window, str plugin, str backend) "
    "-> Tensor",
)
_attention_op.register_fake(_same_as_q)


class _RopeKvWriteCall:
    """Stands in for a rope_kv_write plugin op; ``k_cache`` / ``v_cache`` are the layer's KV handle
    inside the compiled forward, and the KV views themselves when a layer's pieces run outside it
    (piecewise CUDA graphs). One instance per (plugin, backend), shared by all layers, so the
    layers' guards match."""

    def __init__(self, plugin: str, backend: str) -> None:
        self.plugin, self.backend = plugin, backend

    def __call__(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):  # fmt: skip
        if isinstance(k_cache, torch.Tensor):  # outside the compiled forward: the plugin itself
            return _plugin_op(self.plugin, self.backend)(q, k, v, positions, cos_sin_cache, k_cache, v_cache,
                                                         slot_mapping)  # fmt: skip
        return _rope_kv_write_op(q, k, v, positions, cos_sin_cache, k_cache, slot_mapping,
                                 self.plugin, self.backend)  # fmt: skip


class _AttentionCall:
    """Stands in for an attention plugin op, as ``_RopeKvWriteCall`` does."""

    def __init__(self, plugin: str, backend: str) -> None:
        self.plugin, self.backend = plugin, backend

    def __call__(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                 max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        if isinstance(k_cache, torch.Tensor):
            return _plugin_op(self.plugin, self.backend)(q, k_cache, v_cache, block_tables, seq_lens,
                                                         query_start_loc, max_query_len, max_seq_len, scale,
                                                         sliding_window)  # fmt: skip
        return _attention_op(q, k_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                             max_seq_len, scale, sliding_window, self.plugin, self.backend)  # fmt: skip


def _plugin_of(op: Callable[..., Any]) -> tuple[str, str]:
    """(plugin name, backend) of a registered plugin op."""
    for name, reg in registered_plugins().items():
        for backend in ("forward", "reference"):
            if reg.op(backend) is op:
                return name, backend
    raise ValueError(f"{op!r} is not the op of a registered plugin; cannot compile the attention layer")


def _route_kv_ops(model: torch.nn.Module, undo: list[tuple[Any, str, Any]]) -> None:
    """Point every attention layer's two KV-cache ops at the by-handle ops (the old ones go to undo)."""
    calls: dict[tuple[type, str, str], Any] = {}
    for mod in model.modules():
        if not isinstance(mod, PagedAttention) or isinstance(mod.attention_op, _AttentionCall):
            continue
        for attr, cls in (("rope_kv_write_op", _RopeKvWriteCall), ("attention_op", _AttentionCall)):
            old = getattr(mod, attr)
            key = (cls, *_plugin_of(old))
            undo.append((mod, attr, old))
            setattr(mod, attr, calls.setdefault(key, cls(*key[1:])))


# ------------------------------------------------------------------ the shared layer function


def _layer_forward(
    layer: DecoderLayer,
    hidden: torch.Tensor,  # [T, H]
    residual: torch.Tensor | None,  # [T, H]
    positions: torch.Tensor,  # [T]
    cos_sin_cache: torch.Tensor,
    kv_cache: tuple[int, int],  # the layer's KV handle, twice (k_cache, v_cache)
    attn: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor]:
    # the handles stand in for the KV views: only the routed ops below the layer ever see them
    kv: Any = kv_cache
    return type(layer).forward(layer, hidden, residual, positions, cos_sin_cache, kv, attn)


def _mark_step_dims(
    mark_unbacked: Callable[[torch.Tensor, int], None],
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    attn: AttentionMetadata,
) -> None:
    # Read by dynamo when it compiles (a later recompile stays general too), and by one cheap guard.
    for t in (hidden, residual, positions, attn.slot_mapping, attn.block_tables, attn.seq_lens,
              attn.query_start_loc):  # fmt: skip
        if t is not None:
            mark_unbacked(t, 0)


class _CompiledLayerForward:
    """Installed as a layer's ``forward``. Holds its layer weakly: a strong reference would make a
    cycle (layer -> forward -> layer) and keep the weights alive until the cyclic collector runs."""

    def __init__(self, layer: DecoderLayer, compiled: Callable[..., Any]) -> None:
        from torch._dynamo.decorators import mark_unbacked  # torch._dynamo takes a second to import

        self._layer = weakref.ref(layer)
        self._compiled = compiled
        self._mark = mark_unbacked
        self._kv_handle = next(_handles)

    def __call__(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KvCacheViews,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._layer()
        assert layer is not None, "compiled forward of a freed layer"
        _mark_step_dims(self._mark, hidden, residual, positions, attn)
        handle = self._kv_handle
        _KV_BY_HANDLE[handle] = kv_cache
        try:  # the graph carries the handle (a symbolic int, the same graph for every layer)
            return self._compiled(layer, hidden, residual, positions, cos_sin_cache, (handle, handle), attn)
        finally:
            del _KV_BY_HANDLE[handle]


_UNSET = object()


@dataclass
class CompiledLayers:
    """What ``compile_decoder_layers`` did: ``seconds`` of compilation (the warm-up step included) and
    the graphs compiled so far (``num_graphs`` stays constant after start-up unless a step needs
    something new)."""

    num_layers: int
    seconds: float = 0.0
    num_graphs: int = 0


def compile_decoder_layers(
    model: torch.nn.Module, kv_spec: KvCacheSpec, blocks_per_seq: int, *, strict: bool = True
) -> CompiledLayers | None:
    """Compile every ``DecoderLayer`` of ``model`` (in place) into one shared compiled function and
    warm it up; ``blocks_per_seq`` is the width of the engine's block tables.

    If compiling fails the model is left as it was (eager); then ``strict`` raises the error, and
    otherwise (compilation by default rather than asked for) it is logged and None is returned.
    """
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DecoderLayer to compile")
    import torch._dynamo  # a second to import: only when compiling

    result = CompiledLayers(num_layers=len(layers))
    inductor = torch._dynamo.lookup_backend("inductor")

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled_graph = inductor(gm, example_inputs)
        result.num_graphs += 1  # after: an attempt dynamo restarts (to specialise a float) raises
        return compiled_graph

    device = next(model.parameters()).device
    cache_path = _compile_cache_path(model, device)
    if cache_path is not None:
        _load_compile_cache(cache_path, device)
    # A fresh code object per model: dynamo caches compiled graphs on the code object, so each
    # engine's graphs are kept (and count towards the recompile limit) apart, and go with it.
    fn = types.FunctionType(_layer_forward.__code__.replace(), _layer_forward.__globals__, "layer_forward")
    compiled = torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)
    undo: list[tuple[Any, str, Any]] = []  # (object, attribute, old value; _UNSET: none of its own)
    t0 = time.perf_counter()
    try:
        _route_kv_ops(model, undo)
        for layer in layers:
            undo.append((layer, "forward", _UNSET))
            layer.forward = _CompiledLayerForward(layer, compiled)  # type: ignore[method-assign]
        _warm_up(model, kv_spec, blocks_per_seq)
    except Exception as e:
        for obj, attr, old in reversed(undo):
            if old is _UNSET:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        if strict:
            raise
        log.warning("torch.compile of the decoder layers failed, running them eagerly: %s", e)
        return None
    result.seconds = time.perf_counter() - t0
    if cache_path is not None and not os.path.exists(cache_path):
        _save_compile_cache(cache_path, device)
    log.info(
        "compiled %d decoder layers into %d graphs in %.1f s", len(layers), result.num_graphs, result.seconds
    )
    return result


# ------------------------------------------------------------------ compile cache of an engine directory
# A model loaded from an engine directory (kiln build) keeps torch.compile's artifacts (inductor
# kernels, autotuning results) in DIR/compile_cache.bin: saved after the first compiling start-up,
# loaded before compiling on later ones. CUDA only (the CPU path compiles rarely and quickly). A
# stale or incompatible cache must never stop start-up: every failure is logged and skipped.


def _compile_cache_path(model: torch.nn.Module, device: torch.device) -> str | None:
    from kiln.builder.engine_dir import COMPILE_CACHE_FILE, ENGINE_DIR_ATTR

    engine_dir = getattr(model, ENGINE_DIR_ATTR, None)
    if device.type != "cuda" or engine_dir is None:
        return None
    return os.path.join(engine_dir, COMPILE_CACHE_FILE)


def _cache_environment(device: torch.device) -> dict[str, str]:
    from kiln.builder.engine_dir import device_kind, environment_versions

    versions = environment_versions()
    return {"torch": versions["torch"], "triton": versions["triton"], "device": device_kind(device)}


def _load_compile_cache(path: str, device: torch.device) -> None:
    if not os.path.isfile(path):
        return
    try:
        from kiln.builder.engine_dir import EnginePlan

        made_with = EnginePlan.load(os.path.dirname(path)).compile_cache
        here = _cache_environment(device)
        if made_with is not None and any(made_with.get(k) != v for k, v in here.items()):
            log.info("compile cache %s was made with %s, not %s: not used", path, made_with, here)
            return
        with open(path, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
        log.info("loaded the compile cache %s", path)
    except Exception as e:  # noqa: BLE001 - a bad cache only costs compile time
        log.warning("ignoring the compile cache %s: %s", path, e)


def _save_compile_cache(path: str, device: torch.device) -> None:
    engine_dir = os.path.dirname(path)
    if not os.access(engine_dir, os.W_OK):
        return
    try:
        from kiln.builder.engine_dir import EnginePlan

        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(saved[0])
        os.replace(tmp, path)  # atomic: a concurrent start-up reads a whole cache or none
        made_with = {**_cache_environment(device), "created": datetime.now(UTC).isoformat(timespec="seconds")}
        plan = EnginePlan.load(engine_dir)
        dataclasses.replace(plan, compile_cache=made_with).save(engine_dir)
        log.info("saved the compile cache %s (%d bytes)", path, len(saved[0]))
    except Exception as e:  # noqa: BLE001 - the engine runs without a cache
        log.warning("could not save the compile cache %s: %s", path, e)


@torch.no_grad()
def _warm_up(model: torch.nn.Module, spec: KvCacheSpec, blocks_per_seq: int) -> None:
    """One mixed step on a small temporary pool: a decode token (KV length 2) and a 3-token chunk."""
    weight = next(model.parameters())
    device = weight.device
    bs = spec.tokens_per_block
    cap = blocks_per_seq * bs  # tokens a block-table row can address
    kv_lens = [min(2, cap), min(3, cap)]
    q_lens = [1, kv_lens[1]]
    nblocks = [-(-n // bs) for n in kv_lens]
    table = torch.zeros(2, blocks_per_seq, dtype=torch.int32)
    first = 1  # block 0 is the null block
    positions, slots = [], []
    for s, (kv_len, q_len, nb) in enumerate(zip(kv_lens, q_lens, nblocks, strict=True)):
        table[s, :nb] = torch.arange(first, first + nb, dtype=torch.int32)
        for p in range(kv_len - q_len, kv_len):
            positions.append(p)
            slots.append(int(table[s, p // bs]) * bs + p % bs)
        first += nb
    kv = KvCache(spec, first, device)
    num_tokens = len(positions)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=table.to(device),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, q_lens[0], num_tokens], dtype=torch.int32, device=device),
        max_query_len=max(q_lens),
        max_seq_len=max(kv_lens),
        num_decode_seqs=1,
        num_decode_tokens=1,
    )
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    try:
        model(input_ids, pos, attn, kv.layers)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        kv.close()
