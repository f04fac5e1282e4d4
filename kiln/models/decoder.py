"""The shared decoder-only transformer of the Llama family (Llama, Mistral, Qwen2, Qwen3).

The families differ only in flags of ``ModelConfig``: biases on q/k/v (and o), per-head q/k RMSNorm,
per-layer sliding windows, RoPE variants, tied embeddings. Parameter names follow the Hugging Face
checkpoints except for the fused projections (``qkv_proj`` = q|k|v, ``gate_up_proj`` = gate|up),
which the loader assembles from the separate checkpoint tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.builder.model_config import ModelConfig
from kiln.engine.attention_metadata import AttentionMetadata
from kiln.layers.attention import PagedAttention
from kiln.layers.embedding import LMHead, VocabEmbedding
from kiln.layers.linear import Linear, MergedLinear
from kiln.layers.mlp import GatedMLP
from kiln.layers.norm import RMSNorm
from kiln.layers.rotary import RotaryEmbedding
from kiln.plugins import PluginSet

KvCache = tuple[torch.Tensor, torch.Tensor]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, plugins: PluginSet) -> None:
        super().__init__()
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        parts = (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size))
        self.qkv_proj = MergedLinear(cfg.hidden_size, parts, bias=cfg.qkv_bias, plugins=plugins)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias, plugins=plugins)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, plugins) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, plugins) if cfg.qk_norm else None
        self.attn = PagedAttention(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            plugins=plugins,
            sliding_window=cfg.sliding_windows[layer_idx],
        )

    def project(
        self,
        hidden: torch.Tensor,  # [T, H]
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KvCache,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """q/k/v projections (and q/k norms), then RoPE and this step's KV write; -> rotated q [T, Hq, D]."""
        return self.project_qkv(self.qkv_proj(hidden), positions, cos_sin_cache, kv_cache, slot_mapping)

    def project_qkv(
        self,
        qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) D], the q|k|v projection's output (bias included)
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KvCache,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """``project`` from the q|k|v projection on."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)  # per head, over D, before RoPE
            k = self.k_norm(k)
        return self.attn.write_kv(q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping)

    def output(self, attn_out: torch.Tensor) -> torch.Tensor:
        """[T, Hq, D] attention output -> [T, H]."""
        return self.o_proj(attn_out.reshape(attn_out.shape[0], self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, plugins: PluginSet) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plugins)
        self.self_attn = SelfAttention(cfg, layer_idx, plugins)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plugins)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, plugins)
        # A chosen add_rms_norm_linear plugin takes each residual add + norm together with the projection
        # after it (q|k|v, gate|up); by default they run apart.
        self.norm_linear_op = (
            plugins.add_rms_norm_linear if plugins.overridden("add_rms_norm_linear") else None
        )

    # A layer is two pieces around its attention: ``pre_attention`` ends with this step's KV write,
    # ``post_attention`` starts from the attention output. Piecewise CUDA graphs capture the pieces
    # and launch the attention between them (kiln/engine/piecewise_graphs.py).
    def pre_attention(
        self,
        hidden: torch.Tensor,  # [T, H]
        residual: torch.Tensor | None,  # [T, H]; None for the first layer
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KvCache,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (rotated q [T, Hq, D], residual [T, H])."""
        # The residual add of the previous sub-block is fused into the next norm.
        attn = self.self_attn
        if residual is not None and self.norm_linear_op is not None:
            norm = self.input_layernorm
            qkv, residual = self.norm_linear_op(hidden, residual, norm.weight, norm.eps, attn.qkv_proj.weight)
            qkv = attn.qkv_proj.add_bias(qkv)
            return attn.project_qkv(qkv, positions, cos_sin_cache, kv_cache, slot_mapping), residual
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return attn.project(hidden, positions, cos_sin_cache, kv_cache, slot_mapping), residual

    def post_attention(
        self, attn_out: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """attention output [T, Hq, D] -> (hidden, residual), the layer's outputs."""
        out = self.self_attn.output(attn_out)
        if self.norm_linear_op is not None:
            norm, gate_up_proj = self.post_attention_layernorm, self.mlp.gate_up_proj
            gate_up, residual = self.norm_linear_op(out, residual, norm.weight, norm.eps, gate_up_proj.weight)
            return self.mlp.from_gate_up(gate_up_proj.add_bias(gate_up)), residual
        hidden, residual = self.post_attention_layernorm(out, residual)
        return self.mlp(hidden), residual

    def forward(
        self,
        hidden: torch.Tensor,  # [T, H]
        residual: torch.Tensor | None,  # [T, H]; None for the first layer
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KvCache,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, residual = self.pre_attention(
            hidden, residual, positions, cos_sin_cache, kv_cache, attn.slot_mapping
        )
        return self.post_attention(self.self_attn.attn.attend(q, kv_cache, attn), residual)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, plugins: PluginSet) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, plugins) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plugins)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T] int64
        attn: AttentionMetadata,
        kv_caches: list[KvCache],
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, H]
        residual: torch.Tensor | None = None
        cos_sin = self.rotary.cos_sin_cache
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, positions, cos_sin, kv, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # [T, H]


class DecoderForCausalLM(nn.Module):
    """``forward`` -> final hidden states of every token; ``compute_logits`` on the rows that need them."""

    def __init__(self, cfg: ModelConfig, plugins: PluginSet) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, plugins)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tied=cfg.tie_word_embeddings, plugins=plugins)
        self.lm_head.tie(self.model.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[KvCache],
    ) -> torch.Tensor:
        return self.model(input_ids, positions, attn, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [R, H] -> [R, V], model dtype

    def materialize_rope(self, max_positions: int, device: torch.device | str) -> None:
        self.model.rotary.materialize(max_positions, device)

    def fused_parts(self) -> dict[str, MergedLinear]:
        """Parameter prefix -> fused projection, for the loader."""
        return {name: mod for name, mod in self.named_modules() if isinstance(mod, MergedLinear)}
