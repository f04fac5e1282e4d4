"""The gated (SwiGLU) MLP of Llama-style models: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn

from kiln.layers.linear import Linear, MergedLinear
from kiln.plugins import PluginSet


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, plugins: PluginSet) -> None:
        super().__init__()
        parts = (("gate_proj", intermediate_size), ("up_proj", intermediate_size))
        self.gate_up_proj = MergedLinear(hidden_size, parts, bias=bias, plugins=plugins)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, plugins=plugins)
        self.silu_and_mul_op = plugins.silu_and_mul
        # a chosen silu_mul_linear plugin takes SiLU-and-mul and the down projection together
        self.silu_mul_linear_op = plugins.silu_mul_linear if plugins.overridden("silu_mul_linear") else None
        # a chosen linear_silu_mul plugin takes the gate|up projection and SiLU-and-mul together (no bias)
        chosen = plugins.overridden("linear_silu_mul") and not bias
        self.linear_silu_mul_op = plugins.linear_silu_mul if chosen else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_silu_mul_op is not None:
            return self.down_proj(self.linear_silu_mul_op(x, self.gate_up_proj.weight))  # [T, I] -> [T, H]
        return self.from_gate_up(self.gate_up_proj(x))

    def from_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate | up, bias included) -> [T, H]."""
        if self.silu_mul_linear_op is None:
            return self.down_proj(self.silu_and_mul_op(gate_up))  # [T, I] -> [T, H]
        return self.down_proj.add_bias(self.silu_mul_linear_op(gate_up, self.down_proj.weight))
