"""CUDA graphs for generation-only steps.

A decode step of B sequences is the same sequence of kernels for every B-row batch, so it is
captured once per padded batch size and replayed: one launch instead of hundreds of small ones.
The graph reads its inputs from one static [5, B] buffer (input ids, positions, slots, KV lengths,
and for overlap scheduling the row of the previous step's sampled tokens each input token is, or
-1) and a static copy of those sampled tokens. A replay is one copy of the step's rows (plus one for
the padding rows, one for the sampled tokens) and the launch. Everything else is computed inside
the graph, so it costs no host launch: the input tokens, the block-table rows (the engine's
persistent device table, gathered by slot, so appending blocks between replays needs no
re-capture) and the KV write slots, all in one kernel on the GPU (``decode_inputs.py``). Padded
rows have slot -1: they write no KV and attend over one key of the null block.

A graph's output is [B, hidden]. Up to ``logits_max_batch`` rows the LM head runs inside the graph
too and the logits [B, vocab] are a second output, and so is their greedy sample (tokens and
logprobs, as ``greedy_sample`` packs them) where a greedy sampler is given: at small batches a step
is as much host work as GPU work, and launching these from Python costs more host time than their
kernels take (their outputs are kept per size, so only small sizes pay the memory; a step that does
not sample greedily leaves the few microseconds of greedy kernels unused). Larger graphs leave the
LM head to the caller, which runs it on the sampling rows only. A graph that samples also leaves
its tokens in the static copy of sampled tokens, so the next step's replay copies none when the
step used them.

Without ``capture`` (the CPU) the runner replays by calling the same function eagerly: the graph
path's inputs and padding are then testable without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kiln.engine.attention_metadata import AttentionMetadata
from kiln.engine.decode_inputs import POSITIONS, decode_inputs

log = logging.getLogger(__name__)


def default_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 256 and every 32 beyond, up to (and including) max_batch_size."""
    sizes = [1, 2, 4, 8, *range(16, 257, 8), *range(288, max_batch_size + 32, 32)]
    out = sorted({s for s in sizes if s < max_batch_size} | {max_batch_size})
    return out


# rows of the static input buffer: INPUT_IDS, POSITIONS, SLOTS, SEQ_LENS, PREV_ROWS (decode_inputs.py)
_PAD_ROW = (0, 0, -1, 1, -1)  # a padded row: token 0 at position 0, no slot, one visible key


# Graph sizes up to this capture the LM head too (see above): 31 rows of logits in all, ~8 MB at a
# 128k vocabulary in bf16
DEFAULT_LOGITS_MAX_BATCH = 16


@dataclass
class GraphOutput:
    """One replay's outputs for its b real rows (views of the graph's static buffers: valid until the
    next replay of that graph, which the stream orders after every use of this step's)."""

    hidden: torch.Tensor  # [b, H]
    logits: torch.Tensor | None = None  # [b, V] where the graph ran the LM head
    # where the graph also sampled greedily and has no padding rows: tokens [b] int64, packed [2b] int32
    greedy: tuple[torch.Tensor, torch.Tensor] | None = None


class DecodeGraphRunner:
    """Captures ``forward_hidden(input_ids, positions, attn) -> [B, H]`` at each padded batch size,
    and ``compute_logits(hidden) -> [B, V]`` and ``sample_greedy(logits) -> (tokens, packed)`` after
    it at sizes up to ``logits_max_batch``."""

    def __init__(
        self,
        forward_hidden: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        block_table: torch.Tensor,  # [max_batch_size, max_blocks] int32, the engine's persistent table
        batch_sizes: Sequence[int],
        max_seq_len: int,
        tokens_per_block: int,
        device: torch.device,
        capture: bool = True,
        compute_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logits_max_batch: int = 0,
        sample_greedy: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self._forward = forward_hidden
        self._compute_logits = compute_logits
        self._sample_greedy = sample_greedy
        self.logits_max_batch = logits_max_batch if compute_logits is not None else 0
        self._block_table = block_table
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.batch_sizes[-1]
        self._max_seq_len = max_seq_len
        self._tokens_per_block = tokens_per_block
        self._capture = capture
        n = self.max_batch_size
        # rows padded to a multiple of 16 elements: each row's start stays 128-byte aligned, as compiled
        # kernels expect of their inputs
        row = -(-n // 16) * 16
        self.inputs = torch.tensor(_PAD_ROW, dtype=torch.int64, device=device)[:, None].repeat(1, row)[:, :n]
        self._padding = self.inputs.clone()  # copied over the rows a step leaves unused
        # the last step's samples: one per slot at most, and that step may have been wider than any graph
        self.prev_tokens = torch.zeros(block_table.shape[0], dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token per row
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, GraphOutput] = {}  # by size, all B rows
        # the greedy tokens the last replay returned, which that graph also left in prev_tokens: when
        # the next step reads them, its replay copies nothing
        self._tokens_in_prev: torch.Tensor | None = None
        self.capture_seconds = 0.0

    def _run(self, b: int) -> GraphOutput:
        hidden = self._run_hidden(b)
        if b > self.logits_max_batch:
            return GraphOutput(hidden)
        assert self._compute_logits is not None
        logits = self._compute_logits(hidden)
        if self._sample_greedy is None:
            return GraphOutput(hidden, logits)
        greedy = self._sample_greedy(logits)
        self.prev_tokens[:b].copy_(greedy[0])  # where the next step reads them, should it take these
        return GraphOutput(hidden, logits, greedy)

    def _run_hidden(self, b: int) -> torch.Tensor:
        rows = self.inputs[:, :b]
        input_ids, slot_mapping, tables, seq_lens = decode_inputs(
            rows, self.prev_tokens, self._block_table, self._tokens_per_block
        )
        attn = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=tables,
            seq_lens=seq_lens,
            query_start_loc=self.query_start_loc[: b + 1],
            max_query_len=1,
            max_seq_len=self._max_seq_len,  # an upper bound: the kernel's grid must not change
            num_decode_seqs=b,
            num_decode_tokens=b,
        )
        return self._forward(input_ids, rows[POSITIONS], attn)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every size, largest first, into one shared memory pool."""
        if not self._capture:
            return
        t0 = time.perf_counter()
        self._tokens_in_prev = None
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.batch_sizes):
            self.inputs.copy_(self._padding)
            stream.wait_stream(torch.cuda.current_stream())  # the buffers are set up on that stream
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

    def padded_size(self, num_seqs: int) -> int | None:
        for b in self.batch_sizes:
            if b >= num_seqs:
                return b
        return None

    def replay(self, rows: torch.Tensor, prev_sampled: torch.Tensor | None = None) -> GraphOutput:
        """Run a decode step through the smallest captured graph that fits; returns its outputs for
        the b rows (the greedy sample only where b is the graph's size: its packed words interleave
        no padding then).

        ``rows`` [5, b] int64: the rows named above; ``prev_sampled`` [R'] int64: the previous step's
        sampled tokens, which PREV_ROWS index (None when no row reads them)."""
        b = int(rows.shape[1])
        size = self.padded_size(b)
        assert size is not None and (size in self._graphs or not self._capture), f"no graph for {b} rows"
        if prev_sampled is not None and prev_sampled is not self._tokens_in_prev:
            r = int(prev_sampled.shape[0])
            assert r <= self.prev_tokens.shape[0], f"{r} sampled rows, room for {self.prev_tokens.shape[0]}"
            self.prev_tokens[:r].copy_(prev_sampled)
        self.inputs[:, :b].copy_(rows)
        if size > b:
            self.inputs[:, b:size].copy_(self._padding[:, : size - b])
        if self._capture:
            self._graphs[size].replay()
            out = self._outputs[size]
        else:
            out = self._run(size)
        self._tokens_in_prev = out.greedy[0] if size == b and out.greedy is not None else None
        if size == b:
            return out
        return GraphOutput(out.hidden[:b], None if out.logits is None else out.logits[:b])
