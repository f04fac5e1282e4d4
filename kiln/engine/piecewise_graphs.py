"""Piecewise CUDA graphs for the steps that are not decode-only (prefill chunks, mixed steps).

Such a step run eagerly launches every op of every layer from Python: ~1.5 ms of host time per
layer on a GPU host, as long as a 2,048-token prefill's kernels. Its attention cannot be captured
whole (its launch plan depends on how the step splits into sequences), but everything between two
attentions can: a *piece* is the end of one layer (output projection, norm, MLP) and the start of
the next (norm, q/k/v projections, RoPE and the KV write). A step of ``n`` tokens is padded to the
smallest captured token count ``T >= n`` and runs as L + 1 piece replays with the L attentions
launched eagerly between them, on the real ``n`` rows only.

- Inputs come from one static [3, T] buffer (input ids, positions, KV slots); padded rows have slot
  -1 (no KV write) and position 0. Every op of a piece works row by row, so whatever padded rows hold
  never reaches a real row.
- The attention's output is copied into one static buffer, the next piece's input.
- Memory: all sizes share one graph pool. A piece's outputs are only read until the next attention
  (q) or the next piece (the residual), so the runner keeps non-owning views of them and lets the
  pool reuse their memory in later captures: pieces replay strictly in capture order on one stream,
  so the pool stays about one layer's working set at the largest size instead of L of them.

A step that is one fresh prompt (the time-to-first-token case) can go through a *prompt graph*
instead: the whole forward of its padded size in one graph, attention included (``prompt_attention``,
given by the engine when every layer's attention takes such a prompt to SDPA: see
``sdpa_prefill.lone_prompt_attention``). Its K/V are gathered from the pool through a static row of
page ids; the device then runs the prefill back to back, with no hand-over between graph and eager
launches (~2-3 us each, three a layer), no copy of the attention's output into the next piece's input
(~9 us a layer at 2,048 tokens on an H100) and no wait on the host's first eager launches.

Without ``capture`` (the CPU) the pieces run eagerly in the same order, with the same padding, so
the path is testable without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from kiln.engine.attention_metadata import AttentionMetadata
from kiln.models.decoder import DecoderLayer, DecoderModel

log = logging.getLogger(__name__)

KvCache = tuple[torch.Tensor, torch.Tensor]
# (layer, rotated q [T, Hq, D], page ids [1, P] int32, T) -> the layer's attention output [T, Hq, D] for a
# step of T rows that is one fresh prompt (rows past it: padding)
PromptAttention = Callable[[int, torch.Tensor, torch.Tensor, int], torch.Tensor]


def default_piecewise_sizes(max_num_tokens: int) -> list[int]:
    """16 to 128 by doubling, every 256 to 2,048, every 512 beyond, up to (and including) max_num_tokens.
    Finer steps where a step's time grows with its size; a step pads by at most 12% past 2,048."""
    sizes = [16, 32, 64, 128, *range(256, 2049, 256), *range(2560, max_num_tokens + 512, 512)]
    return sorted({s for s in sizes if s < max_num_tokens} | {max_num_tokens})


def prompt_graph_sizes(sizes: Sequence[int], max_seq_len: int) -> list[int]:
    """The token counts a lone prompt (shorter than ``max_seq_len``) pads to: a prompt graph for each."""
    sizes = sorted(sizes)
    top = next((s for s in sizes if s >= max_seq_len - 1), sizes[-1])
    return [s for s in sizes if s <= top]


# rows of the static token buffer
IDS, POSITIONS, SLOTS = range(3)
_PAD_ROW = (0, 0, -1)  # a padded token: id 0 at position 0, writes no KV


def _non_owning(t: torch.Tensor) -> torch.Tensor:
    """A tensor over ``t``'s memory that does not keep it allocated."""
    storage = t.untyped_storage()
    alias = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(alias, t.storage_offset(), t.shape, t.stride())


class PiecewiseGraphRunner:
    """Runs ``model`` (a DecoderModel) on a step of up to ``max(sizes)`` tokens through captured pieces."""

    def __init__(
        self,
        model: DecoderModel,
        kv_caches: list[KvCache],
        sizes: Sequence[int],
        device: torch.device,
        capture: bool = True,
        prompt_attention: PromptAttention | None = None,
        prompt_sizes: Sequence[int] = (),
    ) -> None:
        self._model = model
        self._layers = [cast(DecoderLayer, layer) for layer in model.layers]
        self._attention = [layer.self_attn.attn for layer in self._layers]
        self._kv = kv_caches
        self.sizes = sorted(set(sizes))
        self.max_tokens = self.sizes[-1]
        self._capture = capture
        n = self.max_tokens
        row = -(-n // 16) * 16  # each row's start stays 128-byte aligned
        self.tokens = torch.tensor(_PAD_ROW, dtype=torch.int64, device=device)[:, None].repeat(1, row)[:, :n]
        self._padding = self.tokens.clone()
        attn0 = self._attention[0]
        weight = next(model.parameters())
        self.attn_out = torch.zeros(n, attn0.num_heads, attn0.head_dim, dtype=weight.dtype, device=device)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._q: dict[int, list[torch.Tensor]] = {}  # per size, per layer: its rotated q (non-owning)
        self._hidden: dict[int, torch.Tensor] = {}  # per size: the final hidden states (non-owning)
        self.capture_seconds = 0.0
        self.pool_bytes = 0  # device memory the capture reserved (the shared pool)
        # prompt graphs: for the sizes given (among ``sizes``) when the engine gives the attention
        self._prompt_attention = prompt_attention
        self.prompt_sizes = sorted(set(prompt_sizes) & set(self.sizes)) if prompt_attention else []
        self._page = int(kv_caches[0][0].shape[1])
        # the prompt's page ids, then the null block's (0): the static row a prompt graph takes its KV
        # slots from and gathers its K/V through
        max_pages = -(-max(self.prompt_sizes, default=0) // self._page)
        self.pages = torch.zeros(1, max_pages, dtype=torch.int32, device=device)
        self._page_offsets = torch.arange(self._page, dtype=torch.int64, device=device)
        self._prompt_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prompt_hidden: dict[int, torch.Tensor] = {}  # per size: the final hidden states (non-owning)

    def _piece(
        self, i: int, size: int, residual: torch.Tensor | None, attn_out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Piece i of a ``size``-token step: layer i-1's post-attention part (or the embedding) and layer
        i's pre-attention part (or the final norm) -> (q of layer i or final hidden, residual).
        ``attn_out``: layer i-1's attention output (default: the static buffer the pieces read)."""
        rows = self.tokens[:, :size]
        model = self._model
        if i == 0:
            hidden = cast(torch.Tensor, model.embed_tokens(rows[IDS]))
        else:
            assert residual is not None  # every piece after the first gets the previous one's residual
            attn_out = self.attn_out[:size] if attn_out is None else attn_out
            hidden, residual = self._layers[i - 1].post_attention(attn_out, residual)
        if i == len(self._layers):
            out, _ = cast(tuple[torch.Tensor, torch.Tensor], model.norm(hidden, residual))
            return out, None
        return self._layers[i].pre_attention(
            hidden, residual, rows[POSITIONS], model.rotary.cos_sin_cache, self._kv[i], rows[SLOTS]
        )

    def _prompt_forward(self, size: int) -> torch.Tensor:
        """The whole forward of a ``size``-token step that is one fresh prompt, its attention included
        (what a prompt graph holds) -> final hidden states [size, H]."""
        assert self._prompt_attention is not None
        pages = self.pages[:, : -(-size // self._page)]
        # every row's KV slot from the page row: the prompt's rows get the step's own slots, the padding
        # rows its last page's tail and the null block. So every key the attention reads past the prompt
        # (only padding rows attend to them) was written in this step, never a stale value of another
        # request; the decode steps overwrite the tail before they read it.
        slots = pages[0].to(torch.int64)[:, None] * self._page + self._page_offsets
        self.tokens[SLOTS, :size].copy_(slots.flatten()[:size])
        residual: torch.Tensor | None = None
        attn_out: torch.Tensor | None = None
        for i in range(len(self._layers)):
            q, residual = self._piece(i, size, residual, attn_out)
            attn_out = self._prompt_attention(i, q, pages, size)
        hidden, _ = self._piece(len(self._layers), size, residual, attn_out)
        return hidden

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every size's pieces, largest size first, into one shared memory pool."""
        if not self._capture:
            return
        t0 = time.perf_counter()
        reserved = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        num_pieces = len(self._layers) + 1
        for size in reversed(self.sizes):
            self.tokens.copy_(self._padding)  # capture-time values: padding (no KV write)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: library handles and kernel JIT outside the capture
                residual = None
                for i in range(num_pieces):
                    _out, residual = self._piece(i, size, residual)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graphs, qs = [], []
            residual = None
            for i in range(num_pieces):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out, new_residual = self._piece(i, size, residual)
                graphs.append(graph)
                if i < num_pieces - 1:
                    qs.append(_non_owning(out))
                else:
                    self._hidden[size] = _non_owning(out)
                # the previous residual and this q are dead once later pieces are captured: their
                # memory goes back to the pool (only this piece's residual stays, the next one's input)
                residual = new_residual
                del out
            del residual
            self._graphs[size], self._q[size] = graphs, qs
        self._capture_prompt_graphs(pool, stream)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.pool_bytes = torch.cuda.memory_reserved() - reserved
        log.info(
            "captured piecewise CUDA graphs for %d token counts (%d pieces each) and %d prompt graphs "
            "in %.1f s, %.0f MiB", len(self.sizes), num_pieces, len(self._prompt_graphs),
            self.capture_seconds, self.pool_bytes / 2**20,
        )  # fmt: skip

    def _capture_prompt_graphs(self, pool: Any, stream: torch.cuda.Stream) -> None:
        """One graph of the whole forward for each prompt size, largest first, in the pieces' pool. A
        capture that fails leaves lone prompts to the pieces (logged), never the engine unstarted."""
        for size in reversed(self.prompt_sizes):
            self.tokens.copy_(self._padding)  # capture-time values: padding (no KV write), the null block
            self.pages.zero_()
            try:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up outside the capture (SDPA plans, workspaces)
                    self._prompt_forward(size)
                torch.cuda.current_stream().wait_stream(stream)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = self._prompt_forward(size)
            except RuntimeError as e:
                log.warning("prompt graphs not captured (%s): lone prompts run through the pieces", e)
                self._prompt_graphs.clear()
                self._prompt_hidden.clear()
                self.prompt_sizes = []
                return
            self._prompt_graphs[size] = graph
            self._prompt_hidden[size] = _non_owning(out)
            del out

    def padded_size(self, num_tokens: int) -> int | None:
        for s in self.sizes:
            if s >= num_tokens:
                return s
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """One step of ``n`` tokens (n <= max_tokens) -> final hidden states [n, H]. The result is a view
        of the graphs' memory: valid until the next step runs."""
        n = int(input_ids.shape[0])
        size = self.padded_size(n)
        assert size is not None, f"{n} tokens, piecewise graphs go up to {self.max_tokens}"
        assert size in self._graphs or not self._capture, f"no piecewise graphs for {size} tokens"
        self.tokens[IDS, :n].copy_(input_ids)
        self.tokens[POSITIONS, :n].copy_(positions)
        self.tokens[SLOTS, :n].copy_(attn.slot_mapping)
        if size > n:
            self.tokens[:, n:size].copy_(self._padding[:, : size - n])
        if size in self.prompt_sizes and is_one_fresh_prompt(attn):
            own = -(-n // self._page)  # the prompt's pages; the rest: the null block
            self.pages[:, :own].copy_(attn.block_tables[:1, :own])
            self.pages[:, own:].zero_()
            if not self._capture:
                return self._prompt_forward(size)[:n]
            self._prompt_graphs[size].replay()
            return self._prompt_hidden[size][:n]
        attn_out = self.attn_out[:n]
        if not self._capture:  # the same pieces, run eagerly
            residual: torch.Tensor | None = None
            for i, attention in enumerate(self._attention):
                q, residual = self._piece(i, size, residual)
                attention.attend_into(q[:n], self._kv[i], attn, attn_out)
            hidden, _ = self._piece(len(self._layers), size, residual)
            return hidden[:n]
        graphs = self._graphs[size]
        for graph, q, attention, kv in zip(graphs, self._q[size], self._attention, self._kv, strict=False):
            graph.replay()  # ... up to this layer's KV write; its rotated q is in ``q``
            attention.attend_into(q[:n], kv, attn, attn_out)  # straight into the next piece's input
        graphs[-1].replay()  # the last layer's end and the final norm
        return self._hidden[size][:n]


def is_one_fresh_prompt(attn: AttentionMetadata) -> bool:
    """The step is one sequence with nothing cached before its tokens (host facts only): a lone
    sequence is fresh only without a prefix, since a prefix counts only within the step's tokens."""
    fresh = attn.fresh_prompts
    return attn.num_seqs == 1 and fresh is not None and fresh.first_seq == 0
