"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.layers.linear import linear_ops, one_row
from kiln.plugins import PluginSet


class VocabEmbedding(nn.Module):
    """weight [V, H]; input ids [T] (int32 or int64) -> [T, H]."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects final hidden states to logits, in the model dtype. With ``tied`` it owns no weight and
    uses the embedding's (set by ``tie``), so tied checkpoints keep one copy of the matrix."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tied: bool, plugins: PluginSet | None = None
    ) -> None:
        super().__init__()
        self.tied = tied
        self.linear_op, self.one_row_op = linear_ops(plugins)  # as a Linear layer's
        self.weight: torch.Tensor | None = (
            None if tied else nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        )
        self._tied_embedding: VocabEmbedding | None = None

    def tie(self, embedding: VocabEmbedding) -> None:
        # A plain attribute, not a submodule: the weight stays registered (and loaded) once.
        object.__setattr__(self, "_tied_embedding", embedding)

    def head_weight(self) -> torch.Tensor:
        if self.tied:
            assert self._tied_embedding is not None, "tied LM head used before tie()"
            return self._tied_embedding.weight
        assert self.weight is not None
        return self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # [R, H] -> [R, V] in the model dtype, as transformers' GEMM gives them. Consumers upcast where
        # they compute (exactly: bf16/fp16 -> fp32), so a large batch's logits are not copied to fp32
        # and read again in the sampler's hot greedy path (0.2 ms a step at 512 rows of Llama-3's vocab).
        if self.linear_op is not None:
            return self.linear_op(hidden, self.head_weight())
        if self.one_row_op is not None and one_row(hidden):
            return self.one_row_op(hidden, self.head_weight())
        return F.linear(hidden, self.head_weight())
