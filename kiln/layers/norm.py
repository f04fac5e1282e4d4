"""RMSNorm, through the rms_norm / fused_add_rms_norm plugins."""

from __future__ import annotations

import torch
from torch import nn

from kiln.plugins import PluginSet


class RMSNorm(nn.Module):
    """weight [H]. ``forward(x)`` -> norm(x);
    ``forward(x, residual)`` -> (norm(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float, plugins: PluginSet) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        # Ops resolved once, so a compiled forward sees the custom ops directly.
        self.rms_norm_op = plugins.rms_norm
        self.fused_add_rms_norm_op = plugins.fused_add_rms_norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.rms_norm_op(x, self.weight, self.eps)  # [..., H]
        return self.fused_add_rms_norm_op(x, residual, self.weight, self.eps)
