"""CUDA graphs for generation-only steps.

A decode step of B sequences is the same sequence of kernels for every B-row batch, so it is
captured once per padded batch size and replayed: one launch instead of hundreds of small ones.
The graph reads its inputs from static buffers; the engine copies a step's inputs in and pads the
rest (padded rows write no KV: slot -1; they attend over one key of the null block). The block
table is the engine's persistent device table, gathered by slot inside the graph, so appending
blocks between replays needs no re-capture. The LM head runs outside the graph, on the sampling
rows only, so a graph's output is just [B, hidden].
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from kiln.engine.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)


def default_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 256 and every 32 beyond, up to (and including) max_batch_size."""
    sizes = [1, 2, 4, 8, *range(16, 257, 8), *range(288, max_batch_size + 32, 32)]
    out = sorted({s for s in sizes if s < max_batch_size} | {max_batch_size})
    return out


class DecodeGraphRunner:
    """Captures ``forward_hidden(input_ids, positions, attn) -> [B, H]`` at each padded batch size."""

    def __init__(
        self,
        forward_hidden: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        block_table: torch.Tensor,  # [max_batch_size, max_blocks] int32, the engine's persistent table
        batch_sizes: Sequence[int],
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        self._forward = forward_hidden
        self._block_table = block_table
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.batch_sizes[-1]
        self._max_seq_len = max_seq_len
        n = self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.slots = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token per row
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _run(self, b: int) -> torch.Tensor:
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            block_tables=self._block_table.index_select(0, self.slots[:b]),  # [b, max_blocks]
            seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            max_query_len=1,
            max_seq_len=self._max_seq_len,  # an upper bound: the kernel's grid must not change
            num_decode_seqs=b,
            num_decode_tokens=b,
        )
        return self._forward(self.input_ids[:b], self.positions[:b], attn)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every size, largest first, into one shared memory pool."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.batch_sizes):
            self._reset_inputs(0)
            with torch.cuda.stream(stream):
                self._run(b)  # warm-up: Triton JIT and library handles happen outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._outputs[b] = self._run(b)
            self._graphs[b] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs in %.1f s", len(self._graphs), self.capture_seconds)

    def _reset_inputs(self, start: int) -> None:
        """Rows from ``start`` on become padding: token 0, no KV write, one visible key."""
        self.input_ids[start:].zero_()
        self.positions[start:].zero_()
        self.slot_mapping[start:].fill_(-1)
        self.slots[start:].zero_()
        self.seq_lens[start:].fill_(1)

    def padded_size(self, num_seqs: int) -> int | None:
        for b in self.batch_sizes:
            if b >= num_seqs:
                return b
        return None

    def replay(
        self,
        input_ids: torch.Tensor,  # [b] int64
        positions: torch.Tensor,  # [b] int64
        slot_mapping: torch.Tensor,  # [b] int64
        slots: torch.Tensor,  # [b] int64
        seq_lens: torch.Tensor,  # [b] int32
    ) -> torch.Tensor:
        """Run a decode step of b rows through the smallest captured graph that fits; returns [b, H]."""
        b = int(input_ids.shape[0])
        size = self.padded_size(b)
        assert size is not None and size in self._graphs, f"no graph for {b} rows"
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(slot_mapping)
        self.slots[:b].copy_(slots)
        self.seq_lens[:b].copy_(seq_lens)
        if size > b:
            self._reset_inputs(b)
        self._graphs[size].replay()
        return self._outputs[size][:b]
