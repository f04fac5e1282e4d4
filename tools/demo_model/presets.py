"""Shapes and training recipes of the two demo models (one place, read by training and export)."""

from __future__ import annotations

from dataclasses import dataclass

VOCAB_SIZE = 4096  # byte-level BPE; ~3.4 bytes/token on stdlib code (8192 gains only ~7.5%)
CONTEXT = 1024
SEED = 20251117


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 64

    def llama_config_kwargs(self) -> dict:
        return dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=CONTEXT,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=[0, 4],  # <|endoftext|>, <|end|>
            pad_token_id=0,
            attention_bias=False,
            mlp_bias=False,
        )


@dataclass(frozen=True)
class Recipe:
    """One training run. Steps come from `epochs`, capped by what fits `max_seconds` on the card."""

    name: str
    model: str  # "base" | "draft": which exported directory it may become
    shape: ModelShape
    epochs: float
    max_seconds: float
    lr: float
    dropout: float  # on the attention and MLP branch outputs, training only
    batch: int = 32  # sequences of CONTEXT tokens per step
    warmup: int = 100
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1


BASE_SHAPE = ModelShape(hidden=256, layers=10, heads=4, kv_heads=2, intermediate=768)  # ~8.9M params
DRAFT_SHAPE = ModelShape(hidden=192, layers=4, heads=3, kv_heads=1, intermediate=512)  # ~2.4M params

# The corpus is small (~9M tokens): two base recipes bracket the number of passes over it, and the
# one with the lower validation loss becomes the shipped base model.
RECIPES = {
    "base-a": Recipe("base-a", "base", BASE_SHAPE, epochs=8, max_seconds=100, lr=2e-3, dropout=0.1),
    "base-b": Recipe("base-b", "base", BASE_SHAPE, epochs=20, max_seconds=150, lr=2e-3, dropout=0.2),
    "draft": Recipe("draft", "draft", DRAFT_SHAPE, epochs=16, max_seconds=70, lr=3e-3, dropout=0.05),
}
