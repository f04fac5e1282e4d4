"""ModelEngine: runs one forward step of the model for a ScheduledBatch.

It owns the model weights, the paged KV cache and the device-side block table (one row per
persistent slot, appended to by ``batch.block_updates``). Each step it builds the packed inputs and
the AttentionMetadata with vectorised numpy, moves them to the device in a single copy, applies the
step's block-table updates and block copies, runs the model, and computes logits only for the rows
that sample (and, when asked, prompt logprobs in bounded slices). With overlap scheduling, decode
input tokens not known on the host are gathered on the device from the previous step's sampled tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kiln.builder.loader import load_model
from kiln.builder.model_config import ModelInfo
from kiln.config import EngineLimits, KvCacheConfig
from kiln.engine.attention_metadata import AttentionMetadata, FreshPrompts
from kiln.engine.compile import CompiledLayers, compile_decoder_layers
from kiln.engine.cuda_graphs import DEFAULT_LOGITS_MAX_BATCH, DecodeGraphRunner, default_graph_batch_sizes
from kiln.engine.kv_cache import (
    KvCache,
    KvCacheSpec,
    blocks_for_tokens,
    cpu_default_num_blocks,
    num_blocks_for_bytes,
)
from kiln.engine.piecewise_graphs import PiecewiseGraphRunner, default_piecewise_sizes
from kiln.engine.prompt_logprobs import PromptLogprobsComputer
from kiln.engine.staging import HostStaging
from kiln.engine.synthetic_batches import covering_shapes, profile_batch, synthetic_batch, warm_up_shapes
from kiln.executor.messages import PromptLogprobs, ScheduledBatch
from kiln.plugins import PluginSet

# The attention plugin that hands a lone fresh prompt to torch SDPA (cuDNN) and the rest to Triton, and
# those whose steps launch the built-in Triton kernel.
_SDPA_ATTENTION = "paged_attention_sdpa"
_TRITON_ATTENTION = ("paged_attention", _SDPA_ATTENTION)


@dataclass
class ForwardOutput:
    """``prompt_logprobs`` follow the chunk convention of kiln/engine/prompt_logprobs.py: one entry per
    requested context chunk; concatenated over a prompt's chunks they score tokens 1 .. P-1."""

    logits: torch.Tensor  # [R, V] model dtype, row r = last token of sequence batch.sample_rows[r]
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    # the logits' greedy sample, where a decode graph computed it (``greedy_sample``'s tokens, packed)
    greedy: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class StepInputs:
    """Device tensors of one step (what the model and the logits gather need)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata | None  # None for a graph step: the graph builds its own
    # graph step: [5, S] int64 input ids, positions, slots, KV lengths, rows of the previous step's samples
    graph_rows: torch.Tensor | None
    slots: torch.Tensor  # [S] int64
    sample_token_idx: torch.Tensor  # [Ru] int64: packed index of each distinct sampling row's last token
    sample_inverse: torch.Tensor | None  # [R] int64 into [Ru]; None when rows are distinct and in order
    sample_all_in_order: bool  # the sampling rows are exactly the packed tokens 0..T-1, in order
    copy_src: torch.Tensor | None  # [C] int64
    copy_dst: torch.Tensor | None


class ModelEngine:
    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        limits: EngineLimits,
        kv_config: KvCacheConfig,
        plugins: PluginSet | None = None,
        cuda_graphs: bool = True,
        cuda_graph_batch_sizes: list[int] | None = None,
        # prefill and mixed steps through piecewise graphs (with cuda_graphs, on CUDA)
        piecewise_graphs: bool = True,
        piecewise_token_sizes: list[int] | None = None,
        compile: bool | None = None,  # torch.compile the decoder layers; None = on CUDA only
        # Called as sampler_warm_up(vocab_size, device) inside the KV-sizing warm-up, while that
        # step's logits are alive, so the sampler's peak workspace (top-p sorts) is counted too.
        sampler_warm_up: Callable[[int, torch.device], object] | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.limits, self.kv_config = limits, kv_config
        self._sampler_warm_up = sampler_warm_up
        self.plugins = plugins or PluginSet("reference")
        self.info: ModelInfo
        self.model, self.info = load_model(
            model_dir, dtype=dtype, device=self.device, plugins=self.plugins, max_positions=limits.max_seq_len
        )
        self.dtype = self.info.dtype
        self.vocab_size = self.info.vocab_size
        self.tokens_per_block = kv_config.tokens_per_block
        self.max_blocks_per_seq = math.ceil(limits.max_seq_len / self.tokens_per_block)
        # [max_batch_size, max_blocks_per_seq] int32 by slot; 0 (the null block) where unassigned
        self.block_table = torch.zeros(
            limits.max_batch_size, self.max_blocks_per_seq, dtype=torch.int32, device=self.device
        )
        self._staging = HostStaging(self.device)
        self._prompt_logprobs = PromptLogprobsComputer(self.model.compute_logits, self.vocab_size)
        cfg = self.info.config
        assert cfg is not None
        self.kv_spec = KvCacheSpec(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.tokens_per_block, self.dtype
        )
        self.num_blocks = 0
        self.kv_cache: KvCache | None = None
        self.graphs: DecodeGraphRunner | None = None  # captured after the KV pool exists
        self.pieces: PiecewiseGraphRunner | None = None
        # compiled first: the KV-sizing warm-up and the CUDA-graph capture then run compiled code
        self.compiled: CompiledLayers | None = None
        if compile if compile is not None else self.device.type == "cuda":
            # by default (compile=None) a failure is logged and the layers run eagerly
            self.compiled = compile_decoder_layers(
                self.model, self.kv_spec, self.max_blocks_per_seq, strict=compile is not None
            )
        self.compile_seconds = self.compiled.seconds if self.compiled is not None else 0.0
        num_blocks = self._plan_num_blocks()
        self.kv_cache = KvCache(self.kv_spec, num_blocks, self.device)
        self.num_blocks = num_blocks
        if cuda_graphs and self.device.type == "cuda":
            from kiln.plugins.triton.greedy_sample import greedy_sample  # (Triton: CUDA only)

            self.graphs = DecodeGraphRunner(
                self._forward_hidden,
                self.block_table,
                cuda_graph_batch_sizes or default_graph_batch_sizes(limits.max_batch_size),
                limits.max_seq_len,
                self.tokens_per_block,
                self.device,
                compute_logits=self.model.compute_logits,
                logits_max_batch=DEFAULT_LOGITS_MAX_BATCH,
                sample_greedy=greedy_sample,
            )
            self.graphs.capture()
            if piecewise_graphs:
                self.pieces = PiecewiseGraphRunner(
                    self.model.model,
                    self.kv_cache.layers,
                    piecewise_token_sizes or default_piecewise_sizes(limits.max_num_tokens),
                    self.device,
                )
                self.pieces.capture()
        if self.device.type == "cuda":
            self.warm_up_steps()

    # ------------------------------------------------------------------ sizing

    def _plan_num_blocks(self) -> int:
        if self.kv_config.max_tokens is not None:
            return blocks_for_tokens(self.kv_config.max_tokens, self.tokens_per_block)
        if self.device.type != "cuda":
            return cpu_default_num_blocks(self.kv_spec, self.limits)
        return self._profile_num_blocks()

    def _profile_num_blocks(self) -> int:
        """Run a warm-up step at max_num_tokens on a temporary cache, measure the activation peak, then
        give free_gpu_memory_fraction of what is left (after weights and that peak) to the KV pool."""
        batch, blocks_needed = profile_batch(self.limits, self.tokens_per_block)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.kv_cache = KvCache(self.kv_spec, blocks_needed, self.device)
        self.num_blocks = blocks_needed
        temp_bytes = self.kv_cache.nbytes
        fwd = self.forward(batch)
        if self._sampler_warm_up is not None:
            self._sampler_warm_up(self.vocab_size, self.device)
        del fwd
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - base - temp_bytes
        self.kv_cache.close()
        self.kv_cache = None
        self.block_table.zero_()
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(self.device)
        budget = int((free - activation_peak) * self.kv_config.free_gpu_memory_fraction)
        num_blocks = num_blocks_for_bytes(self.kv_spec, budget)
        if num_blocks < 2:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {free / 2**30:.2f} GiB free after loading weights, "
                f"warm-up activations need {activation_peak / 2**30:.2f} GiB; lower max_num_tokens or "
                "max_batch_size, or use a smaller dtype"
            )
        return num_blocks

    def warm_up_shapes(self) -> list[tuple[list[int], list[int]]]:
        """The start-up steps: the kinds of full-budget mixed step, then small steps that reach the
        attention kernel variants those do not (with the Triton attention plugin)."""
        shapes = warm_up_shapes(self.limits)
        variants_of = self.attention_variants()
        if variants_of is not None:
            shapes += covering_shapes(self.limits, variants_of, shapes)
        return shapes

    def attention_variants(self) -> Callable[[list[int], list[int]], set] | None:
        """(num_computed, num_new) of a step -> the Triton attention variants it launches; None
        unless attention runs the built-in Triton kernel (``paged_attention_sdpa`` falls back to it)."""
        name, backend = self.plugins.choice["attention"]
        if backend != "forward" or name not in _TRITON_ATTENTION:
            return None
        from kiln.plugins.triton.attention_plan import step_variants

        cfg = self.info.config
        assert cfg is not None
        variants_of = step_variants(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim,
                                    self.dtype, self.device)  # fmt: skip
        if name != _SDPA_ATTENTION or all(cfg.sliding_windows):  # SDPA never takes a windowed layer's
            return variants_of
        from kiln.plugins.sdpa_prefill import without_fresh_prompts

        # steps that run through the piecewise graphs launch their attention eagerly, where the plugin
        # can hand several fresh prompts to SDPA; others only a lone one
        split_up_to = self.pieces.max_tokens if self.pieces is not None else 0
        split = without_fresh_prompts(variants_of, cfg.num_heads * cfg.head_dim, split_up_to)
        if not any(cfg.sliding_windows):
            return split
        # some layers windowed: they launch the whole step on the Triton kernel, the others the split
        return lambda computed, new: split(computed, new) | variants_of(computed, new)

    def warm_up_steps(self) -> None:
        """Run the steps of ``warm_up_shapes`` on the (still empty) KV pool, so their first-use work
        is done at start-up; the block-table rows they used are cleared afterwards."""
        for computed, new in self.warm_up_shapes():
            batch, blocks = synthetic_batch(computed, new, self.tokens_per_block)
            if blocks <= self.num_blocks:
                self.forward(batch)
        if self.plugins.choice["attention"] == (_SDPA_ATTENTION, "forward"):
            self._warm_up_sdpa_plans()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.block_table.zero_()

    def _warm_up_sdpa_plans(self) -> int:
        """paged_attention_sdpa: every padded prompt length's SDPA plan, built now (see its module);
        none when every layer has a sliding window (no step then takes the SDPA path)."""
        from kiln.layers.attention import PagedAttention
        from kiln.plugins import sdpa_prefill

        cfg = self.info.config
        if cfg is not None and all(cfg.sliding_windows):
            return 0

        attn = next(m for m in self.model.modules() if isinstance(m, PagedAttention))
        longest_prompt_step = min(self.limits.max_num_tokens, self.limits.max_seq_len)
        return sdpa_prefill.warm_up(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, self.dtype,
                                    self.device, longest_prompt_step, self.tokens_per_block)  # fmt: skip

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def forward(self, batch: ScheduledBatch, prev_sampled: torch.Tensor | None = None) -> ForwardOutput:
        """``prev_sampled`` [R'] int64 on the device: the previous step's sampled tokens, which
        ``batch.prev_sample_rows`` index (needed only when the batch reads them)."""
        assert self.kv_cache is not None, "forward() after close()"
        self._validate(batch, prev_sampled)
        self._prompt_logprobs.record_slots(batch.slot_inits)
        step = self._prepare(batch, prev_sampled)
        if step.copy_src is not None and step.copy_dst is not None:
            self.kv_cache.copy_blocks(step.copy_src, step.copy_dst)  # before this step's KV writes
        logits = greedy = None
        if step.graph_rows is not None:  # generation-only step: replay the graph of the padded size
            assert self.graphs is not None
            out = self.graphs.replay(step.graph_rows, prev_sampled if batch.reads_prev_samples else None)
            hidden, logits = out.hidden, out.logits
            if step.sample_all_in_order:  # the graph's rows are the sampling rows
                greedy = out.greedy
        elif self.pieces is not None and batch.num_tokens <= self.pieces.max_tokens:
            assert step.attn is not None  # (the hidden states are the graphs' memory: used right away)
            hidden = self.pieces.run(step.input_ids, step.positions, step.attn)
        else:
            assert step.attn is not None
            hidden = self._forward_hidden(step.input_ids, step.positions, step.attn)  # [T, H]
        if logits is not None:  # the graph ran the LM head on every row
            if not step.sample_all_in_order:
                logits = logits.index_select(0, step.sample_token_idx)
        elif step.sample_all_in_order:  # every token samples, in order: no gather
            logits = self.model.compute_logits(hidden)
        else:
            logits = self.model.compute_logits(hidden.index_select(0, step.sample_token_idx))  # [Ru, V]
        if step.sample_inverse is not None:
            logits = logits.index_select(0, step.sample_inverse)  # [R, V]
        prompt_lps = self._prompt_logprobs.compute(batch, hidden) if len(batch.prompt_logprob_rows) else []
        return ForwardOutput(logits=logits, prompt_logprobs=prompt_lps, greedy=greedy)

    def _forward_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        assert self.kv_cache is not None
        return self.model(input_ids, positions, attn, self.kv_cache.layers)  # [T, H]

    def _fits_graph(self, batch: ScheduledBatch) -> bool:
        """A decode-only step that a captured graph can run."""
        return (
            self.graphs is not None
            and 0 < batch.num_seqs <= self.graphs.max_batch_size
            and batch.num_decode == batch.num_seqs
        )

    def _validate(self, batch: ScheduledBatch, prev_sampled: torch.Tensor | None) -> None:
        lim = self.limits
        prev_rows = np.asarray(batch.prev_sample_rows)
        if prev_rows.size and prev_rows.size != batch.num_decode:
            raise ValueError(
                f"prev_sample_rows has {prev_rows.size} rows, the batch {batch.num_decode} decodes"
            )
        if batch.reads_prev_samples:
            num_prev = 0 if prev_sampled is None else int(prev_sampled.shape[0])
            if prev_rows.max() >= num_prev:
                raise ValueError(
                    f"prev_sample_rows reads row {int(prev_rows.max())} of the previous step's sampled "
                    f"tokens, which has {num_prev}: pass that step's tokens as prev_sampled"
                )
        num_new = np.asarray(batch.num_new_tokens)
        if batch.num_seqs > lim.max_batch_size or batch.num_tokens > lim.max_num_tokens:
            raise ValueError(
                f"batch of {batch.num_seqs} sequences / {batch.num_tokens} tokens exceeds the engine limits "
                f"(max_batch_size={lim.max_batch_size}, max_num_tokens={lim.max_num_tokens})"
            )
        if num_new.size and (num_new.min() < 1 or int(num_new.sum()) != batch.num_tokens):
            raise ValueError(
                "every scheduled sequence needs >= 1 new token, and input_ids must hold all of them"
            )
        if num_new.size and int((np.asarray(batch.num_computed) + num_new).max()) > lim.max_seq_len:
            raise ValueError(f"a sequence exceeds max_seq_len={lim.max_seq_len}")
        slots = np.asarray(batch.slots)
        if slots.size and (slots.min() < 0 or slots.max() >= lim.max_batch_size):
            raise ValueError(f"slots must be in [0, {lim.max_batch_size})")
        upd = np.asarray(batch.block_updates).reshape(-1, 3)
        if upd.size and (
            upd.min() < 0
            or upd[:, 0].max() >= lim.max_batch_size
            or upd[:, 1].max() >= self.max_blocks_per_seq
            or upd[:, 2].max() >= self.num_blocks
        ):
            raise ValueError(
                f"block update out of range (block index < {self.max_blocks_per_seq}, id < {self.num_blocks})"
            )
        cp = np.asarray(batch.copy_blocks).reshape(-1, 2)
        if cp.size and (cp.min() < 1 or cp.max() >= self.num_blocks):
            raise ValueError(f"copy_blocks ids must be in [1, {self.num_blocks})")

    def _prepare(self, batch: ScheduledBatch, prev_sampled: torch.Tensor | None = None) -> StepInputs:
        if self._fits_graph(batch):
            short = self._prepare_graph_step(batch)
            if short is not None:
                return short
        num_seqs, num_tokens = batch.num_seqs, batch.num_tokens
        prev_rows = np.asarray(batch.prev_sample_rows, dtype=np.int64) if batch.reads_prev_samples else None
        num_new = np.asarray(batch.num_new_tokens, dtype=np.int64)
        num_computed = np.asarray(batch.num_computed, dtype=np.int64)
        slots = np.asarray(batch.slots, dtype=np.int64)
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        seq_lens = num_computed + num_new
        # position of packed token t = its sequence's first position + its offset in the chunk
        offsets = np.repeat(num_computed - query_start[:-1], num_new)
        positions = np.arange(num_tokens, dtype=np.int64) + offsets
        token_slots = np.repeat(slots, num_new)
        sample_rows = np.asarray(batch.sample_rows, dtype=np.int64)
        uniq, inverse = np.unique(sample_rows, return_inverse=True)
        in_order = uniq.size == sample_rows.size and bool(np.all(uniq == sample_rows))
        sample_token_idx = query_start[1:][uniq] - 1  # last token of each distinct sampling sequence
        updates = np.asarray(batch.block_updates, dtype=np.int64).reshape(-1, 3)
        copies = np.asarray(batch.copy_blocks, dtype=np.int64).reshape(-1, 2)
        graph_step = self._fits_graph(batch)
        if graph_step and prev_rows is None:
            prev_rows_in = np.full(num_seqs, -1, np.int64)  # a graph always reads this row: none here
        else:
            prev_rows_in = np.zeros(0, np.int64) if prev_rows is None else prev_rows
        # The first five are a graph step's [5, S] input rows (one token per sequence: token slots are
        # the slots; every row decodes), contiguous in the staged buffer: a replay copies them at once.
        segments = [
            np.asarray(batch.input_ids, dtype=np.int64),
            positions,
            token_slots,
            seq_lens,
            prev_rows_in,
            slots,
            query_start,
            sample_token_idx,
            inverse.reshape(-1),
            updates.T.reshape(-1),  # slot row | block index row | block id row
            copies.T.reshape(-1),  # src row | dst row
        ]
        flat, parts = self._staging.to_device_packed(segments)
        (input_ids, positions_d, token_slots_d, seq_lens_d, prev_rows_d, slots_d, query_start_d, sample_idx_d,
         inverse_d, updates_d, copies_d) = parts  # fmt: skip
        if prev_rows is not None and not graph_step:  # (a graph reads the previous tokens itself)
            assert prev_sampled is not None
            # decode rows come first, one token each: packed token i is decode row i
            d = prev_rows.size
            read = prev_sampled.index_select(0, prev_rows_d.clamp(min=0))  # [D] int64
            input_ids[:d] = torch.where(prev_rows_d >= 0, read, input_ids[:d])

        if updates.shape[0]:
            upd = updates_d.view(3, -1)
            self.block_table[upd[0], upd[1]] = upd[2].to(torch.int32)  # vectorised index_put
        graph_rows = attn = None
        if graph_step:  # the graph builds the block tables and KV slots itself
            graph_rows = flat[: 5 * num_seqs].view(5, num_seqs)
        else:
            block_tables = self.block_table.index_select(0, slots_d)  # [S, max_blocks] int32
            tpb = self.tokens_per_block
            token_blocks = self.block_table[token_slots_d, positions_d // tpb]  # [T] int32
            slot_mapping = token_blocks.to(torch.int64) * tpb + positions_d % tpb  # [T] int64
            attn = AttentionMetadata(
                slot_mapping=slot_mapping,
                block_tables=block_tables,
                seq_lens=seq_lens_d.to(torch.int32),
                query_start_loc=query_start_d.to(torch.int32),
                max_query_len=int(num_new.max()) if num_seqs else 0,
                max_seq_len=int(seq_lens.max()) if num_seqs else 0,
                num_decode_seqs=int(batch.num_decode),
                num_decode_tokens=int(batch.num_decode),
                fresh_prompts=FreshPrompts.of_step(num_computed, num_new, int(batch.num_decode)),
            )
        copy_src = copy_dst = None
        if copies.shape[0]:
            cp = copies_d.view(2, -1)
            copy_src, copy_dst = cp[0], cp[1]
        return StepInputs(
            input_ids=input_ids,
            positions=positions_d,
            attn=attn,
            graph_rows=graph_rows,
            slots=slots_d,
            sample_token_idx=sample_idx_d,
            sample_inverse=None if in_order else inverse_d,
            sample_all_in_order=in_order and uniq.size == num_tokens,
            copy_src=copy_src,
            copy_dst=copy_dst,
        )

    def _prepare_graph_step(self, batch: ScheduledBatch) -> StepInputs | None:
        """The common decode graph step (every row one token and one sample, in order) with only the
        arrays the graph reads: at batch 1 the general preparation is mostly numpy calls whose results a
        graph step does not use, and a small model's step is as much host work as GPU work. None:
        another kind of step (e.g. forked rows sampling one sequence twice)."""
        s = batch.num_seqs
        sample_rows = np.asarray(batch.sample_rows)
        if batch.num_tokens != s or sample_rows.shape != (s,) or (sample_rows != np.arange(s)).any():
            return None
        num_computed = np.asarray(batch.num_computed, dtype=np.int64)
        if batch.reads_prev_samples:
            prev_rows = np.asarray(batch.prev_sample_rows, dtype=np.int64)
        else:
            prev_rows = np.full(s, -1, np.int64)  # a graph always reads this row: none here
        updates = np.asarray(batch.block_updates, dtype=np.int64).reshape(-1, 3)
        copies = np.asarray(batch.copy_blocks, dtype=np.int64).reshape(-1, 2)
        # the graph's [5, S] rows first (input ids, positions, slots, KV lengths, previous-sample rows):
        # one token a row, so a row's position is its computed length and its token slot its slot
        segments = [batch.input_ids, num_computed, batch.slots, num_computed + 1, prev_rows, np.arange(s),
                    updates.T.reshape(-1), copies.T.reshape(-1)]  # fmt: skip
        flat, parts = self._staging.to_device_packed(segments)
        input_ids, positions, slots, _lens, _prev, sample_idx, updates_d, copies_d = parts
        if updates.shape[0]:
            upd = updates_d.view(3, -1)
            self.block_table[upd[0], upd[1]] = upd[2].to(torch.int32)
        copy_src = copy_dst = None
        if copies.shape[0]:
            cp = copies_d.view(2, -1)
            copy_src, copy_dst = cp[0], cp[1]
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            attn=None,
            graph_rows=flat[: 5 * s].view(5, s),
            slots=slots,
            sample_token_idx=sample_idx,
            sample_inverse=None,
            sample_all_in_order=True,
            copy_src=copy_src,
            copy_dst=copy_dst,
        )

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Free the KV cache and the weights; the engine cannot run afterwards."""
        if self.kv_cache is not None:
            self.kv_cache.close()
            self.kv_cache = None
        # the graphs hold their memory pools and (the pieces) views of the KV pool
        self.graphs = self.pieces = None
        self.model = None  # type: ignore[assignment]
        self.block_table = torch.empty(0, dtype=torch.int32)
        self._staging.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
