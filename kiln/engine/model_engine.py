"""ModelEngine: runs one forward step of the model for a ScheduledBatch.

It owns the model weights, the paged KV cache and the device-side block table (one row per
persistent slot, appended to by ``batch.block_updates``). Each step it has the step's inputs built
(step_inputs.py), applies the block copies, runs the model (a decode graph, piecewise graphs or
eagerly), and computes logits only for the rows that sample (and, when asked, prompt logprobs in
bounded slices).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kiln.builder.loader import load_model
from kiln.builder.model_config import ModelInfo
from kiln.config import EngineLimits, KvCacheConfig
from kiln.engine.attention_metadata import AttentionMetadata
from kiln.engine.compile import CompiledLayers, compile_decoder_layers
from kiln.engine.cuda_graphs import DEFAULT_LOGITS_MAX_BATCH, DecodeGraphRunner, default_graph_batch_sizes
from kiln.engine.kv_cache import (
    KvCache,
    KvCacheSpec,
    blocks_for_tokens,
    cpu_default_num_blocks,
    num_blocks_for_bytes,
)
from kiln.engine.piecewise_graphs import (
    PiecewiseGraphRunner,
    PromptAttention,
    default_piecewise_sizes,
    prompt_graph_sizes,
)
from kiln.engine.prompt_logprobs import PromptLogprobsComputer
from kiln.engine.staging import HostStaging
from kiln.engine.step_inputs import StepInputBuilder
from kiln.engine.synthetic_batches import covering_shapes, profile_batch, synthetic_batch, warm_up_shapes
from kiln.executor.messages import PromptLogprobs, ScheduledBatch
from kiln.plugins import PluginSet

# KILN_PROMPT_GRAPHS=0: a lone fresh prompt runs through the piecewise graphs, not its own prompt graph
PROMPT_GRAPHS_ENV = "KILN_PROMPT_GRAPHS"

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
        self._inputs = StepInputBuilder(limits, self.block_table, self.tokens_per_block, self._staging)
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
        self.warm_up_seconds = 0.0  # warm_up_steps: first-use steps and SDPA plans (GPU only)
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
                sizes = piecewise_token_sizes or default_piecewise_sizes(limits.max_num_tokens)
                prompt_attention = self._prompt_graph_attention()
                self.pieces = PiecewiseGraphRunner(
                    self.model.model,
                    self.kv_cache.layers,
                    sizes,
                    self.device,
                    prompt_attention=prompt_attention,
                    prompt_sizes=prompt_graph_sizes(sizes, limits.max_seq_len) if prompt_attention else (),
                )
                self.pieces.capture()
        if self.device.type == "cuda":
            self.warm_up_steps()

    def _prompt_graph_attention(self) -> PromptAttention | None:
        """The attention for prompt graphs (one graph for the whole prefill of a lone fresh prompt, see
        piecewise_graphs.py): with ``paged_attention_sdpa`` (which takes such a prompt to SDPA) on layers
        without a sliding window; None otherwise or with ``KILN_PROMPT_GRAPHS=0``."""
        from kiln.layers.attention import PagedAttention

        if os.environ.get(PROMPT_GRAPHS_ENV, "1") == "0":
            return None
        attns = [m for m in self.model.modules() if isinstance(m, PagedAttention)]  # in layer order
        windowed = any(a.sliding_window for a in attns)
        if windowed or self.plugins.choice["attention"] != (_SDPA_ATTENTION, "forward"):
            return None
        from kiln.plugins.sdpa_prefill import lone_prompt_attention

        assert self.kv_cache is not None
        return lone_prompt_attention([a.scale for a in attns], self.kv_cache.layers)

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
        start = time.perf_counter()
        for computed, new in self.warm_up_shapes():
            batch, blocks = synthetic_batch(computed, new, self.tokens_per_block)
            if blocks <= self.num_blocks:
                self.forward(batch)
        if self.plugins.choice["attention"] == (_SDPA_ATTENTION, "forward"):
            self._warm_up_sdpa_plans()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.block_table.zero_()
        self.warm_up_seconds = time.perf_counter() - start

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
        self._inputs.validate(batch, prev_sampled, self.num_blocks)
        self._prompt_logprobs.record_slots(batch.slot_inits)
        step = self._inputs.build(batch, prev_sampled, graph_step=self._fits_graph(batch))
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
